"""`--mode predict`: one caption per box of one image, from the latest checkpoint.

  python -m aligncap_jax.main --config configs/synthetic.py --workdir DIR \
      --mode predict --image photo.jpg --box 10,10,60,60 --box 0,0,30,40 \
      [--detections dets.json]

A thin wrapper over `aligncap_jax.Captioner` (which compiles only the one batch
size this call needs). Boxes are pixel `x1,y1,x2,y2`. A box partly outside the
image is clipped with a warning; one wholly outside, of zero area or with
x2 <= x1 / y2 <= y1 is an error, as is a missing or unreadable image, a
detections file that is not a JSON list of COCO results with a usable `bbox`
each, or a workdir without a checkpoint. All input checks run before the
checkpoint is restored.
"""
from __future__ import annotations

from typing import Any, Sequence

import ml_collections
import numpy as np

from aligncap_jax import captioner as captioner_lib


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


def predict(config: ml_collections.ConfigDict, workdir: str, image: str,
            boxes: Sequence[Sequence[float]], detections: str | None = None, *,
            model_lib: Any = None, pipeline_lib: Any = None) -> list[dict[str, Any]]:
  """Prints and returns one `{"box", "caption", "score", "tags"}` per box.

  Args:
    config: the training config.
    workdir: the training workdir (latest checkpoint) or an export folder.
    image: image file path.
    boxes: pixel boxes x1, y1, x2, y2.
    detections: path of a COCO-results JSON list of this image's detections.
    model_lib, pipeline_lib: module stand-ins for tests.
  """
  if not boxes:
    raise ValueError("--mode predict needs at least one --box x1,y1,x2,y2")
  labels = captioner_lib.CLI_LABELS
  pixels = captioner_lib.load_image(image, labels["image"])
  captioner_lib.check_boxes(boxes, pixels.shape[1], pixels.shape[0], labels["box"])
  dets = None if detections is None else captioner_lib.read_detections(detections)
  captioner = captioner_lib.Captioner.load(workdir, config, batch_sizes=[len(boxes)],
                                           mode="predict", model_lib=model_lib,
                                           pipeline_lib=pipeline_lib)
  prepared = captioner.prepare(image, boxes, dets, labels=labels)
  for w in prepared.warnings:
    print(f"warning: {w}")
  results = [{"box": box, **out} for box, out in
             zip(prepared.boxes, captioner.run(prepared.rows))]
  for r in results:
    tags = f"  [tags: {', '.join(r['tags'])}]" if r["tags"] else ""
    print(f"[{','.join(f'{v:g}' for v in r['box'])}] {r['caption']}{tags}")
  return results
