"""Visual contrastive decoding (`decode.contrastive_alpha`): the step logits are
`(1 + a) * logits(x) - a * logits(x')`; a = 0 decodes exactly as before."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from aligncap_jax import config as config_lib
from aligncap_jax.data import pipeline
from aligncap_jax.models import aligncap
from aligncap_jax.models.decoder_lm import DecoderLM, DecoderLMConfig
from aligncap_jax.models.generate import generate
from aligncap_jax.models.t5 import T5, T5Config
from test_aligncap import (ARGMAX_MARGIN, init, make_batch, scale_projections, tag_table,
                           tiny_config)

EOS, PAD, N, ALPHA = 2, 0, 6, 0.8


def _t5():
  config = T5Config.tiny(eos_token_id=EOS)
  model = T5(config)
  k = jax.random.split(jax.random.key(0), 2)
  embeds = jax.random.normal(k[0], (3, 5, config.d_model))
  distorted = jax.random.normal(k[1], (3, 5, config.d_model))
  mask = jnp.array([[1] * 5, [1, 1, 1, 0, 0], [1, 1, 1, 1, 0]])
  params = nn.unbox(model.init(jax.random.key(1), embeds, mask,
                               jnp.zeros((3, 1), jnp.int32))["params"])
  # The tiny T5 barely listens to its encoder at init; louder cross-attention makes
  # the two inputs give different logits. EOS likelier: rows stop at different steps.
  params = scale_projections(params, {"v": 10.0, "o": 10.0}, within="cross_attn")
  params["lm_head"]["kernel"] = params["lm_head"]["kernel"].at[:, EOS].add(
      2.0 * params["decoder_norm"]["scale"] / config.d_model ** 0.5)
  return model, params, embeds, distorted, mask


def _dlm():
  config = DecoderLMConfig.tiny(eos_token_id=EOS)
  model = DecoderLM(config)
  k = jax.random.split(jax.random.key(2), 2)
  embeds = jax.random.normal(k[0], (3, 4, config.hidden_size))
  distorted = jax.random.normal(k[1], (3, 4, config.hidden_size))
  mask = jnp.array([[1] * 4, [0, 1, 1, 1], [0, 0, 1, 1]])
  params = nn.unbox(model.init(jax.random.key(3), embeds, mask)["params"])
  return model, params, embeds, distorted, mask


def _teacher_forced(model):
  """Jitted uncached forward `(params, embeds, mask, tokens int[B, N]) -> float[B, N, V]`:
  [:, t] are the logits of token t given tokens[:, :t] (causal, so later slots of
  `tokens` do not matter)."""

  def f(params, embeds, mask, tokens):
    if isinstance(model, T5):
      dec = jnp.concatenate([jnp.zeros((embeds.shape[0], 1), jnp.int32), tokens[:, :-1]], 1)
      return model.apply({"params": params}, embeds, mask, dec)
    x = jnp.concatenate([embeds, model.apply({"params": params}, tokens[:, :-1],
                                             method=DecoderLM.embed)], 1)
    full_mask = jnp.concatenate([mask, jnp.ones_like(tokens[:, :-1])], 1)
    return model.apply({"params": params}, x, full_mask)[:, embeds.shape[1] - 1:]

  return jax.jit(f)


def _combined(forward, params, embeds, distorted, mask, tokens, alpha):
  """float64[B, N, V]: (1 + alpha) * logits(embeds) - alpha * logits(distorted)."""
  a = np.asarray(forward(params, embeds, mask, tokens), np.float64)
  b = np.asarray(forward(params, distorted, mask, tokens), np.float64)
  return (1 + alpha) * a - alpha * b


def _decode(model, params, embeds, mask, **kw):
  return generate(model, params, inputs_embeds=embeds, attention_mask=mask,
                  max_new_tokens=N, eos_token_id=EOS, pad_token_id=PAD, **kw)


def _log_softmax(x):
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


@pytest.mark.parametrize("build", [_t5, _dlm])
def test_greedy_steps_are_the_contrastive_formula(build):
  """Greedy VCD equals a plain uncached loop on (1 + a) * logits - a * logits'
  (repetition penalty 1.5 applied to the combined logits, as HF's processors; the
  decoder-only penalty skips a row's first n_pad generated ids, as HF's)."""
  model, params, embeds, distorted, mask = build()
  penalty = 1.5
  bsz = embeds.shape[0]
  start = [0] if isinstance(model, T5) else []   # T5's start token counts (HF)
  skip = np.zeros(bsz, int) if start else np.argmax(np.asarray(mask), 1)
  forward = _teacher_forced(model)
  generated = np.full((bsz, N), PAD, np.int32)
  done = np.zeros(bsz, bool)
  lp_sum, count, margin = np.zeros(bsz), np.zeros(bsz), np.inf
  for i in range(N):
    logits = _combined(forward, params, embeds, distorted, mask, generated, ALPHA)[:, i]
    for r in range(bsz):
      for t in set(list(generated[r, skip[r]:i]) + start):
        logits[r, t] = logits[r, t] * penalty if logits[r, t] < 0 else logits[r, t] / penalty
    top2 = np.sort(logits, -1)[:, -2:]
    margin = min([margin] + list(top2[~done, 1] - top2[~done, 0]))
    tok = logits.argmax(-1)
    lp = _log_softmax(logits)[np.arange(bsz), tok]
    lp_sum += np.where(done, 0.0, lp)
    count += ~done
    generated[:, i] = np.where(done, PAD, tok)
    done |= tok == EOS
  assert margin > ARGMAX_MARGIN, margin
  got, scores = _decode(model, params, embeds, mask, num_beams=1, repetition_penalty=penalty,
                        contrastive_alpha=ALPHA, contrast_inputs_embeds=distorted)
  np.testing.assert_array_equal(got, generated)
  # float32 logits of O(10) after a few layers: ~1e-5 relative on a mean log-prob.
  np.testing.assert_allclose(scores, np.exp(lp_sum / count), rtol=1e-4)
  # The case tells VCD from plain decoding: the distorted input moves the log-probs.
  _, plain_scores = _decode(model, params, embeds, mask, num_beams=1,
                            repetition_penalty=penalty)
  assert np.max(np.abs(np.log(plain_scores) - np.log(scores))) > 1e-2


@pytest.mark.parametrize("build", [_t5, _dlm])
def test_beam_score_is_the_teacher_forced_contrastive_sum(build):
  """Beam 2 over the doubled batch: each returned caption's score is the sum of its
  teacher-forced contrastive log-probs, so every beam kept its own two caches
  (its input's and its distorted input's) through the reordering."""
  model, params, embeds, distorted, mask = build()
  tokens, scores = _decode(model, params, embeds, mask, num_beams=2, repetition_penalty=1.0,
                           min_length=0, contrastive_alpha=ALPHA,
                           contrast_inputs_embeds=distorted)
  tokens = np.asarray(tokens)
  lp = _log_softmax(_combined(_teacher_forced(model), params, embeds, distorted, mask, tokens,
                              ALPHA))
  for b in range(embeds.shape[0]):
    row = list(tokens[b])
    length = row.index(EOS) + 1 if EOS in row else N
    total = sum(float(lp[b, t, row[t]]) for t in range(length))
    np.testing.assert_allclose(float(scores[b]), np.exp(total), rtol=1e-4)
    assert all(t == PAD for t in row[length:])


@pytest.mark.parametrize("build", [_t5, _dlm])
def test_alpha_zero_and_undistorted_input_decode_as_before(build):
  model, params, embeds, distorted, mask = build()
  plain, plain_scores = _decode(model, params, embeds, mask, num_beams=2)
  off, off_scores = _decode(model, params, embeds, mask, num_beams=2, contrastive_alpha=0.0,
                            contrast_inputs_embeds=distorted)
  np.testing.assert_array_equal(off, plain)
  np.testing.assert_array_equal(off_scores, plain_scores)
  # x' = x: (1 + a) l - a l = l up to rounding, through the doubled-batch machinery.
  same, same_scores = _decode(model, params, embeds, mask, num_beams=2, contrastive_alpha=ALPHA,
                              contrast_inputs_embeds=embeds)
  np.testing.assert_array_equal(same, plain)
  np.testing.assert_allclose(same_scores, plain_scores, rtol=1e-5)


def test_bad_alpha_and_missing_distorted_input():
  model, params, embeds, _, mask = _t5()
  with pytest.raises(ValueError, match="contrastive_alpha must be >= 0"):
    _decode(model, params, embeds, mask, contrastive_alpha=-0.5)
  with pytest.raises(ValueError, match="contrast_inputs_embeds"):
    _decode(model, params, embeds, mask, contrastive_alpha=1.0)
  c = config_lib.base_config()
  c.decode.contrastive_alpha = -1.0
  with pytest.raises(ValueError, match="'decode.contrastive_alpha'"):
    config_lib.validate(c)


def test_aligncap_greedy_contrasts_the_views_with_the_target_alone():
  """AlignCap.generate: the distorted input is every view replaced by view 0, with the
  same prompt. Reference: greedy steps on the combination of two teacher-forced
  `caption_logits` forwards (views, target-only views)."""
  c = tiny_config(pairwise_form="dense")
  batch = make_batch(c)
  model, params, te = init(c, batch)
  params = {**params, "llm": scale_projections(params["llm"], {"v": 10.0, "o": 10.0},
                                               within="cross_attn")}
  table = tag_table(c)
  steps, alpha = 6, 1.0
  got = jax.jit(lambda p, b: model.apply(
      {"params": p}, b, te, table, method=aligncap.AlignCap.generate, num_beams=1,
      max_new_tokens=steps, min_length=0, repetition_penalty=1.0,
      contrastive_alpha=alpha))(params, batch)

  j = c.data.num_views
  distorted = {**batch, "views": np.repeat(batch["views"][:, :1], j, 1),
               "view_boxes": np.repeat(batch["view_boxes"][:, :1], j, 1)}
  forward = jax.jit(lambda p, b: model.apply({"params": p}, b,
                                             method=aligncap.AlignCap.caption_logits))
  b, t = batch["views"].shape[0], c.data.max_caption_tokens
  eos, pad = c.model.llm.eos_token_id, c.model.llm.pad_token_id
  prompt = {"prompt_tokens": got["prompt_tokens"], "prompt_mask": got["prompt_mask"]}

  def greedy(a):
    tokens = np.full((b, t), pad, np.int32)
    done, margin = np.zeros(b, bool), np.inf
    for i in range(steps):
      fields = {**prompt, "caption_tokens": tokens,
                "caption_mask": np.broadcast_to((np.arange(t) < i).astype(np.int32), (b, t))}
      logits = (1 + a) * np.asarray(forward(params, {**batch, **fields})[:, i], np.float64)
      if a:
        logits -= a * np.asarray(forward(params, {**distorted, **fields})[:, i], np.float64)
      top2 = np.sort(logits, -1)[:, -2:]
      margin = min([margin] + list(top2[~done, 1] - top2[~done, 0]))
      tokens[:, i] = np.where(done, pad, logits.argmax(-1))
      done |= tokens[:, i] == eos
    return tokens[:, :steps], margin

  want, margin = greedy(alpha)
  assert margin > ARGMAX_MARGIN, margin
  np.testing.assert_array_equal(got["tokens"], want)
  # The case tells the contrast from plain decoding (the same steps with a = 0).
  assert not np.array_equal(want, greedy(0.0)[0]), "the contrast changed no token"


def test_no_context_views_fill_every_slot_with_the_target_box():
  """data.context_views=False (the no-GOD ablation): every view is the target's crop."""
  c = tiny_config()
  rng = np.random.default_rng(0)
  image = rng.integers(0, 256, (64, 64, 3)).astype(np.uint8)
  box = np.asarray([10, 12, 30, 40], np.float32)
  cands = np.asarray([[0, 0, 40, 50], [5, 5, 60, 60]], np.float32)
  on = pipeline._Featurizer.from_config(c, None, "test").views(image, box, cands)
  c.data.context_views = False
  off = pipeline._Featurizer.from_config(c, None, "test").views(image, box, cands)
  assert not np.array_equal(on["views"][1], on["views"][0])
  for v in range(1, c.data.num_views):
    np.testing.assert_array_equal(off["views"][v], on["views"][0])
    np.testing.assert_array_equal(off["view_boxes"][v], on["view_boxes"][0])
