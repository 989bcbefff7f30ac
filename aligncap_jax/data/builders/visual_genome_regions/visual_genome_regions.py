"""Visual Genome v1.2 region descriptions as TFDS (dense-captioning splits)."""
from __future__ import annotations

import os

import tensorflow_datasets as tfds

from aligncap_jax.data.builders import regions as regions_lib

REQUIRED = ("image_data.json", "region_descriptions.json", "objects.json",
            "densecap_splits.json", "VG_100K/", "VG_100K_2/")
IMAGE_DIRS = ("VG_100K", "VG_100K_2")
SPLITS = {"train": "train", "val": "validation", "test": "test"}

INSTRUCTIONS = """\
Download Visual Genome v1.2 from https://homes.cs.washington.edu/~ranjay/visualgenome/
(image_data.json, region_descriptions.json, objects.json and both image archives),
unzip everything into the manual dir, so that it holds image_data.json,
region_descriptions.json, objects.json, VG_100K/<image_id>.jpg and
VG_100K_2/<image_id>.jpg, and add the dense-captioning split file
densecap_splits.json ({"train": [image ids], "val": [...], "test": [...]}, from
the DenseCap release, https://github.com/jcjohnson/densecap)."""


def _image_id(entry: dict, path: str, index: int) -> int:
  for key in ("image_id", "id"):
    if key in entry:
      return int(entry[key])
  raise ValueError(f"{path}: entry {index} has no 'image_id' (or 'id')")


class VisualGenomeRegions(regions_lib.ManualRegionsBuilder):
  """VG v1.2: one record per image with its region descriptions and objects.

  Boxes are converted from x, y, w, h to pixel x1, y1, x2, y2 and clipped to the
  decoded image; zero-area boxes and empty phrases are dropped and counted, as
  are corrupt images (an error instead with `strict=True`). Counts and the
  names of skipped images go to the build log (`build_log_<split>.json`).
  Splits: `train`, `validation`, `test` from densecap_splits.json.
  """

  VERSION = tfds.core.Version("1.2.0")
  RELEASE_NOTES = {"1.2.0": "Visual Genome v1.2 regions with DenseCap splits."}
  MANUAL_DOWNLOAD_INSTRUCTIONS = INSTRUCTIONS

  REQUIRED = tuple(REQUIRED)
  HOMEPAGE = "https://homes.cs.washington.edu/~ranjay/visualgenome/"

  def _split_generators(self, dl_manager):
    manual = self._manual_dir(dl_manager)
    path = lambda f: os.path.join(manual, f)
    sizes = {}
    for i, e in enumerate(regions_lib.read_json(path("image_data.json"))):
      sizes[_image_id(e, "image_data.json", i)] = (int(e["width"]), int(e["height"]))
    regions = {_image_id(e, "region_descriptions.json", i): e.get("regions", [])
               for i, e in enumerate(regions_lib.read_json(path("region_descriptions.json")))}
    objects = {_image_id(e, "objects.json", i): e.get("objects", [])
               for i, e in enumerate(regions_lib.read_json(path("objects.json")))}
    splits = regions_lib.read_json(path("densecap_splits.json"))
    missing = [k for k in SPLITS if k not in splits]
    if missing:
      raise ValueError(f"{path('densecap_splits.json')}: no {missing} split(s)")
    return {name: self._generate_examples(manual, name, [int(i) for i in splits[key]],
                                          sizes, regions, objects)
            for key, name in SPLITS.items()}

  def _find_image(self, manual: str, image_id: int) -> str | None:
    for folder in IMAGE_DIRS:
      p = os.path.join(manual, folder, f"{image_id}.jpg")
      if os.path.isfile(p):
        return p
    return None

  def _generate_examples(self, manual, split, image_ids, sizes, regions, objects):
    log = regions_lib.BuildLog(self.name, split)
    for image_id in image_ids:
      log.add("images_listed")
      path = self._find_image(manual, image_id)
      if path is None:
        where = " or ".join(f"{d}/{image_id}.jpg" for d in IMAGE_DIRS)
        if self._strict:
          raise FileNotFoundError(f"{self.name}: image {image_id} not found ({where} in {manual})")
        log.skip_image(image_id, where, "missing file")
        continue
      image = self._read_image(log, image_id, path)
      if image is None:
        continue
      width, height = image[1:]
      if image_id in sizes and sizes[image_id] != (width, height):
        log.add("image_size_differs_from_image_data")
      kept = []
      for r in regions.get(image_id, []):
        phrase = str(r.get("phrase") or "").strip()
        box = regions_lib.xywh_to_xyxy([r["x"], r["y"], r["width"], r["height"]], width, height)
        if not phrase:
          log.add("regions_dropped_empty_phrase")
        elif box is None:
          log.add("regions_dropped_zero_area")
        else:
          kept.append({"id": int(r["region_id"]), "bbox": box, "caption": phrase})
      objs = []
      for o in objects.get(image_id, []):
        names = o.get("names") or ([o["name"]] if o.get("name") else [])
        box = regions_lib.xywh_to_xyxy([o["x"], o["y"], o["w"], o["h"]], width, height)
        if not names or not str(names[0]).strip():
          log.add("objects_dropped_no_name")
        elif box is None:
          log.add("objects_dropped_zero_area")
        else:
          objs.append({"label": str(names[0]).strip(), "bbox": box, "score": 1.0})
      yield self._finish_image(log, image_id, image, kept, objs)
    log.write(self.data_dir)
