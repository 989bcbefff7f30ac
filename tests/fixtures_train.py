"""Stand-ins for the AlignCap model and the data pipeline, for trainer tests.

`FakeModelLib` and `FakePipelineLib` honour exactly the module APIs that
`train.py`, `evaluate.py` and `predict.py` use (`aligncap.build_model`,
`AlignCap.encode_tags/generate`, `pipeline.load_assets/make_train_iterator/
make_eval_iterator/eval_targets/make_predict_batch`) with tiny, fast
computations, so the trainer's guarantees (resume, NaN skipping, sharding
equality, checkpoints) are tested in seconds and independently of the model.

Run as a script, it is `python -m aligncap_jax.main` with the stand-ins
installed: the SIGTERM/SIGKILL tests start it as a real subprocess.
"""
from __future__ import annotations

import os
import sys
import time
import types

import flax.linen as nn
import grain
import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image
import tokenizers

NUM_TAGS = 12
NUM_TRAIN_REGIONS = 24
WORDS = [f"w{i}" for i in range(40)]


def _dense(features, names, name):
  return nn.Dense(features, name=name,
                  kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(), names),
                  bias_init=nn.with_logical_partitioning(nn.initializers.zeros, (names[1],)))


class FakeAlignCap(nn.Module):
  """A Dense over pooled views with the AlignCap loss/decoding API."""
  config: object
  num_tags: int

  def setup(self):
    m = self.config.model
    d = 16
    self.vision = _dense(d, ("embed", "mlp"), "vision")
    self.llm = _dense(m.llm.vocab_size, ("mlp", "vocab"), "llm")
    self.tagging = _dense(self.num_tags, ("mlp", "tags"), "tagging")
    self.clip_text = nn.Embed(m.clip_text.vocab_size, m.clip_text.hidden_size,
                              embedding_init=nn.with_logical_partitioning(
                                  nn.initializers.normal(0.02), ("vocab", "embed")),
                              name="clip_text")
    self.cond_proj = _dense(m.clip_text.hidden_size, ("mlp", "embed"), "cond_proj")
    self.prompt_vector = self.param(
        "prompt_vector", nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)), (d,))
    self.drop = nn.Dropout(0.3)

  def _features(self, batch, train):
    views = batch["views"].astype(jnp.float32) / 255.0
    pooled = views.mean(axis=(2, 3)).reshape(views.shape[0], -1)
    boxes = batch["view_boxes"].reshape(views.shape[0], -1) / views.shape[2]
    h = jnp.tanh(self.vision(jnp.concatenate([pooled, boxes], -1)))
    h = nn.with_logical_constraint(h, ("batch", "mlp"))
    return self.drop(h, deterministic=not train)

  def _clip_pool(self, tokens, mask):
    e = self.clip_text(tokens)
    w = mask.astype(jnp.float32)[..., None]
    return (e * w).sum(-2) / jnp.maximum(w.sum(-2), 1.0)

  def __call__(self, batch, tag_embeddings, train=False):
    h = self._features(batch, train)
    valid = batch["valid"].astype(jnp.float32)
    denom = jnp.maximum(valid.sum(), 1.0)
    logp = jax.nn.log_softmax(self.llm(h + self.prompt_vector))
    cmask = batch["caption_mask"].astype(jnp.float32)
    tok_lp = jnp.take_along_axis(logp, batch["caption_tokens"], axis=-1)
    loss_cap = ((-(tok_lp * cmask).sum(-1) / jnp.maximum(cmask.sum(-1), 1.0)) * valid).sum() / denom
    tag_logits = self.tagging(h) + 0.01 * tag_embeddings.mean(-1)
    y = batch["tag_labels"]
    bce = -(y * jax.nn.log_sigmoid(tag_logits) + (1 - y) * jax.nn.log_sigmoid(-tag_logits))
    loss_tag = (bce.sum(-1) * valid).sum() / denom
    u = self._clip_pool(batch["clip_tokens"], batch["clip_mask"])
    loss_cond = (((self.cond_proj(h) - u) ** 2).mean(-1) * valid).sum() / denom
    pmask = batch["prompt_mask"].astype(jnp.float32)
    loss_multi = ((pmask.mean(-1) * (h ** 2).mean(-1)) * valid).sum() / denom
    c = self.config.loss
    loss = c.alpha * loss_tag + c.beta * loss_cap + c.gamma * loss_cond + c.lambda_ * loss_multi
    return loss, {"loss": loss, "loss_cap": loss_cap, "loss_tag": loss_tag,
                  "loss_cond": loss_cond, "loss_multi": loss_multi}

  def encode_tags(self, tag_clip_tokens, tag_clip_mask):
    return self._clip_pool(tag_clip_tokens, tag_clip_mask)

  def generate(self, batch, tag_embeddings, tag_table, *, num_beams=2, max_new_tokens=20,
               min_length=1, length_penalty=0.0, repetition_penalty=1.5,
               contrastive_alpha=0.0):
    del num_beams, min_length, length_penalty, repetition_penalty, contrastive_alpha
    h = self._features(batch, False)
    logits = self.llm(h + self.prompt_vector)
    n = min(3, max_new_tokens - 1)
    top = jnp.argsort(-logits[:, 3:3 + len(WORDS)], axis=-1)[:, :n] + 3
    b = logits.shape[0]
    tokens = jnp.concatenate([top, jnp.full((b, 1), tag_table["eos_id"]),
                              jnp.zeros((b, max_new_tokens - n - 1), jnp.int32)], -1)
    scores = jnp.exp(jax.nn.log_softmax(logits).max(-1))
    tag_probs = jax.nn.sigmoid(self.tagging(h) + 0.01 * tag_embeddings.mean(-1))
    return {"tokens": tokens.astype(jnp.int32), "scores": scores, "tag_probs": tag_probs}


def _dummy_batch(config, batch_size, num_tags):
  d, b = config.data, batch_size
  s, j = d.view_size, d.num_views
  return {
      "views": np.zeros((b, j, s, s, 3), np.uint8),
      "view_boxes": np.zeros((b, j, 4), np.float32),
      "caption_tokens": np.zeros((b, d.max_caption_tokens), np.int32),
      "caption_mask": np.zeros((b, d.max_caption_tokens), np.int32),
      "clip_tokens": np.zeros((b, d.clip_max_tokens), np.int32),
      "clip_mask": np.zeros((b, d.clip_max_tokens), np.int32),
      "tag_labels": np.zeros((b, num_tags), np.float32),
      "prompt_tokens": np.zeros((b, d.max_prompt_tokens), np.int32),
      "prompt_mask": np.zeros((b, d.max_prompt_tokens), np.int32),
      "region_id": np.zeros((b,), np.int32),
      "image_id": np.zeros((b,), np.int32),
      "valid": np.zeros((b,), np.int32),
  }


def _dummy_tag_inputs(config, num_tags):
  toks = np.zeros((num_tags, config.data.clip_max_tokens), np.int32)
  table = {"tokens": np.zeros((num_tags, 4), np.int32), "lens": np.ones((num_tags,), np.int32),
           "comma_id": np.int32(0), "bar_id": np.int32(0), "eos_id": np.int32(1)}
  return toks, toks.copy(), table


FakeModelLib = types.SimpleNamespace(
    AlignCap=FakeAlignCap,
    build_model=lambda config, num_tags: FakeAlignCap(config, num_tags),
    dummy_batch=_dummy_batch,
    dummy_tag_inputs=_dummy_tag_inputs,
)


# ------------------------------------------------------------------ pipeline


def _tokenizer():
  vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2}
  for w in WORDS:
    vocab[w] = len(vocab)
  tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
  tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
  tok.add_special_tokens(["<pad>", "</s>", "<unk>"])
  return tok


def load_assets(config):
  rng = np.random.default_rng(0)
  lt = config.data.clip_max_tokens
  clip_tokens = rng.integers(1, config.model.clip_text.vocab_size, (NUM_TAGS, lt)).astype(np.int32)
  clip_mask = (np.arange(lt)[None] < 3).astype(np.int32).repeat(NUM_TAGS, 0)
  return types.SimpleNamespace(
      llm_tokenizer=_tokenizer(), clip_tokenizer=None,
      tag_vocab=[f"tag{i}" for i in range(NUM_TAGS)],
      tag_clip_tokens=clip_tokens, tag_clip_mask=clip_mask,
      tag_token_table=(np.arange(NUM_TAGS * 2).reshape(NUM_TAGS, 2) % 40 + 3).astype(np.int32),
      tag_token_lens=np.full((NUM_TAGS,), 2, np.int32),
      comma_id=4, bar_id=5, eos_id=1, pad_id=0)


def _example(config, index, rng=None):
  """One region record, deterministic in `index` (and `rng` for 'view sampling')."""
  d = config.data
  r = np.random.default_rng(index)
  s, j = d.view_size, d.num_views
  ex = {k: v[0] for k, v in _dummy_batch(config, 1, NUM_TAGS).items()}
  ex["views"] = r.integers(0, 256, (j, s, s, 3)).astype(np.uint8)
  ex["view_boxes"] = np.sort(r.uniform(0, s, (j, 4)), -1).astype(np.float32)
  if rng is not None:
    ex["view_boxes"][1:] = np.sort(rng.uniform(0, s, (j - 1, 4)), -1)
  n = 2 + index % 4
  ex["caption_tokens"][:n] = r.integers(3, 43, n)
  ex["caption_mask"][:n] = 1
  ex["clip_tokens"][:n] = r.integers(1, config.model.clip_text.vocab_size, n)
  ex["clip_mask"][:n] = 1
  ex["tag_labels"] = (r.uniform(size=NUM_TAGS) < 0.3).astype(np.float32)
  ex["prompt_mask"][:2] = 1 if rng is None or rng.uniform() < 0.5 else 0
  ex["region_id"] = np.int32(1000 + index)
  ex["image_id"] = np.int32(index // 2)
  ex["valid"] = np.int32(1)
  return ex


def make_train_iterator(config, assets, *, global_batch_size, process_index, process_count,
                        seed=None):
  del assets
  seed = config.seed if seed is None else seed
  local = global_batch_size // process_count
  # Like the real pipeline: one global stream, each process reads its rows of
  # every global batch.
  ds = grain.MapDataset.range(NUM_TRAIN_REGIONS).shuffle(seed=seed).repeat()
  ds = ds.random_map(lambda i, rng: _example(config, int(i), rng), seed=seed + 1)
  ds = ds.batch(local, drop_remainder=True)[process_index::process_count]
  delay = float(os.environ.get("FAKE_BATCH_DELAY_S", "0"))
  if delay:  # lets subprocess tests signal a run mid-way
    ds = ds.map(lambda b: (time.sleep(delay), b)[1])
  return iter(ds.to_iter_dataset())


def _eval_indices(max_examples):
  n = 7
  return list(range(100, 100 + (min(n, max_examples) if max_examples else n)))


def make_eval_iterator(config, assets, split, *, batch_size, max_examples=0):
  del assets, split
  idx = _eval_indices(max_examples)
  for start in range(0, len(idx), batch_size):
    rows = [_example(config, i) for i in idx[start:start + batch_size]]
    pad = batch_size - len(rows)
    rows += [{**rows[0], "valid": np.int32(0)}] * pad
    yield {k: np.stack([r[k] for r in rows]) for k in rows[0]}


def eval_targets(config, split, max_examples=0):
  del config, split
  return [{"image_id": i // 2, "region_id": 1000 + i, "box": [1.0, 2.0, 20.0, 30.0],
           "references": [f"w{i % 7} w{(i + 1) % 7} w3", f"w{i % 5} w3"]}
          for i in _eval_indices(max_examples)]


def make_predict_batch(config, assets, image_path, boxes, *, detections=None):
  del assets
  with Image.open(image_path) as im:
    im.convert("RGB")
  rows = [_example(config, 7 * k) for k in range(len(boxes))]
  batch = {k: np.stack([r[k] for r in rows]) for k in rows[0]}
  warnings = [] if detections else ["no --detections given: every view is the target box"]
  return batch, warnings


def prepare(config, **kwargs):
  del config, kwargs


def num_train_regions(config):
  del config
  return NUM_TRAIN_REGIONS


FakePipelineLib = types.SimpleNamespace(
    prepare=prepare, load_assets=load_assets, make_train_iterator=make_train_iterator,
    make_eval_iterator=make_eval_iterator, eval_targets=eval_targets,
    make_predict_batch=make_predict_batch, num_train_regions=num_train_regions)


def install_fakes():
  """Makes `aligncap_jax.models.aligncap` and `aligncap_jax.data.pipeline` the stand-ins."""
  import aligncap_jax.data
  import aligncap_jax.models
  model_mod = types.ModuleType("aligncap_jax.models.aligncap")
  model_mod.__dict__.update(vars(FakeModelLib))
  pipe_mod = types.ModuleType("aligncap_jax.data.pipeline")
  pipe_mod.__dict__.update(vars(FakePipelineLib))
  sys.modules["aligncap_jax.models.aligncap"] = model_mod
  sys.modules["aligncap_jax.data.pipeline"] = pipe_mod
  aligncap_jax.models.aligncap = model_mod
  aligncap_jax.data.pipeline = pipe_mod


if __name__ == "__main__":
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  install_fakes()
  from aligncap_jax import main as _main
  _main.run()
