"""Caption evaluation: beam search on the eval split, COCO caption metrics.

`Evaluator(config, model, assets, mesh).run(params) -> dict` decodes every
region of `config.data.eval_split` with the batched beam search (padded last
batch masked, never dropped), scores BLEU-4, METEOR, ROUGE-L and CIDEr with
pycocoevalcap (x100, as papers report them) and, given a workdir, writes
`eval/metrics.json`, `eval/predictions.json` and `eval/examples.png`.
`evaluate(config, workdir)` is `--mode eval`: restore the latest checkpoint,
run the evaluator, print the table.
"""
from __future__ import annotations

import functools
import json
import os
import re
import string
import threading
from typing import Any, Sequence

from absl import logging
import flax.linen as nn
import jax
import ml_collections
import numpy as np

from aligncap_jax import checkpoint as ckpt_lib
from aligncap_jax import sharding as shd

METRIC_NAMES = ("Bleu_4", "METEOR", "ROUGE_L", "CIDEr")
_PUNCT = re.compile("[" + re.escape(string.punctuation) + "]")


def default_libs(model_lib: Any = None, pipeline_lib: Any = None) -> tuple[Any, Any]:
  """The model and data pipeline modules (stand-ins may be passed in tests)."""
  if model_lib is None:
    from aligncap_jax.models import aligncap as model_lib  # pylint: disable=g-import-not-at-top
  if pipeline_lib is None:
    from aligncap_jax.data import pipeline as pipeline_lib  # pylint: disable=g-import-not-at-top
  return model_lib, pipeline_lib


def prepare_data(config: ml_collections.ConfigDict, pipeline_lib: Any) -> None:
  """Builds the synthetic dataset when missing (process 0), then syncs processes.

  Real datasets are only checked: a missing one is a FileNotFoundError saying to
  run `--mode prepare`.
  """
  if jax.process_index() == 0:
    pipeline_lib.prepare(config)
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    multihost_utils.sync_global_devices("aligncap_prepare")


def simple_tokenize(text: str) -> str:
  """Lowercase, punctuation removed, whitespace collapsed (PTB fallback)."""
  return " ".join(_PUNCT.sub(" ", text.lower()).split())


def _tokenize(captions: dict[int, list[str]]) -> dict[int, list[str]]:
  try:
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer  # pylint: disable=g-import-not-at-top
    return PTBTokenizer().tokenize({k: [{"caption": c} for c in v] for k, v in captions.items()})
  except Exception as e:  # Java missing or broken: documented fallback.
    print(f"PTBTokenizer failed ({type(e).__name__}: {e}); using the simple lowercase/"
          f"punctuation tokeniser instead")
    return {k: [simple_tokenize(c) for c in v] for k, v in captions.items()}


# One METEOR scorer per process: its JVM takes about 7 s to load the paraphrase
# tables, which every evaluation would pay again with a new scorer.
_METEOR_LOCK = threading.Lock()


@functools.lru_cache(maxsize=None)
def _meteor_scorer():
  from aligncap_jax.metrics import densecap  # pylint: disable=g-import-not-at-top
  return densecap.MeteorScorer()


def _meteor_score(gts: dict[int, list[str]], res: dict[int, list[str]]) -> float:
  """pycocoevalcap's METEOR of tokenised captions, through the process's scorer
  (`metrics.densecap.MeteorScorer`: restarted after a failure or an exited JVM)."""
  with _METEOR_LOCK:
    return _meteor_scorer().corpus_score(gts, res)


def caption_metrics(references: Sequence[Sequence[str]],
                    predictions: Sequence[str]) -> dict[str, float]:
  """BLEU-4, METEOR, ROUGE-L, CIDEr (x100) of `predictions` against `references`.

  Args:
    references: one list of reference captions per target.
    predictions: one predicted caption per target.

  Returns:
    {"Bleu_4", "METEOR", "ROUGE_L", "CIDEr"} -> float, scaled x100.
  """
  from pycocoevalcap.bleu.bleu import Bleu  # pylint: disable=g-import-not-at-top
  from pycocoevalcap.cider.cider import Cider  # pylint: disable=g-import-not-at-top
  from pycocoevalcap.rouge.rouge import Rouge  # pylint: disable=g-import-not-at-top
  if len(references) != len(predictions):
    raise ValueError(f"{len(predictions)} predictions for {len(references)} targets")
  if not predictions:
    raise ValueError("no evaluation targets: the eval split is empty")
  gts = _tokenize({i: list(r) for i, r in enumerate(references)})
  res = _tokenize({i: [p] for i, p in enumerate(predictions)})
  out = {"Bleu_4": Bleu(4).compute_score(gts, res, verbose=0)[0][3]}
  try:
    out["METEOR"] = _meteor_score(gts, res)
  except Exception as e:  # METEOR needs Java.
    print(f"METEOR failed ({type(e).__name__}: {e}); reported as NaN")
    out["METEOR"] = float("nan")
  out["ROUGE_L"] = Rouge().compute_score(gts, res)[0]
  out["CIDEr"] = Cider().compute_score(gts, res)[0]
  print("SPICE skipped: it needs Stanford CoreNLP models that cannot be downloaded here")
  return {k: 100.0 * float(out[k]) for k in METRIC_NAMES}


def format_table(metrics: dict[str, float], title: str = "eval") -> str:
  head = " | ".join(f"{k:>8}" for k in METRIC_NAMES)
  vals = " | ".join(f"{metrics[k]:8.2f}" for k in METRIC_NAMES)
  return f"{title}\n{head}\n{vals}"


def tag_table(assets: Any) -> dict[str, np.ndarray]:
  """The pre-tokenised tag table that `generate` builds prompts from."""
  return {"tokens": np.asarray(assets.tag_token_table, np.int32),
          "lens": np.asarray(assets.tag_token_lens, np.int32),
          "comma_id": np.int32(assets.comma_id), "bar_id": np.int32(assets.bar_id),
          "eos_id": np.int32(assets.eos_id)}


def make_encode_tags(config: ml_collections.ConfigDict, model: nn.Module, model_lib: Any,
                     mesh: jax.sharding.Mesh):
  """Jitted `params -> float32[V, Dclip]` frozen CLIP text embeddings of the tags.

  Traced under `jax.set_mesh(mesh)` with the config's logical axis rules, so
  the tower's activation constraints apply.
  """
  rules = shd.logical_rules(config)

  @functools.partial(jax.jit, out_shardings=shd.replicated(mesh))
  def encode(params, tokens, mask):
    with nn.logical_axis_rules(rules):
      return model.apply({"params": params}, tokens, mask,
                         method=model_lib.AlignCap.encode_tags)

  return shd.MeshBound(encode, mesh)


def make_generate(config: ml_collections.ConfigDict, model: nn.Module, model_lib: Any,
                  mesh: jax.sharding.Mesh):
  """Jitted `(params, batch, tag_embeddings, tag_table) -> {tokens, scores, tag_probs}`.

  Traced under `jax.set_mesh(mesh)` with the config's logical axis rules.
  """
  d = config.decode
  rules = shd.logical_rules(config)

  @functools.partial(jax.jit, out_shardings=shd.replicated(mesh))
  def generate(params, batch, tag_embeddings, table):
    with nn.logical_axis_rules(rules):
      return model.apply({"params": params}, batch, tag_embeddings, table,
                         method=model_lib.AlignCap.generate, num_beams=d.num_beams,
                         max_new_tokens=d.max_new_tokens, min_length=d.min_length,
                         length_penalty=d.length_penalty,
                         repetition_penalty=d.repetition_penalty,
                         contrastive_alpha=d.contrastive_alpha)

  return shd.MeshBound(generate, mesh)


def put_global_batch(batch: dict[str, np.ndarray], mesh: jax.sharding.Mesh) -> dict:
  """Places a batch that every process holds whole: each takes its own rows."""
  n = next(iter(batch.values())).shape[0]
  per = n // jax.process_count()
  lo = per * jax.process_index()
  return shd.put_batch({k: v[lo:lo + per] for k, v in batch.items()}, mesh)


class Evaluator:
  """Decodes the eval split and scores it: `Evaluator(...).run(params) -> dict`.

  Args:
    config: the full config.
    model: the AlignCap module.
    assets: `pipeline.load_assets(config)`.
    mesh: device mesh; the eval batch is `train.eval_batch_size` per device.
    workdir: where `eval/` outputs go (None: nothing written).
    split: data split (default `config.data.eval_split`).
    model_lib, pipeline_lib: module stand-ins for tests.
  """

  def __init__(self, config: ml_collections.ConfigDict, model: nn.Module, assets: Any,
               mesh: jax.sharding.Mesh, *, workdir: str | None = None,
               split: str | None = None, model_lib: Any = None, pipeline_lib: Any = None):
    self.config, self.model, self.assets, self.mesh = config, model, assets, mesh
    self.workdir = workdir
    self.split = split or config.data.eval_split
    self.model_lib, self.pipeline = default_libs(model_lib, pipeline_lib)
    self.batch_size = shd.global_batch_size(config, mesh, config.train.eval_batch_size)
    self._generate = make_generate(config, model, self.model_lib, mesh)
    self._encode = make_encode_tags(config, model, self.model_lib, mesh)
    self._table = tag_table(assets)

  def decode(self, params: Any, tag_embeddings: Any) -> list[dict[str, Any]]:
    """One `{"caption", "score", "tokens"}` per valid region, in split order."""
    out = []
    it = self.pipeline.make_eval_iterator(
        self.config, self.assets, self.split, batch_size=self.batch_size,
        max_examples=self.config.train.eval_max_examples)
    tok = self.assets.llm_tokenizer
    for batch in it:
      res = jax.device_get(self._generate(params, put_global_batch(batch, self.mesh),
                                          tag_embeddings, self._table))
      for i in np.flatnonzero(np.asarray(batch["valid"])):
        ids = [int(t) for t in res["tokens"][i]]
        out.append({"caption": tok.decode(ids, skip_special_tokens=True).strip(),
                    "score": float(res["scores"][i]),
                    "views": batch["views"][i], "view_boxes": batch["view_boxes"][i]})
    return out

  def run(self, params: Any, tag_embeddings: Any | None = None, *,
          step: int | None = None) -> dict[str, float]:
    """Decodes, scores and (with a workdir) writes the eval outputs.

    Args:
      params: model parameters (sharded or not).
      tag_embeddings: float32[V, Dclip]; computed from `params` when None.
      step: training step, recorded in metrics.json.

    Returns:
      {"Bleu_4", "METEOR", "ROUGE_L", "CIDEr"} x100; on synthetic data also the
      per-attribute fractions of `aligncap_jax.metrics.attributes` (in [0, 1]).
    """
    if tag_embeddings is None:
      tag_embeddings = self._encode(params, self.assets.tag_clip_tokens,
                                    self.assets.tag_clip_mask)
    decoded = self.decode(params, tag_embeddings)
    targets = self.pipeline.eval_targets(self.config, self.split,
                                         self.config.train.eval_max_examples)
    if len(targets) != len(decoded):
      raise ValueError(f"split '{self.split}': {len(decoded)} decoded regions but "
                       f"{len(targets)} evaluation targets")
    metrics = caption_metrics([t["references"] for t in targets],
                              [d["caption"] for d in decoded])
    print(format_table(metrics, f"{self.split} split, {len(targets)} regions"
                       + (f", step {step}" if step is not None else "")))
    if self.config.data.name.startswith("synthetic"):
      # Synthetic captions follow one grammar: score the target and context halves.
      from aligncap_jax.metrics import attributes  # pylint: disable=g-import-not-at-top
      refs = [t["references"] for t in targets]
      grammar = attributes.grammar_for(self.config.data.name)
      if all(attributes.parse_caption(r, grammar) for rs in refs for r in rs):
        attrs = attributes.attribute_accuracy([d["caption"] for d in decoded], refs, grammar)
        if getattr(self.pipeline, "__name__", "") == "aligncap_jax.data.pipeline":
          # What the selected views can show at all bounds the context half.
          # It depends on the data alone: computed once per Evaluator, not per eval.
          if getattr(self, "_context_reach", None) is None:
            from aligncap_jax.data import context_reach  # pylint: disable=g-import-not-at-top
            self._context_reach = context_reach.context_reach(
                self.config, self.split, self.config.train.eval_max_examples)
          attrs.update(self._context_reach)
        metrics = {**metrics, **attrs}
        print("attributes: " + ", ".join(f"{k.replace('attr_', '')} {v:.3f}"
                                         for k, v in attrs.items()))
      else:
        logging.warning("split '%s': references are not in the synthetic grammar; "
                        "no per-attribute accuracy", self.split)
    if self.workdir and jax.process_index() == 0:
      self._write(metrics, targets, decoded, step)
    return metrics

  def _write(self, metrics, targets, decoded, step):
    out_dir = os.path.join(self.workdir, "eval")
    os.makedirs(out_dir, exist_ok=True)
    preds = [{"image_id": int(t["image_id"]), "region_id": int(t["region_id"]),
              "box": [float(v) for v in t["box"]], "caption": d["caption"],
              "score": d["score"], "references": list(t["references"])}
             for t, d in zip(targets, decoded)]
    with open(os.path.join(out_dir, "metrics.json"), "w") as f:
      json.dump(dict(metrics), f, indent=2)
    with open(os.path.join(out_dir, "predictions.json"), "w") as f:
      json.dump(preds, f, indent=1)
    if step is not None:
      with open(os.path.join(out_dir, "history.jsonl"), "a") as f:
        f.write(json.dumps({"step": int(step), **metrics}) + "\n")
    examples_grid(os.path.join(out_dir, "examples.png"), preds, decoded)
    logging.info("wrote %s/{metrics,predictions}.json and examples.png", out_dir)


def view_strip(views: np.ndarray, boxes: np.ndarray, gap: int = 4
               ) -> tuple[np.ndarray, list[tuple[float, float, float, float] | None]]:
  """Every view of one region side by side, and the target box in each.

  Returns the strip (uint8 [S, V*S + (V-1)*gap, 3], white gaps) and, per view,
  the target box clipped to that view and shifted to the strip's frame (None
  where the target lies outside the view, as in an object crop of a neighbour).
  """
  views = np.asarray(views)
  if views.dtype != np.uint8:
    views = (np.clip(views, 0, 1) * 255).round().astype(np.uint8)
  v, s = views.shape[0], views.shape[1]
  strip = np.full((s, v * s + (v - 1) * gap, 3), 255, np.uint8)
  rects = []
  for k in range(v):
    x0 = k * (s + gap)
    strip[:, x0:x0 + s] = views[k]
    x1, y1, x2, y2 = np.clip(np.asarray(boxes[k], np.float64), 0, s)
    rects.append((x0 + x1, y1, x0 + x2, y2) if x2 > x1 and y2 > y1 else None)
  return strip, rects


def examples_grid(path: str, predictions: Sequence[dict], decoded: Sequence[dict],
                  max_examples: int = 8) -> None:
  """A grid of regions, each its views side by side with captions below.

  The first view is the target's; the others are its context views in the order
  the model reads them. The target box is drawn in red where a view shows it.
  """
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  import textwrap  # pylint: disable=g-import-not-at-top
  n = min(max_examples, len(predictions))
  num_views = np.asarray(decoded[0]["views"]).shape[0] if n else 1
  cols = max(1, min(n, 4 if num_views <= 2 else 2))
  rows = max(1, -(-n // cols))
  width = 1.6 * num_views + 0.6
  fig, axes = plt.subplots(rows, cols, figsize=(width * cols, 3.0 * rows), squeeze=False)
  for ax in axes.ravel():
    ax.axis("off")
  for k in range(n):
    ax = axes.ravel()[k]
    strip, rects = view_strip(decoded[k]["views"], decoded[k]["view_boxes"])
    ax.imshow(strip)
    for r in rects:
      if r is not None:
        ax.add_patch(matplotlib.patches.Rectangle((r[0], r[1]), r[2] - r[0], r[3] - r[1],
                                                  fill=False, edgecolor="red", linewidth=1.5))
    p = predictions[k]
    text = "pred: " + p["caption"] + "\nref: " + (p["references"][0] if p["references"] else "")
    ax.set_title("\n".join(textwrap.wrap(text, int(22 * num_views), replace_whitespace=False)[:6]),
                 fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=80)
  plt.close(fig)


def load_for_inference(config: ml_collections.ConfigDict, workdir: str, mode: str, *,
                       model_lib: Any = None, pipeline_lib: Any = None):
  """Mesh, assets, model and params restored from the latest checkpoint.

  Raises:
    FileNotFoundError: no complete checkpoint in `workdir` (names the folder).
  """
  from aligncap_jax import train_state  # pylint: disable=g-import-not-at-top
  if not os.path.isdir(workdir):
    raise FileNotFoundError(f"--mode {mode}: workdir {workdir} does not exist; "
                            f"train first with --mode train --workdir {workdir}")
  step = ckpt_lib.latest_step_or_fail(workdir, mode)
  model_lib, pipeline_lib = default_libs(model_lib, pipeline_lib)
  mesh = shd.make_mesh(config)
  prepare_data(config, pipeline_lib)
  assets = pipeline_lib.load_assets(config)
  model = model_lib.build_model(config, len(assets.tag_vocab))
  factory = train_state.StateFactory(config, model, mesh, len(assets.tag_vocab), steps=1,
                                     model_lib=model_lib)
  ckpt = ckpt_lib.Checkpointer(workdir, read_only=True)
  state = ckpt.restore(step, factory.abstract_state)
  ckpt.close()
  logging.info("restored step %d from %s", step, ckpt.directory)
  return mesh, assets, model, state.params, step


def evaluate(config: ml_collections.ConfigDict, workdir: str, *, model_lib: Any = None,
             pipeline_lib: Any = None) -> dict[str, float]:
  """`--mode eval`: scores the latest checkpoint on `config.data.eval_split`.

  `eval.protocol = "densecap"` runs `densecap_eval.evaluate` (DenseCap mAP) instead.
  """
  if config.eval.protocol == "densecap":
    from aligncap_jax import densecap_eval  # pylint: disable=g-import-not-at-top
    return densecap_eval.evaluate(config, workdir, model_lib=model_lib,
                                  pipeline_lib=pipeline_lib)
  mesh, assets, model, params, step = load_for_inference(
      config, workdir, "eval", model_lib=model_lib, pipeline_lib=pipeline_lib)
  evaluator = Evaluator(config, model, assets, mesh, workdir=workdir,
                        model_lib=model_lib, pipeline_lib=pipeline_lib)
  return evaluator.run(params, step=step)
