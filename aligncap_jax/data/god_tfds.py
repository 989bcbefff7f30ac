"""The GOD offline job: `<base>` TFDS dataset -> `<base>_god` (DESIGN.md section 5).

`build` reads the prepared base dataset (array_record, random access, no
TensorFlow at read time), proposes each region's context views with
`god.propose_views`, scores them with `god` pHash distances, builds the tag
vocabulary from the train split's captions and writes everything as a new TFDS
dataset (record layout: `aligncap_jax/data/builders/god/god_builder.py`). Images
are processed by `num_processes` worker processes (started from a fork server,
so a script calling `build` with `num_processes > 1` needs an
`if __name__ == "__main__":` guard; output order is the base order, whatever the
count) behind a tqdm progress bar.

Detections: the base records' own `objects` (synthetic: simulated detector;
VG/RefCOCOg: annotations, score 1.0), or `detections_file`, a JSON object
`{"categories": [{"id", "name"}], "detections": [{"image_id", "category_id",
"bbox": [x, y, w, h], "score"}]}` (COCO results format + its category list).

Past one machine: `beam_options` (config `data.god_beam_options`, a string
of Beam pipeline flags) runs the same per-image work through TFDS's Apache Beam
support (`aligncap_jax/data/builders/god/god_beam.py`), with the same output
records; `regions_<split>.npy` is then written from the built shards. Beam is an
optional extra with its own virtualenv (it pins protobuf < 7 and a newer
pillow): `python -m venv .venv-beam && .venv-beam/bin/pip install -e .[beam]`.
One big machine:

    --config.data.god_beam_options="--runner=DirectRunner --direct_num_workers=16
        --direct_running_mode=multi_processing"

Dataflow (the base dataset and `data_dir` on GCS, readable by the workers; the
workers install this package from `--setup_file`):

    --config.data.data_dir=gs://B/tfds --config.data.god_beam_options="--runner=DataflowRunner
        --project=P --region=R --temp_location=gs://B/tmp --setup_file=./setup.py"

The default path never imports apache_beam.
"""
from __future__ import annotations

import importlib.util
import json
import os

import numpy as np
import tensorflow_datasets as tfds
from absl import logging

from aligncap_jax.data import god
from aligncap_jax.data import tags
from aligncap_jax.data.builders.god import god_builder


def god_name(base_name: str) -> str:
  return f"{base_name}_god"


def _identity(params: god_builder.GodParams, base_name: str, data_dir: str | None) -> dict:
  base = god_builder.open_base(base_name, data_dir)
  return {**params.fingerprint(), "base_version": str(base.info.version),
          "base_num_examples": {s: int(i.num_examples) for s, i in sorted(base.info.splits.items())}}


def build(base_name: str, *, data_dir: str | None, top_k: int, score_threshold: float,
          tag_vocab_size: int, tag_list_file: str | None = None,
          detections_file: str | None = None, num_processes: int = 1,
          beam_options: str = "", hash_method: str = "fast") -> str:
  """Builds `<base_name>_god` from the prepared `base_name` in `data_dir`.

  `beam_options`: non-empty runs the job through Apache Beam with these
  pipeline flags (e.g. "--runner=DirectRunner"); `num_processes` is then unused.
  `hash_method`: config `data.god_hash`, "fast" (compiled) or "exact" (PIL per
  crop); both give the same hashes, so it is not part of the dataset's identity.

  An existing GOD dataset built from the same settings and base is reused; one
  built from other settings is rebuilt.

  Returns:
    The GOD dataset's folder (`data_dir/<base_name>_god/<version>`).
  """
  params = god_builder.GodParams(top_k=top_k, score_threshold=score_threshold,
                                 tag_vocab_size=tag_vocab_size, tag_list_file=tag_list_file,
                                 detections_file=detections_file, num_processes=num_processes,
                                 hash_method=hash_method)
  if hash_method not in god.HASH_METHODS:
    raise ValueError(f"config field 'data.god_hash': must be one of {god.HASH_METHODS}, "
                     f"got {hash_method!r}")
  for path, field in ((tag_list_file, "tag_list_file"), (detections_file, "detections_file")):
    if path is not None and not os.path.isfile(path):
      raise FileNotFoundError(f"GOD {field}: {path} does not exist")
  use_beam = bool(beam_options and beam_options.strip())
  if use_beam and importlib.util.find_spec("apache_beam") is None:
    raise RuntimeError("config data.god_beam_options is set but apache_beam is not installed: "
                       "python -m venv .venv-beam && .venv-beam/bin/pip install -e '.[beam]' "
                       "(its own virtualenv: beam pins protobuf < 7)")
  builder = god_builder.god_builder_class(base_name)(
      params=params, data_dir=data_dir, file_format="array_record", use_beam=use_beam)
  identity = _identity(params, base_name, data_dir)
  mode = tfds.download.GenerateMode.REUSE_DATASET_IF_EXISTS
  params_path = os.path.join(builder.data_dir, god_builder.PARAMS_FILE)
  if os.path.exists(params_path):
    with open(params_path) as f:
      if json.load(f) == identity:
        return builder.data_dir
    logging.info("%s exists with other settings: rebuilding", builder.data_dir)
    mode = tfds.download.GenerateMode.REUSE_CACHE_IF_EXISTS
  download_config = tfds.download.DownloadConfig(download_mode=mode)
  if use_beam:
    from aligncap_jax.data.builders.god import god_beam  # pylint: disable=g-import-not-at-top
    download_config = tfds.download.DownloadConfig(
        download_mode=mode, beam_options=god_beam.pipeline_options(beam_options))
  builder.download_and_prepare(download_config=download_config)
  if use_beam:
    for split in builder.info.splits:
      god_builder.write_regions_index(builder, split)
  with open(params_path, "w") as f:
    json.dump(identity, f, indent=1)
  return builder.data_dir


def settings_match(base_name: str, *, data_dir: str | None, top_k: int, score_threshold: float,
                   tag_vocab_size: int, tag_list_file: str | None = None,
                   detections_file: str | None = None) -> bool:
  """Whether the prepared `<base_name>_god` was built from these settings and base.

  A GOD dataset written before its settings were recorded matches (nothing to
  compare; a warning says so).
  """
  params = god_builder.GodParams(top_k=top_k, score_threshold=score_threshold,
                                 tag_vocab_size=tag_vocab_size, tag_list_file=tag_list_file,
                                 detections_file=detections_file)
  path = os.path.join(god_dir(base_name, data_dir), god_builder.PARAMS_FILE)
  if not os.path.exists(path):
    logging.warning("%s records no build settings; assuming they match the config", path)
    return True
  with open(path) as f:
    return json.load(f) == _identity(params, base_name, data_dir)


def god_dir(base_name: str, data_dir: str | None) -> str:
  """Folder of the prepared `<base_name>_god` dataset."""
  try:
    builder = tfds.core.read_only_builder.builder_from_files(god_name(base_name),
                                                             data_dir=data_dir)
  except Exception as e:
    raise FileNotFoundError(f"GOD dataset '{god_name(base_name)}' is not prepared in data_dir "
                            f"{data_dir or '(TFDS default)'}: run the GOD job "
                            f"(--mode god) first ({e})") from e
  return builder.data_dir


def is_built(base_name: str, data_dir: str | None) -> bool:
  """Whether `<base_name>_god` is prepared in `data_dir` (with its vocabulary)."""
  try:
    return os.path.isfile(tag_vocab_path(base_name, data_dir))
  except FileNotFoundError:
    return False


def tag_vocab_path(base_name: str, data_dir: str | None) -> str:
  """The tag vocabulary file (one tag per line) beside the GOD data."""
  return os.path.join(god_dir(base_name, data_dir), god_builder.VOCAB_FILE)


def regions_index_path(base_name: str, split: str, data_dir: str | None) -> str:
  """`regions_<split>.npy`: int64[R, 2] (record index, region index in record)."""
  return os.path.join(god_dir(base_name, data_dir), god_builder.regions_index_file(split))


def _text(value) -> str:
  return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def unflatten(record: dict, *, decode_image: bool = True) -> dict:
  """A raw GOD record (flat ragged fields) -> per-region dicts.

  Returns:
    {"image": uint8[H, W, 3] (bytes if not `decode_image`), "image_id",
    "width", "height" (ints), "regions": [{"id": int, "bbox": float32[4],
    "caption": str, "views": float32[V, 4], "view_distance": int32[V],
    "tag_ids": int32[k]}], "objects": [{"label": str, "bbox": float32[4],
    "score": float}]}.
  """
  reg = record["regions"]
  view_ends = np.cumsum(np.asarray(reg["view_count"], np.int64))
  tag_ends = np.cumsum(np.asarray(reg["tag_count"], np.int64))
  views = np.asarray(record["views"], np.float32).reshape(-1, 4)
  dists = np.asarray(record["view_distance"], np.int32).reshape(-1)
  tag_ids = np.asarray(record["tag_ids"], np.int32).reshape(-1)
  if (view_ends[-1:].sum() != len(views) or view_ends[-1:].sum() != len(dists)
      or tag_ends[-1:].sum() != len(tag_ids)):
    raise ValueError(f"GOD record image_id {record['image_id']}: view/tag counts do not "
                     "match the stored arrays")
  regions = []
  for r in range(len(reg["id"])):
    v0 = view_ends[r - 1] if r else 0
    t0 = tag_ends[r - 1] if r else 0
    regions.append({
        "id": int(reg["id"][r]), "bbox": np.asarray(reg["bbox"][r], np.float32),
        "caption": _text(reg["caption"][r]),
        "views": views[v0:view_ends[r]], "view_distance": dists[v0:view_ends[r]],
        "tag_ids": tag_ids[t0:tag_ends[r]]})
  objects = [{"label": _text(l), "bbox": np.asarray(b, np.float32), "score": float(s)}
             for l, b, s in zip(record["objects"]["label"], record["objects"]["bbox"],
                                record["objects"]["score"])]
  image = god_builder.decode_rgb(record["image"]) if decode_image else record["image"]
  return {"image": image, "image_id": int(record["image_id"]), "width": int(record["width"]),
          "height": int(record["height"]), "regions": regions, "objects": objects}


class GodSource:
  """Random-access GOD records of one split (picklable; opens files lazily).

  Attributes:
    data_dir: the GOD dataset folder.
    split: the split name.
    regions: int64[R, 2] (record index, region index) of every region.
  """

  def __init__(self, base_name: str, split: str, data_dir: str | None, *,
               decode_image: bool = True):
    self._base_name, self._root, self.split = base_name, data_dir, split
    self._decode_image = decode_image
    self.data_dir = god_dir(base_name, data_dir)
    self._source = self._open()
    self.regions = np.load(os.path.join(self.data_dir, god_builder.regions_index_file(split)))

  def _open(self):
    builder = tfds.core.read_only_builder.builder_from_files(god_name(self._base_name),
                                                             data_dir=self._root)
    if self.split not in builder.info.splits:
      raise ValueError(f"{god_name(self._base_name)} has no split '{self.split}' "
                       f"(splits: {sorted(builder.info.splits)})")
    return builder.as_data_source(self.split, decoders={"image": tfds.decode.SkipDecoding()})

  def vocab(self) -> list[str]:
    return tags.load_vocab(os.path.join(self.data_dir, god_builder.VOCAB_FILE))

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, index: int) -> dict:
    return unflatten(self._source[index], decode_image=self._decode_image)

  def __iter__(self):
    for i in range(len(self)):
      yield self[i]

  def __getstate__(self):
    state = dict(self.__dict__)
    state["_source"] = None
    return state

  def __setstate__(self, state):
    self.__dict__.update(state)
    self._source = self._open()


def load_source(base_name: str, split: str, data_dir: str | None, *,
                decode_image: bool = True) -> GodSource:
  """Random-access source of `<base_name>_god` records of `split` (see `unflatten`)."""
  return GodSource(base_name, split, data_dir, decode_image=decode_image)
