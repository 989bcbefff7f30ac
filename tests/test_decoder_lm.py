"""Llama/Qwen2 decoder: rope and GQA by formula, scan == loop, cache == full forward."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from aligncap_jax.config import base_config
from aligncap_jax.models.decoder_lm import DecoderLM, DecoderLMConfig, apply_rope
from aligncap_jax.models.decoder_lm import left_pad, rope_positions
from aligncap_jax.models.t5 import attend, stack_layers

ALLOWED_AXES = {"batch", "length", "embed", "mlp", "heads", "kv", "vocab", "layers",
                "tags", "views", None}


def test_rope_matches_formula():
  x = jax.random.normal(jax.random.key(0), (1, 3, 2, 4))
  pos = jnp.array([[0, 1, 5]])
  got = apply_rope(x, pos, 100.0)
  want = np.zeros_like(np.asarray(x))
  for t in range(3):
    for i in range(2):
      ang = pos[0, t] / 100.0 ** (2 * i / 4)
      c, s = np.cos(ang), np.sin(ang)
      a, b = np.asarray(x[0, t, :, i]), np.asarray(x[0, t, :, i + 2])
      want[0, t, :, i] = a * c - b * s
      want[0, t, :, i + 2] = b * c + a * s
  np.testing.assert_allclose(got, want, atol=1e-5)


def test_gqa_attend_matches_loop():
  kq, kk, kv = jax.random.split(jax.random.key(1), 3)
  q = jax.random.normal(kq, (2, 3, 4, 5))
  k = jax.random.normal(kk, (2, 6, 2, 5))
  v = jax.random.normal(kv, (2, 6, 2, 5))
  bias = jnp.where(jnp.arange(6) < 4, 0.0, -1e30)[None, None, None, :]
  got = attend(q, k, v, bias)
  for h in range(4):
    g = h // 2
    logits = np.einsum("btd,bsd->bts", q[:, :, h], k[:, :, g])[..., :4]
    w = np.exp(logits - logits.max(-1, keepdims=True))
    w /= w.sum(-1, keepdims=True)
    np.testing.assert_allclose(got[:, :, h], np.einsum("bts,bsd->btd", w, v[:, :4, g]),
                               atol=1e-5)


def test_positions_follow_hf_generation():
  mask = jnp.array([[0, 0, 1, 1], [1, 1, 1, 1]])
  np.testing.assert_array_equal(rope_positions(mask), [[0, 0, 0, 1], [0, 1, 2, 3]])


def test_left_pad_moves_padding_to_the_front_in_order():
  mask = jnp.array([[1, 1, 0, 1, 0], [1, 1, 1, 1, 1], [0, 1, 0, 1, 1]])
  x = jnp.arange(15, dtype=jnp.float32).reshape(3, 5)[..., None] * jnp.ones((1, 1, 2))
  got_x, got_mask = left_pad(x, mask)
  np.testing.assert_array_equal(got_mask, [[0, 0, 1, 1, 1], [1] * 5, [0, 0, 1, 1, 1]])
  np.testing.assert_array_equal(got_x[..., 0], [[2, 4, 0, 1, 3], [5, 6, 7, 8, 9],
                                                [10, 12, 11, 13, 14]])
  # Real tokens now have the positions 0..n-1 in their original order.
  np.testing.assert_array_equal(rope_positions(got_mask)[0], [0, 0, 0, 1, 2])


def _setup(config):
  model = DecoderLM(config)
  embeds = jax.random.normal(jax.random.key(0), (2, 5, config.hidden_size))
  mask = jnp.array([[1] * 5, [0, 0, 1, 1, 1]])
  params = nn.unbox(model.init(jax.random.key(1), embeds, mask)["params"])
  return model, params, embeds, mask


@pytest.mark.parametrize("tied,bias", [(True, True), (False, False)])
def test_scan_and_remat_match_unscanned(tied, bias):
  config = DecoderLMConfig.tiny(tie_word_embeddings=tied, qkv_bias=bias, o_bias=not bias)
  model, params, embeds, mask = _setup(config)
  want = model.apply({"params": params}, embeds, mask)
  scanned = DecoderLM(DecoderLMConfig(**{**config.__dict__, "scan_layers": True,
                                         "remat": True}))
  got = scanned.apply({"params": stack_layers(params, ("layers",))}, embeds, mask)
  np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
  assert ("lm_head" in params) != tied


@pytest.mark.parametrize("scan", [False, True])
def test_cache_prefill_and_steps_equal_full_forward(scan):
  config = DecoderLMConfig.tiny(scan_layers=scan)
  model, params, embeds, mask = _setup(config)
  want = model.apply({"params": params}, embeds, mask)
  cache = model.init_cache(2, 5)
  slots = jnp.zeros((2, 5), jnp.int32).at[:, :3].set(mask[:, :3])
  pos = rope_positions(mask)
  logits, cache = model.apply({"params": params}, embeds[:, :3], slots, positions=pos[:, :3],
                              cache=cache, cache_index=0)
  outs = [logits]
  for i in (3, 4):
    slots = slots.at[:, i].set(1)
    logits, cache = model.apply({"params": params}, embeds[:, i:i + 1], slots,
                                positions=pos[:, i:i + 1], cache=cache, cache_index=i)
    outs.append(logits)
  got = jnp.concatenate(outs, 1)
  valid = np.asarray(mask, bool)
  np.testing.assert_allclose(np.asarray(got)[valid], np.asarray(want)[valid], atol=1e-5)


def test_logical_axes():
  model = DecoderLM(DecoderLMConfig.tiny(scan_layers=True))
  shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 2, 32)),
                          jnp.ones((1, 2), jnp.int32))
  for leaf in jax.tree.leaves(shapes["params"], is_leaf=lambda x: isinstance(x, nn.Partitioned)):
    assert isinstance(leaf, nn.Partitioned) and set(leaf.names) <= ALLOWED_AXES


def test_from_hf_families_and_errors():
  base = dict(vocab_size=10, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
              num_attention_heads=4, num_key_value_heads=2)
  q = DecoderLMConfig.from_hf({**base, "model_type": "qwen2",
                               "rope_parameters": {"rope_theta": 1e6, "rope_type": "default"}})
  assert (q.qkv_bias, q.o_bias, q.rope_theta, q.head_dim) == (True, False, 1e6, 2)
  ll = DecoderLMConfig.from_hf({**base, "model_type": "llama", "attention_bias": True})
  assert (ll.qkv_bias, ll.o_bias) == (True, True)
  with pytest.raises(ValueError, match="rope_type"):
    DecoderLMConfig.from_hf({**base, "rope_parameters": {"rope_type": "llama3"}})
  with pytest.raises(ValueError, match="num_kv_heads"):
    DecoderLMConfig.tiny(num_kv_heads=3)


def test_from_config():
  cd = base_config().model.llm
  cd.family, cd.num_key_value_heads, cd.attention_bias = "llama", 8, True
  c = DecoderLMConfig.from_config(cd)
  assert (c.hidden_size, c.num_kv_heads, c.head_dim, c.qkv_bias) == (2048, 8, 64, True)
