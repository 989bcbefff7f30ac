"""`--mode eval` with `eval.protocol = "densecap"`: DenseCap mAP of the latest checkpoint.

Two settings, reported under their own names because published numbers mix them:

- `eval.boxes = "gt"` ("ground-truth boxes", the ControlCap / DynRefer
  setting): every evaluation target (a distinct ground-truth box) is captioned
  and scored by its caption's sequence score (exp of the beam score).
- `eval.boxes = "detections"` ("detected boxes", the GRiT / PixelLLM setting):
  the boxes of `eval.detections_file` (COCO results: `image_id`, `bbox` [x, y,
  w, h], `score`; a plain list or the GOD detections file's `{"detections":
  [...]}`), or, without a file, the GOD records' own objects (on the synthetic
  set its simulated detector; on VG/RefCOCOg the detections GOD was built from,
  which are the annotated objects unless `data.detections_file` was set).
  Each box's score is the detection score (`eval.detection_score =
  "detection"`) or its product with the caption's score (`"detection_x_caption"`).

Ground truth: the regions of `data.eval_split` (the first
`train.eval_max_examples` targets when that is > 0), every caption of a
repeated box a separate region (the metric merges them back at IoU 0.7).
Detections on images outside those targets are not evaluated.

Writes `eval/densecap.json` (map, detmap, the AP grid, the setting, counts) and
`eval/densecap_detections.json` (the captioned boxes that were scored).
"""
from __future__ import annotations

import json
import os
from typing import Any, Sequence

from absl import logging
import flax.linen as nn
import jax
import ml_collections
import numpy as np

from aligncap_jax import evaluate as eval_lib
from aligncap_jax import sharding as shd
from aligncap_jax.metrics import densecap

SETTINGS = {"gt": "ground-truth boxes", "detections": "detected boxes"}


def read_detections(path: str) -> list[dict]:
  """COCO results (`[x, y, w, h]` boxes) -> `{"image_id", "bbox": [x1, y1, x2, y2], "score"}`.

  Raises:
    FileNotFoundError: no such file. ValueError: bad JSON or an entry without
      `image_id`, a 4-number `bbox` with w, h > 0, or a numeric `score` (named).
  """
  if not os.path.isfile(path):
    raise FileNotFoundError(f"eval.detections_file {path}: file not found")
  try:
    with open(path) as f:
      data = json.load(f)
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise ValueError(f"eval.detections_file {path}: not valid JSON ({e})") from e
  if isinstance(data, dict) and "detections" in data:
    data = data["detections"]
  if not isinstance(data, list):
    raise ValueError(f"eval.detections_file {path}: expected a list of COCO results "
                     "(or {'detections': [...]})")
  out = []
  for i, d in enumerate(data):
    try:
      x, y, w, h = (float(v) for v in d["bbox"])
      image_id, score = int(d["image_id"]), float(d["score"])
    except (KeyError, TypeError, ValueError) as e:
      raise ValueError(f"eval.detections_file {path}: entry {i} needs 'image_id', 'bbox' "
                       f"[x, y, w, h] and 'score', got {d!r}") from e
    if not np.all(np.isfinite([x, y, w, h, score])) or w <= 0 or h <= 0:
      raise ValueError(f"eval.detections_file {path}: entry {i} needs finite numbers and "
                       f"w, h > 0, got {d!r}")
    out.append({"image_id": image_id, "bbox": [x, y, x + w, y + h], "score": score})
  return out


def ground_truth(targets: Sequence[dict]) -> list[dict]:
  """Evaluation targets -> one `densecap_map` ground-truth entry per caption."""
  return [{"image_id": int(t["image_id"]), "bbox": list(t["box"]), "caption": ref}
          for t in targets for ref in t["references"]]


class DenseCapEvaluator:
  """Captions the boxes of one setting and scores them: `.run(params) -> dict`.

  Args:
    config: the full config (`config.eval` picks the setting).
    model: the AlignCap module.
    assets: `pipeline.load_assets(config)`.
    mesh: device mesh; batches of `train.eval_batch_size` per device.
    workdir: where `eval/` outputs go (None: nothing written).
    split: data split (default `config.data.eval_split`).
    model_lib, pipeline_lib: module stand-ins for tests.
    meteor: METEOR callable for `densecap_map` (None: the METEOR 1.5 jar).
  """

  def __init__(self, config: ml_collections.ConfigDict, model: nn.Module, assets: Any,
               mesh: jax.sharding.Mesh, *, workdir: str | None = None,
               split: str | None = None, model_lib: Any = None, pipeline_lib: Any = None,
               meteor: densecap.MeteorFn | None = None):
    self.config, self.assets, self.mesh, self.workdir = config, assets, mesh, workdir
    self.split = split or config.data.eval_split
    self.model_lib, self.pipeline = eval_lib.default_libs(model_lib, pipeline_lib)
    self.meteor = meteor
    self.batch_size = shd.global_batch_size(config, mesh, config.train.eval_batch_size)
    self._generate = eval_lib.make_generate(config, model, self.model_lib, mesh)
    self._encode = eval_lib.make_encode_tags(config, model, self.model_lib, mesh)
    self._table = eval_lib.tag_table(assets)

  def _caption(self, params: Any, tag_embeddings: Any, batches) -> list[tuple[str, float]]:
    """(caption, sequence score) per valid row of `batches`, in order."""
    out, tok = [], self.assets.llm_tokenizer
    for batch in batches:
      res = jax.device_get(self._generate(params, eval_lib.put_global_batch(batch, self.mesh),
                                          tag_embeddings, self._table))
      for i in np.flatnonzero(np.asarray(batch["valid"])):
        ids = [int(t) for t in res["tokens"][i]]
        out.append((tok.decode(ids, skip_special_tokens=True).strip(), float(res["scores"][i])))
    return out

  def _detections(self, params, tag_embeddings, targets) -> tuple[list[dict], str]:
    """Captioned, scored boxes of the configured setting, and where the boxes came from."""
    e, c = self.config.eval, self.config
    if e.boxes == "gt":
      batches = self.pipeline.make_eval_iterator(c, self.assets, self.split,
                                                 batch_size=self.batch_size,
                                                 max_examples=c.train.eval_max_examples)
      captions = self._caption(params, tag_embeddings, batches)
      if len(captions) != len(targets):
        raise ValueError(f"split '{self.split}': {len(captions)} decoded regions but "
                         f"{len(targets)} evaluation targets")
      return [{"image_id": int(t["image_id"]), "bbox": list(t["box"]), "caption": cap,
               "score": score, "caption_score": score}
              for t, (cap, score) in zip(targets, captions)], "ground-truth regions"
    boxes = read_detections(e.detections_file) if e.detections_file else None
    source = e.detections_file or f"the objects of {c.data.name}_god (what GOD used)"
    images = {int(t["image_id"]) for t in targets}
    boxes = [b for b in self.pipeline.box_targets(c, self.split, boxes)
             if int(b["image_id"]) in images]
    if not boxes:
      raise ValueError(f"no detected boxes on the {len(images)} evaluated images of split "
                       f"'{self.split}' (boxes from {source})")
    batches = self.pipeline.make_box_iterator(c, self.assets, self.split, boxes,
                                              batch_size=self.batch_size)
    captions = self._caption(params, tag_embeddings, batches)
    if len(captions) != len(boxes):
      raise ValueError(f"{len(captions)} captions for {len(boxes)} detected boxes")
    out = []
    for b, (cap, cap_score) in zip(boxes, captions):
      score = b["score"] * (cap_score if e.detection_score == "detection_x_caption" else 1.0)
      out.append({"image_id": int(b["image_id"]), "bbox": list(b["bbox"]), "caption": cap,
                  "score": float(score), "detection_score": float(b["score"]),
                  "caption_score": cap_score})
    return out, source

  def run(self, params: Any, tag_embeddings: Any | None = None, *,
          step: int | None = None) -> dict[str, Any]:
    """Captions, scores and (with a workdir) writes `eval/densecap.json`.

    Returns:
      `densecap.densecap_map`'s dict plus "setting", "boxes_from", "score",
      "split" and "step".
    """
    if tag_embeddings is None:
      tag_embeddings = self._encode(params, self.assets.tag_clip_tokens,
                                    self.assets.tag_clip_mask)
    e = self.config.eval
    targets = self.pipeline.eval_targets(self.config, self.split,
                                         self.config.train.eval_max_examples)
    detections, source = self._detections(params, tag_embeddings, targets)
    result = densecap.densecap_map(detections, ground_truth(targets),
                                   iou_convention=e.iou_convention, meteor=self.meteor)
    result = {"setting": SETTINGS[e.boxes], "boxes_from": source,
              "score": "caption" if e.boxes == "gt" else e.detection_score,
              "split": self.split, "step": step, **result}
    print(f"DenseCap mAP, {result['setting']}, split {self.split}: mAP "
          f"{100 * result['map']:.2f}, detection mAP {100 * result['detmap']:.2f} "
          f"({result['num_images']} images, {result['num_positives']} merged ground-truth "
          f"boxes, {result['num_detections']} captioned boxes, IoU {e.iou_convention})")
    if self.workdir and jax.process_index() == 0:
      out_dir = os.path.join(self.workdir, "eval")
      os.makedirs(out_dir, exist_ok=True)
      with open(os.path.join(out_dir, "densecap.json"), "w") as f:
        json.dump(result, f, indent=2)
      with open(os.path.join(out_dir, "densecap_detections.json"), "w") as f:
        json.dump(detections, f, indent=1)
      logging.info("wrote %s/densecap.json and densecap_detections.json", out_dir)
    return result


def evaluate(config: ml_collections.ConfigDict, workdir: str, *, model_lib: Any = None,
             pipeline_lib: Any = None, meteor: densecap.MeteorFn | None = None
             ) -> dict[str, Any]:
  """`--mode eval` with `eval.protocol = "densecap"` on the latest checkpoint."""
  mesh, assets, model, params, step = eval_lib.load_for_inference(
      config, workdir, "eval", model_lib=model_lib, pipeline_lib=pipeline_lib)
  evaluator = DenseCapEvaluator(config, model, assets, mesh, workdir=workdir,
                                model_lib=model_lib, pipeline_lib=pipeline_lib, meteor=meteor)
  return evaluator.run(params, step=step)
