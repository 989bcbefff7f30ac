"""RefCOCOg (umd split) referring expressions as region captions, TFDS."""
from __future__ import annotations

import os
import pickle

import tensorflow_datasets as tfds

from aligncap_jax.data.builders import regions as regions_lib

REFS_FILE = "refs(umd).p"
REQUIRED = (REFS_FILE, "instances.json", "train2014/")
SPLITS = {"train": "train", "val": "validation", "test": "test"}

INSTRUCTIONS = """\
Put into the manual dir: `refs(umd).p` and `instances.json` from the RefCOCOg
(umd) release (refcocog.zip of https://github.com/lichengunc/refer), and the
COCO 2014 training images as train2014/COCO_train2014_<12-digit image id>.jpg
(https://cocodataset.org/#download, train2014.zip)."""


def image_file(image_id: int) -> str:
  return f"train2014/COCO_train2014_{image_id:012d}.jpg"


class RefcocogRegions(regions_lib.ManualRegionsBuilder):
  """RefCOCOg umd: one record per image and split; each sentence is a region.

  A region is (referred object's box, one of its sentences); its id is the
  sentence's `sent_id`. `objects` are all COCO annotations of the image
  (category name, score 1.0). Boxes x, y, w, h -> clipped x1, y1, x2, y2;
  zero-area boxes, empty sentences and corrupt images are dropped and counted
  (`build_log_<split>.json`; corrupt images raise with `strict=True`).
  """

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "RefCOCOg umd splits (train/val/test)."}
  MANUAL_DOWNLOAD_INSTRUCTIONS = INSTRUCTIONS

  REQUIRED = tuple(REQUIRED)
  HOMEPAGE = "https://github.com/lichengunc/refer"

  def _split_generators(self, dl_manager):
    manual = self._manual_dir(dl_manager)
    refs_path = os.path.join(manual, REFS_FILE)
    try:
      with open(refs_path, "rb") as f:
        refs = pickle.load(f, encoding="latin1")  # the release is a Python 2 pickle
    except Exception as e:
      raise ValueError(f"{refs_path}: cannot unpickle ({e})") from e
    instances = regions_lib.read_json(os.path.join(manual, "instances.json"))
    categories = {int(c["id"]): str(c["name"]) for c in instances["categories"]}
    anns, by_image = {}, {}
    for a in instances["annotations"]:
      anns[int(a["id"])] = a
      by_image.setdefault(int(a["image_id"]), []).append(a)
    split_refs: dict[str, dict[int, list]] = {k: {} for k in SPLITS}
    for i, ref in enumerate(refs):
      if ref["split"] not in SPLITS:
        raise ValueError(f"{refs_path}: ref {i} has split {ref['split']!r}, "
                         f"not one of {sorted(SPLITS)}")
      split_refs[ref["split"]].setdefault(int(ref["image_id"]), []).append(ref)
    return {name: self._generate_examples(manual, name, split_refs[key], anns, by_image,
                                          categories)
            for key, name in SPLITS.items()}

  def _generate_examples(self, manual, split, refs_by_image, anns, by_image, categories):
    log = regions_lib.BuildLog(self.name, split)
    for image_id in sorted(refs_by_image):
      log.add("images_listed")
      path = os.path.join(manual, image_file(image_id))
      image = self._read_image(log, image_id, path)
      if image is None:
        continue
      width, height = image[1:]
      kept = []
      for ref in refs_by_image[image_id]:
        ann = anns.get(int(ref["ann_id"]))
        if ann is None:
          raise ValueError(f"{REFS_FILE}: ref {ref.get('ref_id')} names ann_id {ref['ann_id']}, "
                           "which instances.json does not have")
        box = regions_lib.xywh_to_xyxy(ann["bbox"], width, height)
        for k, sent in enumerate(ref["sentences"]):
          text = str(sent.get("sent") or sent.get("raw") or "").strip()
          if not text:
            log.add("regions_dropped_empty_sentence")
          elif box is None:
            log.add("regions_dropped_zero_area")
          else:
            sid = sent.get("sent_id", int(ref["ref_id"]) * 1000 + k)
            kept.append({"id": int(sid), "bbox": box, "caption": text})
      objs = []
      for ann in by_image.get(image_id, []):
        box = regions_lib.xywh_to_xyxy(ann["bbox"], width, height)
        if box is None:
          log.add("objects_dropped_zero_area")
        else:
          objs.append({"label": categories[int(ann["category_id"])], "bbox": box, "score": 1.0})
      yield self._finish_image(log, image_id, image, kept, objs)
    log.write(self.data_dir)
