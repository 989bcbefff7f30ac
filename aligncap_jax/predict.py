"""`--mode predict`: one caption per box of one image, from the latest checkpoint.

  python -m aligncap_jax.main --config configs/synthetic.py --workdir DIR \
      --mode predict --image photo.jpg --box 10,10,60,60 --box 0,0,30,40

Boxes are pixel `x1,y1,x2,y2`. A box partly outside the image is clipped with a
warning; one wholly outside, of zero area or with x2 <= x1 / y2 <= y1 is an
error, as is a missing or unreadable image or a workdir without a checkpoint.
"""
from __future__ import annotations

import os
from typing import Any, Sequence

import jax
import ml_collections
import numpy as np
from PIL import Image

from aligncap_jax import evaluate as eval_lib


def parse_box(text: str) -> tuple[float, float, float, float]:
  """'x1,y1,x2,y2' -> floats; ValueError naming the box otherwise."""
  parts = text.replace(" ", "").split(",")
  try:
    values = tuple(float(p) for p in parts)
  except ValueError:
    values = ()
  if len(values) != 4 or not all(np.isfinite(values)):
    raise ValueError(f"--box {text!r}: expected four numbers x1,y1,x2,y2")
  return values


def check_image(path: str) -> tuple[int, int]:
  """(width, height) of a readable image; clear errors for missing/corrupt files."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f"--image {path}: file not found")
  try:
    with Image.open(path) as im:
      im.load()
      return im.size
  except (OSError, SyntaxError, ValueError) as e:
    raise ValueError(f"--image {path}: not a readable image ({e})") from e


def check_boxes(boxes: Sequence[Sequence[float]], width: int, height: int
                ) -> tuple[list[list[float]], list[str]]:
  """Clips boxes to the image; errors for empty or wholly outside boxes.

  Returns:
    (clipped boxes, warnings).
  """
  if not boxes:
    raise ValueError("--mode predict needs at least one --box x1,y1,x2,y2")
  out, warnings = [], []
  for i, box in enumerate(boxes):
    x1, y1, x2, y2 = (float(v) for v in box)
    name = f"--box {i + 1} ({x1:g},{y1:g},{x2:g},{y2:g})"
    if x2 <= x1 or y2 <= y1:
      raise ValueError(f"{name}: needs x2 > x1 and y2 > y1 (zero or negative area)")
    c = [min(max(x1, 0.0), width), min(max(y1, 0.0), height),
         min(max(x2, 0.0), width), min(max(y2, 0.0), height)]
    if c[2] <= c[0] or c[3] <= c[1]:
      raise ValueError(f"{name}: lies outside the {width}x{height} image")
    if c != [x1, y1, x2, y2]:
      warnings.append(f"{name}: clipped to the {width}x{height} image -> "
                      f"{','.join(f'{v:g}' for v in c)}")
    out.append(c)
  return out, warnings


def predict(config: ml_collections.ConfigDict, workdir: str, image: str,
            boxes: Sequence[Sequence[float]], detections: str | None = None, *,
            model_lib: Any = None, pipeline_lib: Any = None) -> list[dict[str, Any]]:
  """Prints and returns one `{"box", "caption", "score"}` per box."""
  width, height = check_image(image)
  boxes, warnings = check_boxes(boxes, width, height)
  if detections is not None and not os.path.isfile(detections):
    raise FileNotFoundError(f"--detections {detections}: file not found")
  mesh, assets, model, params, _ = eval_lib.load_for_inference(
      config, workdir, "predict", model_lib=model_lib, pipeline_lib=pipeline_lib)
  model_lib, pipeline_lib = eval_lib.default_libs(model_lib, pipeline_lib)
  batch, more = pipeline_lib.make_predict_batch(config, assets, image, boxes,
                                                detections=detections)
  for w in warnings + list(more):
    print(f"warning: {w}")
  n = len(boxes)
  dp = mesh.shape["data"] * mesh.shape["fsdp"]
  pad = (-n) % dp
  if pad:
    batch = {k: np.concatenate([v, np.repeat(v[-1:], pad, 0)]) for k, v in batch.items()}
  encode = eval_lib.make_encode_tags(config, model, model_lib, mesh)
  tag_emb = encode(params, assets.tag_clip_tokens, assets.tag_clip_mask)
  generate = eval_lib.make_generate(config, model, model_lib, mesh)
  out = jax.device_get(generate(params, eval_lib.put_global_batch(batch, mesh), tag_emb,
                                eval_lib.tag_table(assets)))
  results = []
  for i, box in enumerate(boxes):
    caption = assets.llm_tokenizer.decode([int(t) for t in out["tokens"][i]],
                                          skip_special_tokens=True).strip()
    results.append({"box": box, "caption": caption, "score": float(out["scores"][i])})
    print(f"[{','.join(f'{v:g}' for v in box)}] {caption}")
  return results
