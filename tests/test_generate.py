"""Decoding: greedy vs a plain uncached loop, beam scores vs teacher-forced rescoring."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from aligncap_jax.models.decoder_lm import DecoderLM, DecoderLMConfig
from aligncap_jax.models.generate import generate
from aligncap_jax.models.t5 import T5, T5Config

EOS, PAD, N = 2, 0, 6


def _t5():
  config = T5Config.tiny(eos_token_id=EOS)
  model = T5(config)
  embeds = jax.random.normal(jax.random.key(0), (3, 5, config.d_model))
  mask = jnp.array([[1] * 5, [1, 1, 1, 0, 0], [1, 1, 1, 1, 0]])
  params = nn.unbox(model.init(jax.random.key(1), embeds, mask,
                               jnp.zeros((3, 1), jnp.int32))["params"])
  # Make EOS likely so that rows finish at different steps.
  params["lm_head"]["kernel"] = params["lm_head"]["kernel"].at[:, EOS].add(
      3.0 * params["decoder_norm"]["scale"] / config.d_model ** 0.5)
  return model, params, embeds, mask


def _dlm():
  config = DecoderLMConfig.tiny(eos_token_id=EOS)
  model = DecoderLM(config)
  embeds = jax.random.normal(jax.random.key(2), (3, 4, config.hidden_size))
  mask = jnp.array([[1] * 4, [0, 1, 1, 1], [0, 0, 1, 1]])
  params = nn.unbox(model.init(jax.random.key(3), embeds, mask)["params"])
  return model, params, embeds, mask


@functools.partial(jax.jit, static_argnums=0)
def _full_logits(model, params, embeds, mask, generated):
  """Last-position logits float[B, V] of an uncached forward over everything so far.

  Jitted (one compile per model and input shape; op-by-op it dispatched and
  compiled every primitive at every new length).
  """
  if isinstance(model, T5):
    dec = jnp.concatenate([jnp.zeros((embeds.shape[0], 1), jnp.int32), generated], 1)
    return model.apply({"params": params}, embeds, mask, dec)[:, -1]
  x = jnp.concatenate([embeds, model.apply({"params": params}, generated,
                                           method=DecoderLM.embed)], 1)
  full_mask = jnp.concatenate([mask, jnp.ones_like(generated)], 1)
  return model.apply({"params": params}, x, full_mask)[:, -1]


def _greedy_reference(model, params, embeds, mask, penalty, skip_padding=True):
  """HF greedy, written as a plain loop (T5: start token counts for the penalty).

  Decoder-only: the penalty skips the first n_pad generated ids (HF) unless
  `skip_padding` is False.
  """
  bsz = embeds.shape[0]
  seen_start = 0 if isinstance(model, T5) else None
  skip = skip_padding and not isinstance(model, T5)
  ignore = np.argmax(np.asarray(mask), 1) if skip else np.zeros(bsz, int)
  generated = np.zeros((bsz, 0), np.int32)
  done = np.zeros(bsz, bool)
  for _ in range(N):
    logits = np.array(_full_logits(model, params, embeds, mask, jnp.asarray(generated)))
    for b in range(bsz):
      ids = list(generated[b, ignore[b]:]) + ([seen_start] if seen_start is not None else [])
      for t in set(ids):
        logits[b, t] = logits[b, t] * penalty if logits[b, t] < 0 else logits[b, t] / penalty
    tok = np.where(done, PAD, logits.argmax(-1))
    generated = np.concatenate([generated, tok[:, None].astype(np.int32)], 1)
    done |= tok == EOS
  return generated


@pytest.mark.parametrize("build", [_t5, _dlm])
def test_greedy_matches_plain_loop(build):
  model, params, embeds, mask = build()
  want = _greedy_reference(model, params, embeds, mask, 1.5)
  got, scores = generate(model, params, inputs_embeds=embeds, attention_mask=mask,
                         num_beams=1, max_new_tokens=N, repetition_penalty=1.5,
                         eos_token_id=EOS, pad_token_id=PAD)
  np.testing.assert_array_equal(got, want)
  assert got.shape == (3, N) and got.dtype == jnp.int32
  assert np.all((scores > 0) & (scores <= 1))


def test_decoder_only_penalty_on_every_generated_id():
  """`penalty_skips_padding=False`: the left padding of a row exempts none of its ids."""
  model, params, embeds, mask = _dlm()
  want = _greedy_reference(model, params, embeds, mask, 3.0, skip_padding=False)
  got, _ = generate(model, params, inputs_embeds=embeds, attention_mask=mask, num_beams=1,
                    max_new_tokens=N, repetition_penalty=3.0, eos_token_id=EOS,
                    pad_token_id=PAD, penalty_skips_padding=False)
  np.testing.assert_array_equal(got, want)
  # The case tells the two rules apart: HF's rule decodes other sequences here
  # (rows 1 and 2 repeat their first id; 1.5 is too weak for this model to differ).
  assert not np.array_equal(want, _greedy_reference(model, params, embeds, mask, 3.0))


@pytest.mark.parametrize("build", [_t5, _dlm])
@pytest.mark.parametrize("num_beams", [2])
def test_beam_score_is_sum_of_token_logprobs(build, num_beams):
  """Without penalties the sequence score is the teacher-forced sum of log-probs."""
  model, params, embeds, mask = build()
  tokens, scores = generate(model, params, inputs_embeds=embeds, attention_mask=mask,
                            num_beams=num_beams, max_new_tokens=N, repetition_penalty=1.0,
                            min_length=0, eos_token_id=EOS, pad_token_id=PAD)
  tokens = np.asarray(tokens)
  for b in range(3):
    row = list(tokens[b])
    length = row.index(EOS) + 1 if EOS in row else N
    total = 0.0
    for t in range(length):
      logits = _full_logits(model, params, embeds[b:b + 1], mask[b:b + 1],
                            jnp.asarray([row[:t]], jnp.int32))
      total += float(jax.nn.log_softmax(logits[0])[row[t]])
    np.testing.assert_allclose(float(scores[b]), np.exp(total), rtol=1e-4)
    assert all(t == PAD for t in row[length:])


def test_min_length_blocks_eos_and_errors():
  model, params, embeds, mask = _t5()
  tokens, _ = generate(model, params, inputs_embeds=embeds, attention_mask=mask,
                       num_beams=2, max_new_tokens=N, min_length=N + 1,
                       eos_token_id=EOS, pad_token_id=PAD)
  assert not (np.asarray(tokens) == EOS).any()
  with pytest.raises(ValueError, match="num_beams"):
    generate(model, params, inputs_embeds=embeds, attention_mask=mask, num_beams=0,
             eos_token_id=EOS, pad_token_id=PAD)
