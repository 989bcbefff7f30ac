"""T5: relative buckets by formula, scan/remat == unscanned, cache == teacher forcing."""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from aligncap_jax.config import base_config
from aligncap_jax.models.t5 import T5, T5Config, relative_position_buckets, stack_layers

ALLOWED_AXES = {"batch", "length", "embed", "mlp", "heads", "kv", "vocab", "layers",
                "tags", "views", None}


def _bucket_reference(rel: int, bidirectional: bool, num_buckets: int, max_distance: int):
  ret, n = 0, num_buckets
  if bidirectional:
    n //= 2
    ret += n if rel > 0 else 0
    rel = abs(rel)
  else:
    rel = max(-rel, 0)
  max_exact = n // 2
  if rel < max_exact:
    return ret + rel
  large = max_exact + int(math.log(rel / max_exact) / math.log(max_distance / max_exact)
                          * (n - max_exact))
  return ret + min(large, n - 1)


@pytest.mark.parametrize("bidirectional", [True, False])
def test_relative_buckets_match_formula(bidirectional):
  rel = np.arange(-300, 301)
  got = relative_position_buckets(rel, bidirectional=bidirectional, num_buckets=32,
                                  max_distance=128)
  want = [_bucket_reference(int(r), bidirectional, 32, 128) for r in rel]
  np.testing.assert_array_equal(got, want)
  # Hand-checked: bidirectional, +1 -> 16 + 1; -200 -> the last left bucket 15.
  if bidirectional:
    assert got[301] == 17 and got[100] == 15


def _setup(config):
  model = T5(config)
  rng = jax.random.key(0)
  embeds = jax.random.normal(rng, (2, 6, config.d_model))
  mask = jnp.array([[1] * 6, [1, 1, 1, 1, 0, 0]])
  dec = jnp.array([[0, 5, 7, 9], [0, 3, 3, 8]])
  variables = model.init(jax.random.key(1), embeds, mask, dec)
  return model, nn.unbox(variables["params"]), (embeds, mask, dec), variables


@pytest.mark.parametrize("gated,tied", [(True, False), (False, True)])
def test_scan_and_remat_match_unscanned(gated, tied):
  config = T5Config.tiny(is_gated_act=gated, dense_act_fn="gelu_new" if gated else "relu",
                         tie_word_embeddings=tied, scale_decoder_outputs=tied)
  model, params, args, _ = _setup(config)
  want = model.apply({"params": params}, *args)
  scanned = T5(T5Config(**{**config.__dict__, "scan_layers": True, "remat": True}))
  stacked = stack_layers(params, ("encoder_layers", "decoder_layers"))
  got = scanned.apply({"params": stacked}, *args)
  np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
  grads = jax.grad(lambda p: scanned.apply({"params": p}, *args).sum())(stacked)
  assert all(np.isfinite(g).all() for g in jax.tree.leaves(grads))


@pytest.mark.parametrize("scan", [False, True])
def test_cached_decoding_equals_teacher_forcing(scan):
  config = T5Config.tiny(scan_layers=scan)
  model, params, (embeds, mask, dec), _ = _setup(config)
  want = model.apply({"params": params}, embeds, mask, dec)
  encoded = model.apply({"params": params}, embeds, mask, method=T5.encode)
  cache = model.init_cache(2, 5)
  steps = []
  for i in range(dec.shape[1]):
    logits, cache = model.apply({"params": params}, dec[:, i:i + 1],
                                encoded if i == 0 else None, mask, cache=cache,
                                cache_index=i, method=T5.decode)
    steps.append(logits)
    assert "cross_k" in cache
  np.testing.assert_allclose(jnp.concatenate(steps, 1), want, atol=1e-5, rtol=1e-5)


def test_padding_in_encoder_is_ignored():
  model, params, (embeds, mask, dec), _ = _setup(T5Config.tiny())
  noisy = embeds.at[1, 4:].set(100.0)
  a = model.apply({"params": params}, embeds, mask, dec)
  b = model.apply({"params": params}, noisy, mask, dec)
  np.testing.assert_allclose(a[1], b[1], atol=1e-5)


def test_every_param_has_allowed_logical_axes():
  config = T5Config.tiny(scan_layers=True)
  model = T5(config)
  shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 2, 32)),
                          jnp.ones((1, 2), jnp.int32), jnp.zeros((1, 2), jnp.int32))
  leaves = jax.tree.leaves(shapes["params"], is_leaf=lambda x: isinstance(x, nn.Partitioned))
  for leaf in leaves:
    assert isinstance(leaf, nn.Partitioned)
    assert set(leaf.names) <= ALLOWED_AXES and len(leaf.names) == leaf.value.ndim
  scanned = [leaf for leaf in leaves if leaf.names[0] == "layers"]
  assert scanned


def test_from_hf_feed_forward_proj():
  base = dict(vocab_size=10, d_model=8, d_kv=2, d_ff=4, num_heads=4)
  c = T5Config.from_hf({**base, "feed_forward_proj": "gated-gelu", "dense_act_fn": "gelu",
                        "tie_word_embeddings": False})
  assert (c.dense_act_fn, c.is_gated_act, c.tie_word_embeddings,
          c.scale_decoder_outputs) == ("gelu_new", True, False, False)
  c = T5Config.from_hf({**base, "feed_forward_proj": "gated-silu"})
  assert (c.dense_act_fn, c.is_gated_act, c.scale_decoder_outputs) == ("silu", True, True)
  with pytest.raises(ValueError, match="feed_forward_proj"):
    T5Config.from_hf({**base, "feed_forward_proj": "fancy-relu"})


def test_from_config_reads_base_config():
  c = T5Config.from_config(base_config().model.llm, scan_layers=True)
  assert (c.d_model, c.num_layers, c.num_heads, c.dense_act_fn, c.is_gated_act) == (
      2048, 24, 32, "gelu", True)
  assert c.scan_layers and not c.scale_decoder_outputs
