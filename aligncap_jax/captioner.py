"""`Captioner`: one loaded AlignCap behind the CLI, the Python API and the HTTP service.

  from aligncap_jax import Captioner
  captioner = Captioner.load("workdirs/synthetic", "configs/synthetic.py")  # or an export
  for r in captioner.caption("photo.png", [[10, 10, 60, 60], [0, 0, 40, 80]]):
    print(r["box"], r["caption"], r["score"], r["tags"])

`load` restores the parameters once on the available devices, embeds the tag
vocabulary once, and compiles the decoder once per padded batch bucket (dp x 2^k
regions up to `serve.max_batch`, dp = the data-parallel devices, rounded up to a
multiple of dp): a call never compiles, it pads its regions to the smallest
bucket that holds them (larger sets go in several device batches).

Inputs: an image path, PIL image, uint8 array or encoded bytes; pixel boxes
`x1, y1, x2, y2` (a box partly outside the image is clipped with a warning, one
wholly outside or of zero area is an error); optional detections of this image
in COCO results format (`bbox` x, y, w, h; `score`; `label`, `category_name` or
`category_id`) for GOD's context views. Bad inputs raise `InputError` (a
ValueError) naming the field, or FileNotFoundError for a missing file.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Iterable, Sequence

from absl import logging
import jax
import ml_collections
import numpy as np
from PIL import Image

from aligncap_jax import evaluate as eval_lib
from aligncap_jax import sharding as shd

# How the Python API and the HTTP service name inputs in errors; the CLI names flags.
API_LABELS = {"image": "image", "box": "boxes[{i}]", "detections": "detections"}
CLI_LABELS = {"image": "--image", "box": "--box {n}", "detections": "--detections"}


class InputError(ValueError):
  """A bad image, box list or detection list; `field` is the input it concerns."""

  def __init__(self, field: str, message: str):
    super().__init__(message)
    self.field = field


@dataclasses.dataclass
class Prepared:
  """One image's regions, ready for the device.

  Attributes:
    rows: the batch contract's arrays, leading axis = one row per box.
    boxes: the boxes after clipping, `[x1, y1, x2, y2]` floats, in input order.
    warnings: clipped boxes, missing detections.
  """
  rows: dict[str, np.ndarray]
  boxes: list[list[float]]
  warnings: list[str]


# ------------------------------------------------------------------ input checks


def load_image(image: Any, label: str = "image") -> np.ndarray:
  """uint8[H, W, 3] of a path, PIL image, uint8 array or encoded image bytes.

  Raises:
    FileNotFoundError: a path that does not exist.
    InputError: anything that does not decode to an image.
  """
  if isinstance(image, (str, os.PathLike)):
    path = os.fspath(image)
    if not os.path.isfile(path):
      raise FileNotFoundError(f"{label} {path}: file not found")
    try:
      with Image.open(path) as im:
        im.load()
        return _rgb(im)
    except (OSError, SyntaxError, ValueError) as e:
      raise InputError("image", f"{label} {path}: not a readable image ({e})") from e
  if isinstance(image, Image.Image):
    return _rgb(image)
  from aligncap_jax.data import transforms  # pylint: disable=g-import-not-at-top
  if isinstance(image, (bytes, bytearray, memoryview)):
    try:
      return transforms.decode_image(image, name=label)
    except ValueError as e:
      raise InputError("image", f"{label}: not a readable image ({e.__cause__ or e})") from e
  if isinstance(image, np.ndarray):
    try:
      return transforms.decode_image(image, name=label)
    except ValueError as e:
      raise InputError("image", str(e)) from e
  raise InputError("image", f"{label}: expected a path, PIL image, uint8 array or image bytes, "
                            f"got {type(image).__name__}")


def _rgb(im: Image.Image) -> np.ndarray:
  from aligncap_jax.data import transforms  # pylint: disable=g-import-not-at-top
  return np.asarray(transforms.to_rgb(im))


def check_boxes(boxes: Any, width: int, height: int, label: str = API_LABELS["box"]
                ) -> tuple[list[list[float]], list[str]]:
  """Clips pixel boxes to the image; errors for malformed, empty or outside boxes.

  Args:
    boxes: a sequence of `[x1, y1, x2, y2]`.
    width, height: the image size.
    label: how to name box i in messages (`{i}` from 0, `{n}` from 1).

  Returns:
    (clipped boxes, warnings).
  """
  if isinstance(boxes, (str, bytes, dict)) or not isinstance(boxes, (Sequence, np.ndarray)):
    raise InputError("boxes", f"boxes: expected a list of [x1, y1, x2, y2], got "
                              f"{type(boxes).__name__}")
  if len(boxes) == 0:
    raise InputError("boxes", "boxes: needs at least one box [x1, y1, x2, y2]")
  out, warnings = [], []
  for i, box in enumerate(boxes):
    name = label.format(i=i, n=i + 1)
    try:
      values = [float(v) for v in box]
      if isinstance(box, (str, bytes)) or len(values) != 4 or not np.all(np.isfinite(values)):
        raise ValueError
    except (TypeError, ValueError):
      raise InputError("boxes", f"{name}: expected four finite numbers x1, y1, x2, y2, "
                                f"got {box!r}") from None
    x1, y1, x2, y2 = values
    name = f"{name} ({x1:g},{y1:g},{x2:g},{y2:g})"
    if x2 <= x1 or y2 <= y1:
      raise InputError("boxes", f"{name}: needs x2 > x1 and y2 > y1 (zero or negative area)")
    c = [min(max(x1, 0.0), width), min(max(y1, 0.0), height),
         min(max(x2, 0.0), width), min(max(y2, 0.0), height)]
    if c[2] <= c[0] or c[3] <= c[1]:
      raise InputError("boxes", f"{name}: lies outside the {width}x{height} image")
    if c != values:
      warnings.append(f"{name}: clipped to the {width}x{height} image -> "
                      f"{','.join(f'{v:g}' for v in c)}")
    out.append(c)
  return out, warnings


def check_detections(detections: Any, label: str = API_LABELS["detections"],
                     entry: str = "{name}[{i}]") -> list[dict]:
  """Validates COCO-results detections (the list itself and every entry's `bbox`).

  Returns:
    The list unchanged.
  """
  from aligncap_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  try:
    pipeline.detections_to_objects(detections, name=label, entry=entry)
  except ValueError as e:
    raise InputError("detections", str(e)) from e
  return list(detections)


def read_detections(path: str) -> list[dict]:
  """The detections of one image from a COCO results JSON file (`--detections`).

  Raises:
    FileNotFoundError: no such file.
    InputError: not JSON, not a list, or an entry without a usable `bbox`; one
      line naming the file and the entry.
  """
  label = f"--detections {path}"
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{label}: file not found")
  try:
    with open(path, encoding="utf-8") as f:
      doc = json.load(f)
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise InputError("detections", f"{label}: not a JSON file ({e})") from e
  if not isinstance(doc, list):
    raise InputError("detections", f"{label}: expected a JSON list of COCO-results "
                                   f"detections, got a JSON {type(doc).__name__}")
  return check_detections(doc, label, entry="{name}: entry {i}")


def config_from_file(spec: str) -> ml_collections.ConfigDict:
  """`get_config(arg)` of a config file `path/NAME.py[:arg]`, validated."""
  import importlib.util  # pylint: disable=g-import-not-at-top
  from aligncap_jax import config as config_lib  # pylint: disable=g-import-not-at-top
  path, _, arg = spec.partition(":")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"config file {path}: file not found")
  module_spec = importlib.util.spec_from_file_location("aligncap_user_config", path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  config = module.get_config(arg or None)
  config_lib.validate(config)
  return config


def default_batch_sizes(max_batch: int) -> list[int]:
  """1, 2, 4, ... below `max_batch`, then `max_batch` (before rounding up to dp)."""
  sizes, b = [], 1
  while b < max_batch:
    sizes.append(b)
    b *= 2
  return sizes + [max_batch]


# ------------------------------------------------------------------ the model


class Captioner:
  """A restored, compiled AlignCap that captions boxes of images.

  Build it with `Captioner.load`. Thread-safe: several threads may call it (the
  HTTP service's batcher does, from one thread).

  Attributes:
    config: the model's config (for an export folder: the folder's own).
    buckets: the compiled batch sizes, ascending.
    assets: tokenizers and tag vocabulary.
  """

  def __init__(self, config: ml_collections.ConfigDict, model: Any, params: Any, assets: Any,
               mesh: jax.sharding.Mesh, *, batch_sizes: Sequence[int] | None = None,
               model_lib: Any = None, pipeline_lib: Any = None):
    self.config, self.model, self.params, self.assets, self.mesh = (
        config, model, params, assets, mesh)
    self._model_lib, self._pipeline = eval_lib.default_libs(model_lib, pipeline_lib)
    dp = shd.data_parallel_size(mesh)
    sizes = batch_sizes or default_batch_sizes(config.serve.max_batch)
    self.buckets = sorted({-(-int(b) // dp) * dp for b in sizes})
    encode = eval_lib.make_encode_tags(config, model, self._model_lib, mesh)
    self._tag_emb = encode(params, assets.tag_clip_tokens, assets.tag_clip_mask)
    self._table = jax.device_put(eval_lib.tag_table(assets), shd.replicated(mesh))
    self._dtypes = {k: v.dtype for k, v in
                    self._model_lib.dummy_batch(config, 1, len(assets.tag_vocab)).items()}
    generate = eval_lib.make_generate(config, model, self._model_lib, mesh)
    self._compiled = {}
    for b in self.buckets:
      dummy = self._model_lib.dummy_batch(config, b, len(assets.tag_vocab))
      self._compiled[b] = generate.lower(params, eval_lib.put_global_batch(dummy, mesh),
                                         self._tag_emb, self._table).compile()
    logging.info("Captioner: compiled batch buckets %s on %d devices", self.buckets,
                 mesh.devices.size)

  @classmethod
  def load(cls, path: str, config: ml_collections.ConfigDict | str | None = None, *,
           batch_sizes: Sequence[int] | None = None, mode: str = "predict",
           model_lib: Any = None, pipeline_lib: Any = None) -> Captioner:
    """Restores a training workdir (latest checkpoint) or an `--mode export` folder.

    Args:
      path: a training workdir, or a folder written by `--mode export`.
      config: the training config, or its file `configs/NAME.py[:arg]` (needed
        for a workdir). For an export folder the model comes from the folder's
        own config; `config`, if given, only supplies the runtime sections
        `decode` and `serve`.
      batch_sizes: regions per compiled device batch (default
        `default_batch_sizes(config.serve.max_batch)`), each rounded up to a
        multiple of the data-parallel devices.
      mode: the command named in "needs a trained checkpoint" errors.
      model_lib, pipeline_lib: module stand-ins for tests.

    Raises:
      FileNotFoundError: no such folder or no checkpoint in it.
      ValueError: a workdir without `config`, or a config that does not match.
    """
    from aligncap_jax import hf_export  # pylint: disable=g-import-not-at-top
    path = os.path.abspath(os.path.expanduser(path))   # orbax needs absolute paths
    if isinstance(config, str):
      config = config_from_file(config)
    if os.path.isfile(os.path.join(path, hf_export.folder.CONFIG_FILE)):
      model_config, _ = hf_export.read_config(path)
      if config is not None:
        model_config.decode = config.decode
        model_config.serve = config.serve
      return cls._from_export(path, model_config, batch_sizes, model_lib, pipeline_lib)
    if config is None:
      raise ValueError(f"{path}: a training workdir needs its config "
                       "(Captioner.load(path, config)); an export folder carries its own")
    mesh, assets, model, params, _ = eval_lib.load_for_inference(
        config, path, mode, model_lib=model_lib, pipeline_lib=pipeline_lib)
    return cls(config, model, params, assets, mesh, batch_sizes=batch_sizes,
               model_lib=model_lib, pipeline_lib=pipeline_lib)

  @classmethod
  def _from_export(cls, path, config, batch_sizes, model_lib, pipeline_lib) -> Captioner:
    from aligncap_jax import hf_export  # pylint: disable=g-import-not-at-top
    from aligncap_jax import train_state  # pylint: disable=g-import-not-at-top
    model_lib, _ = eval_lib.default_libs(model_lib, pipeline_lib)
    assets = hf_export.load_assets(path, config)
    mesh = shd.make_mesh(config)
    model = model_lib.build_model(config, len(assets.tag_vocab))
    factory = train_state.StateFactory(config, model, mesh, len(assets.tag_vocab), steps=1,
                                       model_lib=model_lib)
    params = hf_export.load_params(path, factory.abstract_state.params,
                                   factory.state_shardings.params)
    logging.info("Captioner: loaded export folder %s", path)
    return cls(config, model, params, assets, mesh, batch_sizes=batch_sizes,
               model_lib=model_lib, pipeline_lib=pipeline_lib)

  # ---------------------------------------------------------------- host side

  def prepare(self, image: Any, boxes: Any, detections: Any = None, *,
              labels: dict[str, str] | None = None) -> Prepared:
    """Checks the inputs and builds one batch row per box (crops, GOD views).

    Args:
      image: a path, PIL image, uint8 array or encoded image bytes.
      boxes: pixel boxes `[[x1, y1, x2, y2], ...]`.
      detections: COCO-results detections of this image, or None (every view is
        then the target box, with a warning).
      labels: names of the inputs in errors (`API_LABELS` or `CLI_LABELS`).
    """
    labels = labels or API_LABELS
    pixels = load_image(image, labels["image"])
    h, w = pixels.shape[:2]
    clipped, warnings = check_boxes(boxes, w, h, labels["box"])
    if detections is not None:
      check_detections(detections, labels["detections"])
    source = image if isinstance(image, (str, os.PathLike)) else pixels
    rows, more = self._pipeline.make_predict_batch(self.config, self.assets, source, clipped,
                                                   detections=detections)
    return Prepared(rows=rows, boxes=clipped, warnings=warnings + list(more))

  def _decode(self, out: dict[str, np.ndarray], i: int) -> dict[str, Any]:
    ids = [int(t) for t in out["tokens"][i]]
    probs = np.asarray(out["tag_probs"][i])
    order = np.argsort(-probs, kind="stable")
    tags = [self.assets.tag_vocab[k] for k in order
            if probs[k] > self.config.model.tag_threshold]
    return {"caption": self.assets.llm_tokenizer.decode(ids, skip_special_tokens=True).strip(),
            "score": float(out["scores"][i]), "tags": tags}

  # ---------------------------------------------------------------- device side

  def run(self, rows: dict[str, np.ndarray], max_rows: int | None = None
          ) -> list[dict[str, Any]]:
    """Captions batch rows: one `{"caption", "score", "tags"}` per row, in order.

    Rows go to the device in batches of at most `max_rows` (default: the largest
    bucket), each padded to the smallest compiled bucket that holds it.
    """
    n = len(rows["views"])
    step = min(max_rows or self.buckets[-1], self.buckets[-1])
    results = []
    for lo in range(0, n, step):
      chunk = {k: np.asarray(rows[k][lo:lo + step], dt) for k, dt in self._dtypes.items()}
      m = len(chunk["views"])
      size = next(b for b in self.buckets if b >= m)
      if size > m:
        pad = {k: np.repeat(v[-1:], size - m, 0) for k, v in chunk.items()}
        pad["valid"] = np.zeros_like(pad["valid"])
        chunk = {k: np.concatenate([chunk[k], pad[k]]) for k in chunk}
      out = jax.device_get(self._compiled[size](
          self.params, eval_lib.put_global_batch(chunk, self.mesh), self._tag_emb,
          self._table))
      results.extend(self._decode(out, i) for i in range(m))
    return results

  # ---------------------------------------------------------------- API

  def caption(self, image: Any, boxes: Any, detections: Any = None) -> list[dict[str, Any]]:
    """One `{"box", "caption", "score", "tags"}` per box, in box order.

    Args:
      image: a path, PIL image, uint8 array or encoded image bytes.
      boxes: pixel boxes `[[x1, y1, x2, y2], ...]`; returned clipped to the image.
      detections: optional COCO-results detections of this image (context views).
    """
    return self.caption_many([(image, boxes, detections)])[0]

  def caption_many(self, requests: Iterable[Any]) -> list[list[dict[str, Any]]]:
    """Captions several images' boxes together, in shared device batches.

    Args:
      requests: `(image, boxes)` or `(image, boxes, detections)` tuples, or dicts
        with keys `image`, `boxes` and optionally `detections`.

    Returns:
      For each request, what `caption` returns for it.
    """
    prepared = []
    for r in requests:
      if isinstance(r, dict):
        image, boxes, detections = r["image"], r["boxes"], r.get("detections")
      else:
        image, boxes, detections = (tuple(r) + (None,))[:3]
      p = self.prepare(image, boxes, detections)
      for w in p.warnings:
        logging.warning("%s", w)
      prepared.append(p)
    if not prepared:
      return []
    rows = {k: np.concatenate([p.rows[k] for p in prepared]) for k in prepared[0].rows}
    outs = iter(self.run(rows))
    return [[{"box": box, **next(outs)} for box in p.boxes] for p in prepared]
