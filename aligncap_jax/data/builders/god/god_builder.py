"""TFDS builders of `<base>_god`: a base region dataset plus GOD views and tags.

Record layout (one per base record, in the base record's order, so GOD record
`i` of a split is base record `i`): every base field (`image` bytes as stored in
the base, `image_id`, `width`, `height`, `regions`, `objects`), where

- `objects` holds the detections GOD used (the base objects, or the
  `detections_file` entries of this image);
- each region also holds `view_count` (V_r) and `tag_count` (k_r);
- the ragged per-region arrays are stored flat over the record's regions, in
  region order (TFDS cannot encode empty rows of nested ragged tensors):
  `views` float32[sum V_r, 4], `view_distance` int32[sum V_r], `tag_ids`
  int32[sum k_r]. `aligncap_jax.data.god_tfds.load_source` splits them back.

Beside the shards: `tag_vocab.txt`, `god_params.json` and, per split,
`regions_<split>.npy` int64[R, 2] = (record index, region index in record).
"""
from __future__ import annotations

import dataclasses
import hashlib
import io
import multiprocessing
import os
from collections.abc import Iterator, Mapping

import numpy as np
import tensorflow_datasets as tfds
import tqdm
from absl import logging
from PIL import Image

from aligncap_jax.data import god
from aligncap_jax.data import tags
from aligncap_jax.data.builders import regions as regions_lib

VOCAB_FILE = "tag_vocab.txt"
PARAMS_FILE = "god_params.json"
TRAIN_SPLIT = "train"


def regions_index_file(split: str) -> str:
  return f"regions_{split}.npy"


def file_sha256(path: str | None) -> str | None:
  if path is None:
    return None
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      h.update(block)
  return h.hexdigest()


@dataclasses.dataclass(frozen=True)
class GodParams:
  """Everything that decides a GOD dataset's contents.

  Attributes:
    top_k: classes whose objects make views (DESIGN.md section 5).
    score_threshold: detections below it are ignored.
    tag_vocab_size: tags kept in the vocabulary.
    tag_list_file: optional user tag list (see `tags.read_tag_list`).
    detections_file: optional detections JSON (see `read_detections`).
    num_processes: worker processes (1: in-process); does not change the output.
    hash_method: pHash implementation, `god.HASH_METHODS` ("fast" or "exact",
      bit-equal hashes); does not change the output.
  """
  top_k: int = 1
  score_threshold: float = 0.0
  tag_vocab_size: int = 4585
  tag_list_file: str | None = None
  detections_file: str | None = None
  num_processes: int = 1
  hash_method: str = "fast"

  def fingerprint(self) -> dict:
    """The JSON-able identity of the output (file contents, not paths)."""
    return {"top_k": int(self.top_k), "score_threshold": float(self.score_threshold),
            "tag_vocab_size": int(self.tag_vocab_size),
            "tag_list_sha256": file_sha256(self.tag_list_file),
            "detections_sha256": file_sha256(self.detections_file)}


def read_detections(path: str) -> dict[int, list[dict]]:
  """Reads a COCO-format detection results file, grouped by image id.

  Expected JSON (the `detections` list is COCO's results format; `categories`
  is COCO's category list, as in any `instances_*.json`):

      {"categories": [{"id": 1, "name": "person"}, ...],
       "detections": [{"image_id": 42, "category_id": 1,
                       "bbox": [x, y, w, h], "score": 0.97}, ...]}

  Returns:
    {image_id: [{"label", "bbox" [x1, y1, x2, y2] (not clipped), "score"}]} in
    file order.

  Raises:
    ValueError: naming the file, and the entry index and field at fault.
  """
  data = regions_lib.read_json(path)
  if not isinstance(data, Mapping) or "categories" not in data or "detections" not in data:
    raise ValueError(f"{path}: expected a JSON object with 'categories' and 'detections' "
                     "(a COCO results list needs wrapping with its category list)")
  names = {}
  for i, cat in enumerate(data["categories"]):
    try:
      names[int(cat["id"])] = str(cat["name"])
    except (KeyError, TypeError, ValueError) as e:
      raise ValueError(f"{path}: categories[{i}] needs 'id' and 'name' ({e!r})") from e
  out: dict[int, list[dict]] = {}
  for i, det in enumerate(data["detections"]):
    for field in ("image_id", "category_id", "bbox", "score"):
      if not isinstance(det, Mapping) or field not in det:
        raise ValueError(f"{path}: detections[{i}] has no '{field}'")
    cat = int(det["category_id"])
    if cat not in names:
      raise ValueError(f"{path}: detections[{i}].category_id={cat} is not in categories")
    box = np.asarray(det["bbox"], np.float64).reshape(-1)
    if box.shape != (4,) or not np.all(np.isfinite(box)) or box[2] < 0 or box[3] < 0:
      raise ValueError(f"{path}: detections[{i}].bbox={det['bbox']!r} is not [x, y, w, h]")
    x, y, w, h = box
    out.setdefault(int(det["image_id"]), []).append(
        {"label": names[cat], "bbox": [x, y, x + w, y + h], "score": float(det["score"])})
  return out


def objects_list(columns: Mapping) -> list[dict]:
  """Decoded TFDS `objects` columns -> list of {"label", "bbox", "score"}."""
  labels = [l.decode() if isinstance(l, bytes) else str(l) for l in columns["label"]]
  return [{"label": l, "bbox": np.asarray(b, np.float32), "score": float(s)}
          for l, b, s in zip(labels, columns["bbox"], columns["score"])]


def _text(value) -> str:
  return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def decode_rgb(data: bytes) -> np.ndarray:
  """uint8[H, W, 3] of encoded image bytes (any PIL format and mode)."""
  with Image.open(io.BytesIO(data)) as img:
    return np.asarray(img.convert("RGB"))


def decode_grey(data: bytes) -> np.ndarray:
  """uint8[H, W]: the grey image pHash sees, `decode_rgb` then PIL's "L" conversion."""
  with Image.open(io.BytesIO(data)) as img:
    if img.mode not in ("RGB", "L"):
      img = img.convert("RGB")
    return np.asarray(img.convert("L"))


_WORKER: dict = {}


def init_worker(params: GodParams, vocab: list[str]) -> None:
  """Sets the settings `annotate_item` uses in this process."""
  _WORKER["params"] = params
  _WORKER["matcher"] = tags.TagMatcher(vocab)


def annotate_record(record: dict, objects: list[dict], params: GodParams,
                    matcher: tags.TagMatcher) -> dict:
  """The GOD record of one decoded base record (image left encoded).

  Args:
    record: base record from a data source read with the image undecoded.
    objects: the detections to use, as from `objects_list`.
    params: GOD settings.
    matcher: the tag vocabulary's matcher.

  Returns:
    The record in the GOD builder's feature layout.
  """
  width, height = int(record["width"]), int(record["height"])
  image = decode_grey(record["image"])
  if image.shape[:2] != (height, width):
    raise ValueError(f"image_id {record['image_id']}: image is {image.shape[1]}x"
                     f"{image.shape[0]} but the record says {width}x{height}")
  boxes = np.asarray(record["regions"]["bbox"], np.float32).reshape(-1, 4)
  captions = [_text(c) for c in record["regions"]["caption"]]
  per_region = god.propose_views_batch(boxes, objects, top_k=params.top_k,
                                       score_threshold=params.score_threshold,
                                       image_size=(width, height))
  views = np.concatenate([np.zeros((0, 4), np.float32), *per_region]).astype(np.float32)
  counts = np.array([len(v) for v in per_region], np.int32)
  # Hash every distinct box of the image once.
  unique: dict[tuple, int] = {}
  which = np.array([unique.setdefault(key, len(unique))
                    for key in map(tuple, np.concatenate([boxes, views]).tolist())], np.int64)
  hashes = god.box_hashes(image, np.array(list(unique), np.float32).reshape(-1, 4),
                          method=params.hash_method)
  target_of_view = np.repeat(np.arange(len(boxes)), counts)
  distances = god.hamming(hashes[which[len(boxes):]], hashes[which[target_of_view]])
  tag_lists = [matcher(caption) for caption in captions]
  return {
      "image": record["image"], "image_id": int(record["image_id"]),
      "width": width, "height": height,
      "regions": {
          "id": np.asarray(record["regions"]["id"], np.int64).reshape(-1),
          "bbox": boxes, "caption": captions,
          "view_count": counts,
          "tag_count": np.array([len(t) for t in tag_lists], np.int32),
      },
      "objects": {
          "label": [o["label"] for o in objects],
          "bbox": np.array([o["bbox"] for o in objects], np.float32).reshape(-1, 4),
          "score": np.array([o["score"] for o in objects], np.float32),
      },
      "views": views,
      "view_distance": distances.astype(np.int32).reshape(-1),
      "tag_ids": np.concatenate([np.zeros((0,), np.int32), *tag_lists]).astype(np.int32),
  }


def annotate_item(item: tuple[dict, list[dict]]) -> dict:
  """`annotate_record` of (record, objects) with the settings of `worker_pool`."""
  record, objects = item
  return annotate_record(record, objects, _WORKER["params"], _WORKER["matcher"])


def worker_pool(num_processes: int, params: GodParams, vocab: list[str]):
  """A process pool ready to `imap(annotate_item, ...)`.

  Workers come from a fork server (a fresh single-threaded process that
  imports this module, and numba with the fast pHash, once), so they start
  quickly and never inherit this process's threads. As with spawn, a calling
  script needs an `if __name__ == "__main__":` guard.
  """
  ctx = multiprocessing.get_context("forkserver")
  ctx.set_forkserver_preload([__name__, "aligncap_jax.data.phash_fast"])
  return ctx.Pool(num_processes, initializer=init_worker, initargs=(params, vocab))


def god_features() -> tfds.features.FeaturesDict:
  box = regions_lib.BOX
  return tfds.features.FeaturesDict({
      "image": tfds.features.Image(shape=(None, None, 3)),
      "image_id": np.int64,
      "width": np.int64,
      "height": np.int64,
      "regions": tfds.features.Sequence({
          "id": np.int64, "bbox": box, "caption": tfds.features.Text(),
          "view_count": np.int32, "tag_count": np.int32}),
      "objects": tfds.features.Sequence({
          "label": tfds.features.Text(), "bbox": box, "score": np.float32}),
      "views": tfds.features.Tensor(shape=(None, 4), dtype=np.float32),
      "view_distance": tfds.features.Tensor(shape=(None,), dtype=np.int32),
      "tag_ids": tfds.features.Tensor(shape=(None,), dtype=np.int32),
  })


def open_base(base_name: str, data_dir: str | None) -> tfds.core.DatasetBuilder:
  """The prepared base dataset, read from its files (no builder class needed)."""
  try:
    return tfds.core.read_only_builder.builder_from_files(base_name, data_dir=data_dir)
  except Exception as e:
    raise FileNotFoundError(f"base dataset '{base_name}' is not prepared in data_dir "
                            f"{data_dir or '(TFDS default)'}: build it first ({e})") from e


class GodBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Generic `<BASE_NAME>_god` builder; subclasses only set `BASE_NAME`.

  Built with `builder.download_and_prepare()` (see `god_tfds.build`); the base
  dataset must already be prepared in the same `data_dir`.
  """

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Views, pHash distances and tag ids per region."}
  BASE_NAME: str = ""

  def __init__(self, *, params: GodParams | None = None, use_beam: bool = False, **kwargs):
    """`use_beam`: generate through Apache Beam (`god_beam`; needs the beam extra)."""
    self._params, self._use_beam = params, use_beam
    self._workers = None  # one pool for every split of a build, started on first use
    super().__init__(**kwargs)

  def _download_and_prepare(self, *args, **kwargs):
    try:
      return super()._download_and_prepare(*args, **kwargs)
    finally:
      if self._workers is not None:
        self._workers.terminate()
        self._workers = None

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description=f"{self.BASE_NAME} with GOD context views and tag ids (AlignCap).",
        features=god_features(),
        disable_shuffling=True,  # record i = base record i
        homepage="https://arxiv.org/abs/2412.10348",
    )

  def _split_generators(self, dl_manager):
    del dl_manager
    if self._params is None:
      raise ValueError(f"{self.name}: building needs params=GodParams(...)")
    base = open_base(self.BASE_NAME, os.fspath(self.data_dir_root))
    if TRAIN_SPLIT not in base.info.splits:
      raise ValueError(f"base dataset {self.BASE_NAME} has no '{TRAIN_SPLIT}' split "
                       f"(splits: {sorted(base.info.splits)}) to build the tag vocabulary from")
    vocab = self._build_vocab(base)
    tags.save_vocab(vocab, os.path.join(self.data_dir, VOCAB_FILE))
    detections = (read_detections(self._params.detections_file)
                  if self._params.detections_file else None)
    if self._use_beam:
      from aligncap_jax.data.builders.god import god_beam  # pylint: disable=g-import-not-at-top
      return {split: god_beam.annotate_transform(
                  self.BASE_NAME, os.fspath(self.data_dir_root), split,
                  int(base.info.splits[split].num_examples), self._params, vocab, detections)
              for split in sorted(base.info.splits)}
    return {split: self._generate_examples(base, split, vocab, detections)
            for split in sorted(base.info.splits)}

  def _build_vocab(self, base) -> list[str]:
    source = base.as_data_source(TRAIN_SPLIT, decoders={"image": tfds.decode.SkipDecoding()})
    captions = (_text(c) for rec in source for c in rec["regions"]["caption"])
    tag_list = (tags.read_tag_list(self._params.tag_list_file)
                if self._params.tag_list_file else None)
    return tags.build_vocab(captions, self._params.tag_vocab_size, tag_list=tag_list)

  def _generate_examples(self, base, split, vocab, detections) -> Iterator[tuple[int, dict]]:
    source = base.as_data_source(split, decoders={"image": tfds.decode.SkipDecoding()})
    stats = {"images": len(source), "images_without_detections": 0}

    def items():
      for rec in source:
        if detections is None:
          objects = objects_list(rec["objects"])
        else:
          objects = detections.get(int(rec["image_id"]), [])
        stats["images_without_detections"] += not objects
        yield rec, objects

    num_proc = max(1, int(self._params.num_processes))
    bar = tqdm.tqdm(total=len(source), desc=f"GOD {self.BASE_NAME}/{split}", unit="img")
    index = []
    if num_proc == 1:
      init_worker(self._params, vocab)
      results = map(annotate_item, items())
    else:
      if self._workers is None:  # the splits share it: workers start once per build
        self._workers = worker_pool(num_proc, self._params, vocab)
      results = self._workers.imap(annotate_item, items(), chunksize=4)
    try:
      for i, example in enumerate(results):
        n = len(example["regions"]["id"])
        index.extend((i, r) for r in range(n))
        bar.update(1)
        yield i, example
    finally:
      bar.close()
    np.save(os.path.join(self.data_dir, regions_index_file(split)),
            np.array(index, np.int64).reshape(-1, 2))
    logging.info("%s/%s: %s", self.name, split, stats)


def write_regions_index(builder: tfds.core.DatasetBuilder, split: str) -> str:
  """Writes `regions_<split>.npy` from a built split's records (the Beam path's index).

  Returns:
    The file written.
  """
  source = builder.as_data_source(split, decoders={"image": tfds.decode.SkipDecoding()})
  index = [(i, r) for i in range(len(source)) for r in range(len(source[i]["regions"]["id"]))]
  path = os.path.join(builder.data_dir, regions_index_file(split))
  np.save(path, np.array(index, np.int64).reshape(-1, 2))
  return path


class SyntheticRegionsGod(GodBuilder):
  """GOD dataset of `synthetic_regions`."""
  BASE_NAME = "synthetic_regions"


class VisualGenomeRegionsGod(GodBuilder):
  """GOD dataset of `visual_genome_regions`."""
  BASE_NAME = "visual_genome_regions"


class RefcocogRegionsGod(GodBuilder):
  """GOD dataset of `refcocog_regions`."""
  BASE_NAME = "refcocog_regions"


_CLASSES: dict[str, type[GodBuilder]] = {
    c.BASE_NAME: c for c in (SyntheticRegionsGod, VisualGenomeRegionsGod, RefcocogRegionsGod)}


def god_builder_class(base_name: str) -> type[GodBuilder]:
  """The builder class of `<base_name>_god` (made, once, for other bases)."""
  if base_name not in _CLASSES:
    cls_name = "".join(p.capitalize() for p in base_name.split("_")) + "God"
    _CLASSES[base_name] = type(cls_name, (GodBuilder,), {
        "name": f"{base_name}_god", "BASE_NAME": base_name,
        "__doc__": f"GOD dataset of `{base_name}`.", "__module__": __name__})
  return _CLASSES[base_name]
