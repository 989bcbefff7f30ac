"""CLIP text encoder: causality, padding mask, EOS pooling, scan, real size."""
from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from aligncap_jax.config import base_config
from aligncap_jax.models.clip_text import CLIPTextConfig, CLIPTextEncoder, eos_positions
from tolerance import assert_reorder_close  # noqa: E402


def _setup(cfg):
  ids = jnp.array([[5, 7, 9, 99, 99, 99], [3, 99, 11, 2, 99, 99]], jnp.int32)
  params = nn.unbox(CLIPTextEncoder(cfg).init(jax.random.key(0), ids))["params"]
  return ids, params


def test_causal_and_pooled_at_first_eos():
  cfg = CLIPTextConfig.tiny()
  ids, params = _setup(cfg)
  last, pooled = CLIPTextEncoder(cfg).apply({"params": params}, ids)
  assert last.shape == (2, 6, 32) and pooled.shape == (2, 32)
  np.testing.assert_array_equal(eos_positions(ids, 99), [3, 1])
  np.testing.assert_allclose(pooled, last[jnp.arange(2), jnp.array([3, 1])], rtol=0, atol=0)
  changed = ids.at[:, 4].set(50)
  last2, pooled2 = CLIPTextEncoder(cfg).apply({"params": params}, changed)
  assert_reorder_close(last2[:, :4], last[:, :4], depth=cfg.num_layers)
  assert np.abs(np.asarray(last2[:, 4] - last[:, 4])).max() > 1e-3
  assert_reorder_close(pooled2, pooled, depth=cfg.num_layers)


def test_legacy_eos_id_2_pools_at_argmax():
  ids = jnp.array([[5, 7, 40, 2], [3, 1, 0, 0]], jnp.int32)
  np.testing.assert_array_equal(eos_positions(ids, 2), [2, 0])


def test_padding_mask_hides_keys():
  cfg = CLIPTextConfig.tiny()
  ids, params = _setup(cfg)
  mask = jnp.array([[1, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
  last, _ = CLIPTextEncoder(cfg).apply({"params": params}, ids, mask)
  last2, _ = CLIPTextEncoder(cfg).apply({"params": params}, ids.at[0, 1].set(60), mask)
  assert_reorder_close(last2[0, 2:], last[0, 2:], depth=cfg.num_layers)
  full, _ = CLIPTextEncoder(cfg).apply({"params": params}, ids)
  assert np.abs(np.asarray(full[0, 2:] - last[0, 2:])).max() > 1e-3
  assert_reorder_close(full[1], last[1], depth=cfg.num_layers)


def test_scan_matches_unscanned():
  cfg = CLIPTextConfig.tiny(num_layers=3)
  ids, params = _setup(cfg)
  want = CLIPTextEncoder(cfg).apply({"params": params}, ids)
  scanned = {k: v for k, v in params.items() if not k.startswith("layers_")}
  scanned["layers"] = jax.tree.map(lambda *xs: jnp.stack(xs),
                                   *[params[f"layers_{i}"] for i in range(3)])
  c = dataclasses.replace(cfg, scan_layers=True, remat=True)
  got = CLIPTextEncoder(c).apply({"params": scanned}, ids)
  for g, w in zip(got, want):
    # Scanned + rematerialised vs unrolled: float32 reassociation over 3 layers.
    assert_reorder_close(g, w, depth=cfg.num_layers)


def test_too_long_input_is_an_error():
  cfg = CLIPTextConfig.tiny()
  _, params = _setup(cfg)
  with pytest.raises(ValueError, match="max_position_embeddings 16"):
    CLIPTextEncoder(cfg).apply({"params": params}, jnp.zeros((1, 17), jnp.int32))


def test_from_config_and_real_size_matches_transformers():
  transformers = pytest.importorskip("transformers")
  torch = pytest.importorskip("torch")
  cfg = CLIPTextConfig.from_config(base_config().model.clip_text, scan_layers=True)
  hf_cfg = transformers.CLIPTextConfig(hidden_size=768, intermediate_size=3072,
                                       num_attention_heads=12, projection_dim=768)
  assert cfg == CLIPTextConfig.from_hf(hf_cfg.to_dict(), scan_layers=True)
  with torch.device("meta"):
    want = sum(p.numel() for p in transformers.CLIPTextModel(hf_cfg).parameters())
  shapes = jax.eval_shape(lambda: CLIPTextEncoder(cfg).init(
      jax.random.key(0), jnp.zeros((1, 77), jnp.int32)))
  assert sum(x.size for x in jax.tree.leaves(nn.unbox(shapes))) == want == 123_060_480
