"""What the region-caption builders share: the record layout, boxes, images, logs.

One record per image (issue #5): `image` (encoded bytes, stored as read),
`image_id`, `width`, `height`, `regions` = Sequence{`id`, `bbox` float32[4]
pixel x1,y1,x2,y2, `caption`}, `objects` = Sequence{`label`, `bbox`, `score`}.
"""
from __future__ import annotations

import io
import json
import os
from collections.abc import Sequence

import numpy as np
import tensorflow_datasets as tfds
from absl import logging
from PIL import Image

BOX = tfds.features.Tensor(shape=(4,), dtype=np.float32)


def region_features() -> tfds.features.FeaturesDict:
  """The base record layout shared by synthetic, VG and RefCOCOg."""
  return tfds.features.FeaturesDict({
      "image": tfds.features.Image(shape=(None, None, 3)),
      "image_id": np.int64,
      "width": np.int64,
      "height": np.int64,
      "regions": tfds.features.Sequence({
          "id": np.int64, "bbox": BOX, "caption": tfds.features.Text()}),
      "objects": tfds.features.Sequence({
          "label": tfds.features.Text(), "bbox": BOX, "score": np.float32}),
  })


def xywh_to_xyxy(box: Sequence[float], width: int, height: int) -> np.ndarray | None:
  """`[x, y, w, h]` -> float32 `[x1, y1, x2, y2]` clipped to the image.

  Returns:
    None when the clipped box has zero area (or the input is not 4 finite numbers).
  """
  arr = np.asarray(box, np.float64).reshape(-1)
  if arr.shape != (4,) or not np.all(np.isfinite(arr)):
    return None
  x, y, w, h = arr
  out = np.clip([x, y, x + w, y + h], 0.0, [width, height, width, height])
  if out[2] <= out[0] or out[3] <= out[1]:
    return None
  return out.astype(np.float32)


def missing_files(manual_dir: str, required: Sequence[str]) -> list[str]:
  """The entries of `required` (files, or folders ending in '/') not in `manual_dir`."""
  out = []
  for rel in required:
    path = os.path.join(manual_dir, rel)
    ok = os.path.isdir(path) if rel.endswith("/") else os.path.isfile(path)
    if not ok:
      out.append(rel)
  return out


def check_manual_files(dataset: str, manual_dir: str | None, required: Sequence[str],
                       instructions: str) -> None:
  """Raises one FileNotFoundError listing every missing manual file and the folder."""
  if manual_dir is None:
    raise FileNotFoundError(f"{dataset}: no manual_dir given; it must hold {list(required)}."
                            f"\n{instructions}")
  missing = missing_files(manual_dir, required)
  if missing:
    raise FileNotFoundError(
        f"{dataset}: missing manual files {missing} (looked in {os.path.abspath(manual_dir)})."
        f"\n{instructions}")


def read_json(path: str):
  try:
    with open(path, "rb") as f:
      return json.load(f)
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise ValueError(f"{path}: not valid JSON ({e})") from e


def read_image(path: str) -> tuple[bytes, int, int]:
  """Encoded bytes and decoded (width, height) of an image file.

  Raises:
    OSError: the file is missing, unreadable, truncated or not an image.
  """
  with open(path, "rb") as f:
    data = f.read()
  try:
    with Image.open(io.BytesIO(data)) as img:
      img.load()
      width, height = img.size
  except Exception as e:  # PIL raises several types for bad data.
    raise OSError(f"cannot decode image {path}: {e}") from e
  return data, width, height


class BuildLog:
  """Counts of what a split's build kept and dropped, and the named skips.

  Written as `build_log_<split>.json` into the dataset folder and logged.
  """

  def __init__(self, dataset: str, split: str):
    self.dataset, self.split = dataset, split
    self.counts: dict[str, int] = {}
    self.skipped_images: list[dict] = []

  def add(self, key: str, n: int = 1) -> None:
    self.counts[key] = self.counts.get(key, 0) + n

  def skip_image(self, image_id: int, path: str, reason: str) -> None:
    self.add("skipped_images")
    self.skipped_images.append({"image_id": int(image_id), "path": path, "reason": reason})
    logging.warning("%s/%s: skipped image %d (%s): %s", self.dataset, self.split,
                    image_id, path, reason)

  def write(self, data_dir: str) -> None:
    logging.info("%s/%s build log: %s", self.dataset, self.split, self.counts)
    path = os.path.join(data_dir, f"build_log_{self.split}.json")
    with open(path, "w") as f:
      json.dump({"counts": self.counts, "skipped_images": self.skipped_images}, f, indent=1)


def load_build_log(data_dir: str, split: str) -> dict:
  """The `build_log_<split>.json` of a prepared dataset folder."""
  with open(os.path.join(data_dir, f"build_log_{split}.json")) as f:
    return json.load(f)


def image_record(*, data: bytes, image_id: int, width: int, height: int,
                 regions: list[dict], objects: list[dict]) -> dict:
  """A record in the layout of `region_features` (lists of dicts -> columns)."""
  return {
      "image": data, "image_id": int(image_id), "width": int(width), "height": int(height),
      "regions": {
          "id": np.array([r["id"] for r in regions], np.int64),
          "bbox": np.array([r["bbox"] for r in regions], np.float32).reshape(-1, 4),
          "caption": [r["caption"] for r in regions],
      },
      "objects": {
          "label": [o["label"] for o in objects],
          "bbox": np.array([o["bbox"] for o in objects], np.float32).reshape(-1, 4),
          "score": np.array([o["score"] for o in objects], np.float32),
      },
  }


class ManualRegionsBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Base of the builders that read a user's own downloads from `manual_dir`.

  Subclasses set `MANUAL_DOWNLOAD_INSTRUCTIONS`, `REQUIRED` (the manual files,
  folders ending in '/') and `HOMEPAGE`; the class docstring is the dataset
  description. `strict=True` makes an unreadable image an error instead of a
  skip that the build log counts and names.
  """

  REQUIRED: tuple[str, ...] = ()
  HOMEPAGE = ""

  def __init__(self, *, strict: bool = False, **kwargs):
    self._strict = strict
    super().__init__(**kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(builder=self, description=self.__doc__,
                                 features=region_features(), homepage=self.HOMEPAGE)

  def _manual_dir(self, dl_manager) -> str:
    """The manual folder, after checking that every `REQUIRED` entry is there."""
    manual = os.fspath(dl_manager.manual_dir)
    check_manual_files(self.name, manual, self.REQUIRED, self.MANUAL_DOWNLOAD_INSTRUCTIONS)
    return manual

  def _read_image(self, log: BuildLog, image_id: int, path: str) -> tuple[bytes, int, int] | None:
    """`read_image`, or None after logging the skip (raises with `strict`)."""
    try:
      return read_image(path)
    except OSError as e:
      if self._strict:
        raise
      log.skip_image(image_id, path, str(e))
      return None

  @staticmethod
  def _finish_image(log: BuildLog, image_id: int, image: tuple[bytes, int, int],
                    kept: list[dict], objs: list[dict]) -> tuple[int, dict]:
    """Counts an image's kept regions and objects; returns its (key, record)."""
    if not kept:
      log.add("images_without_regions")
    log.add("images")
    log.add("regions", len(kept))
    log.add("objects", len(objs))
    data, width, height = image
    return image_id, image_record(data=data, image_id=image_id, width=width, height=height,
                                  regions=kept, objects=objs)
