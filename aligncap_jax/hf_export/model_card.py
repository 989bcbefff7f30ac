"""The README.md model card of an exported AlignCap folder."""
from __future__ import annotations

from typing import Any

import ml_collections

DATASETS = {
    "visual_genome_regions": "Visual Genome v1.2 region descriptions",
    "refcocog_regions": "RefCOCOg (umd split) referring expressions",
    "synthetic_regions": "the embedded synthetic region-caption dataset (procedural shapes)",
}


def _flat_metrics(metrics: Any, prefix: str = "") -> list[tuple[str, float]]:
  rows = []
  if isinstance(metrics, dict):
    for k in sorted(metrics):
      rows.extend(_flat_metrics(metrics[k], f"{prefix}{k}/"))
  elif isinstance(metrics, (int, float)) and not isinstance(metrics, bool):
    rows.append((prefix.rstrip("/"), float(metrics)))
  return rows


def render(config: ml_collections.ConfigDict, *, num_tags: int, step: int | None,
           metrics: dict | None, weight_files: list[str], total_params: int,
           trainable_params: int) -> str:
  """Markdown model card: architecture, training data, metrics, use, limitations."""
  m, d, t = config.model, config.data, config.train
  data_name = DATASETS.get(d.name, d.name)
  length = (f"{t.total_steps} steps" if t.total_steps else f"{t.total_epochs:g} epochs")
  metric_rows = _flat_metrics(metrics or {})
  qformer_trained = ("trainable, query tokens included" if m.train_query_tokens
                     else "trainable except the query tokens")
  if metric_rows:
    metric_md = "| metric | value |\n|---|---|\n" + "".join(
        f"| {k} | {v:.4f} |\n" for k, v in metric_rows)
  else:
    metric_md = "No evaluation metrics were found (`WORKDIR/eval/metrics.json`); run `--mode eval`.\n"
  return f"""---
library_name: aligncap_jax
tags:
- region-captioning
- jax
- flax
- aligncap
---
# AlignCap ({m.vision.family} ViT + {m.llm.family} LLM), trained on {d.name}

A region-level captioning model: given an image and a box, it writes a caption of
what is in the box. JAX/Flax reimplementation of AlignCap (arXiv 2412.10348),
exported from `aligncap_jax`{f" at step {step}" if step is not None else ""}.

## Architecture
- Frozen image encoder: {m.vision.family} ViT, {m.vision.num_layers} layers, width
  {m.vision.hidden_size}, patch {m.vision.patch_size}, {d.view_size} px views; RoI-align of
  the target box to {m.roi_output_size}x{m.roi_output_size} in each of {d.num_views} views
  (target + GOD context views).
- Spatial cross-view block and view fusion (trainable).
- Q-Former sampler: {m.qformer.num_layers} layers, width {m.qformer.hidden_size},
  {m.qformer.num_query_tokens} query tokens ({qformer_trained}).
- Tagging head over {num_tags} tags embedded by a frozen CLIP text tower
  ({m.clip_text.num_layers} layers, width {m.clip_text.hidden_size}); inference prompt
  = tags with sigmoid > {m.tag_threshold}.
- Latent feature refinement (L_cond) and semantic space alignment (L_multi) with
  pairwise sigmoid losses ({m.similarity} scorer).
- Frozen LLM: {m.llm.family}, d_model {m.llm.d_model}, {m.llm.num_layers} layers, vocabulary
  {m.llm.vocab_size}.
- Parameters: {total_params:,} in total, {trainable_params:,} trained.
- Weights: {", ".join(f"`{f}`" for f in weight_files)} (dotted Flax parameter paths).

## Training data
{data_name} (`{d.name}`), {length}, {t.per_device_batch_size} regions per device,
AdamW lr {config.optim.learning_rate:g}, weight decay {config.optim.weight_decay:g},
{config.optim.schedule} schedule. Loss weights: tag {config.loss.alpha:g}, caption
{config.loss.beta:g}, L_cond {config.loss.gamma:g}, L_multi {config.loss.lambda_:g}.

## Evaluation
{metric_md}
Decoding: beam {config.decode.num_beams}, at most {config.decode.max_new_tokens} new tokens,
repetition penalty {config.decode.repetition_penalty:g}.

## Intended use
Research on region-level captioning and dense captioning: describing a given box
in a natural image, as a component of grounding or detection pipelines.

## Limitations
- Captions reflect the training data's vocabulary, style and biases (short region
  phrases); the model is not a general-purpose image describer.
- The box is given, not found: pair it with a detector for dense captioning.
- Frozen backbones bound what it can recognise; tags below the threshold are not
  used in the prompt, and wrong tags can steer the caption.
- Not evaluated for safety-critical use or for describing people's identities.

## Use
```python
from aligncap_jax import hf_export
config, params, assets = hf_export.load("path/to/this/folder")
```
or `python -m aligncap_jax.main --mode predict --config.init.hf=path/to/this/folder ...`;
training from it: `--config.init.hf=path/to/this/folder`.
"""
