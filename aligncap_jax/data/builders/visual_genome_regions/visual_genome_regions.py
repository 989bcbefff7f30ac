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
the DenseCap release, https://github.com/jcjohnson/densecap).
Optional: a split file (`data.split_file`) in place of densecap_splits.json, or a
COCO-style region list for the test split, such as GLaMM's test_caption.json (the
5,000-region subset, https://github.com/mbzuai-oryx/groundingLMM docs/datasets.md)."""


def read_split_file(path: str) -> tuple[str, dict]:
  """A split file: ("images", {split: [image ids]}) or ("regions", {"test": ...}).

  Two forms:
  - DenseCap's `{"train": [ids], "val": [ids], "test": [ids]}` (image ids);
  - a COCO-style region list for the test split, as GLaMM's `test_caption.json`:
    `{"images": [{"id", "file_name": "<VG image id>.jpg"}], "annotations":
    [{"id", "image_id", "bbox": [x, y, w, h], "caption"}]}`; the test split is
    then those regions only, grouped by VG image in file order.

  Raises:
    ValueError: any other layout, or an entry without the fields above (named).
  """
  data = regions_lib.read_json(path)
  if isinstance(data, dict) and all(k in data for k in SPLITS):
    return "images", {k: [int(i) for i in data[k]] for k in SPLITS}
  if not (isinstance(data, dict) and isinstance(data.get("images"), list)
          and isinstance(data.get("annotations"), list)):
    raise ValueError(f"{path}: expected DenseCap splits {{'train', 'val', 'test'}} or a "
                     "COCO-style region list {'images', 'annotations'}")
  files = {}
  for i, e in enumerate(data["images"]):
    stem = os.path.splitext(os.path.basename(str(e.get("file_name", ""))))[0]
    if "id" not in e or not stem.isdigit():
      raise ValueError(f"{path}: images[{i}] needs 'id' and 'file_name' '<VG image id>.jpg', "
                       f"got {e!r}")
    files[e["id"]] = int(stem)
  by_image: dict[int, list[dict]] = {}
  for i, a in enumerate(data["annotations"]):
    caption = a.get("caption", a.get("description"))
    if a.get("image_id") not in files or not isinstance(caption, str) or len(a.get("bbox") or []) != 4:
      raise ValueError(f"{path}: annotations[{i}] needs an 'image_id' listed in 'images', "
                       f"'bbox' [x, y, w, h] and 'caption', got {a!r}")
    by_image.setdefault(files[a["image_id"]], []).append(
        {"region_id": int(a.get("id", i)), "x": a["bbox"][0], "y": a["bbox"][1],
         "width": a["bbox"][2], "height": a["bbox"][3], "phrase": caption})
  return "regions", {"test": by_image}


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
  Splits: `train`, `validation`, `test` from densecap_splits.json (DenseCap's
  full test split, 5,000 images), or from `split_file` (see `read_split_file`;
  a region list replaces the test split, e.g. GLaMM's 5,000-region subset).
  """

  VERSION = tfds.core.Version("1.2.0")
  RELEASE_NOTES = {"1.2.0": "Visual Genome v1.2 regions with DenseCap splits."}
  MANUAL_DOWNLOAD_INSTRUCTIONS = INSTRUCTIONS

  REQUIRED = tuple(REQUIRED)
  HOMEPAGE = "https://homes.cs.washington.edu/~ranjay/visualgenome/"

  def __init__(self, *, split_file: str | None = None, **kwargs):
    self._split_file = split_file
    super().__init__(**kwargs)

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
    splits = {k: [int(i) for i in splits[k]] for k in SPLITS}
    per_split_regions = {k: regions for k in SPLITS}
    if self._split_file:
      form, listed = read_split_file(self._split_file)
      if form == "images":
        splits = listed
      else:
        splits["test"] = list(listed["test"])
        per_split_regions["test"] = listed["test"]
    return {name: self._generate_examples(manual, name, splits[key], sizes,
                                          per_split_regions[key], objects)
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
