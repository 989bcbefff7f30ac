"""Q-Former: layout, encoder mask, scan over layer groups, dropout, real size."""
from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from aligncap_jax.config import base_config
from aligncap_jax.models.qformer import QFormer, QFormerConfig
from tolerance import assert_reorder_close  # noqa: E402


def _setup(cfg, b=2, length=6):
  enc = jax.random.normal(jax.random.key(0), (b, length, cfg.encoder_hidden_size))
  params = nn.unbox(QFormer(cfg).init(jax.random.key(1), enc))["params"]
  return enc, params


def test_layout_queries_and_cross_attention_frequency():
  cfg = QFormerConfig.tiny(num_layers=4, cross_attention_frequency=2, encoder_hidden_size=24)
  enc, params = _setup(cfg)
  assert params["query_tokens"].shape == (1, 4, 32)
  assert "layernorm" in params
  assert [("cross_attn" in params[f"layers_{i}"]) for i in range(4)] == [True, False, True, False]
  assert params["layers_0"]["cross_attn"]["key"]["kernel"].shape == (24, 4, 8)
  out = QFormer(cfg).apply({"params": params}, enc)
  assert out.shape == (2, 4, 32)


def test_output_depends_on_encoder_only_through_unmasked_tokens():
  cfg = QFormerConfig.tiny()
  enc, params = _setup(cfg)
  mask = jnp.array([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]])
  out = QFormer(cfg).apply({"params": params}, enc, mask)
  enc2 = enc.at[0, 4:].set(100.0)
  out2 = QFormer(cfg).apply({"params": params}, enc2, mask)
  assert_reorder_close(out2, out, depth=cfg.num_layers)
  # ... and masking the padding equals dropping it.
  out3 = QFormer(cfg).apply({"params": params}, enc[:1, :4])
  assert_reorder_close(out[:1], out3, depth=cfg.num_layers)
  # Unmasked tokens do matter.
  out4 = QFormer(cfg).apply({"params": params}, enc.at[0, 0].set(3.0), mask)
  assert np.abs(np.asarray(out4[0] - out[0])).max() > 1e-3


def test_scan_over_layer_groups_matches_unscanned():
  cfg = QFormerConfig.tiny(num_layers=6, cross_attention_frequency=3)
  enc, params = _setup(cfg)
  want = QFormer(cfg).apply({"params": params}, enc)
  groups = 2
  scanned = {k: v for k, v in params.items() if not k.startswith("layers_")}
  scanned["layers"] = {
      f"layer_{r}": jax.tree.map(lambda *xs: jnp.stack(xs),
                                 *[params[f"layers_{g * 3 + r}"] for g in range(groups)])
      for r in range(3)}
  for remat in (False, True):
    c = dataclasses.replace(cfg, scan_layers=True, remat=remat)
    got = QFormer(c).apply({"params": scanned}, enc)
    assert_reorder_close(got, want, depth=cfg.num_layers)
  got = QFormer(dataclasses.replace(cfg, remat=True)).apply({"params": params}, enc)
  assert_reorder_close(got, want, depth=cfg.num_layers)
  boxed = jax.eval_shape(lambda: QFormer(dataclasses.replace(cfg, scan_layers=True)).init(
      jax.random.key(0), enc))["params"]
  kernel = boxed["layers"]["layer_0"]["cross_attn"]["query"]["kernel"]
  assert kernel.names == ("layers", "embed", "heads", "kv")
  assert boxed["query_tokens"].names == (None, None, "embed")


def test_scan_needs_whole_groups():
  with pytest.raises(ValueError, match="multiple of cross_attention_frequency"):
    QFormerConfig.tiny(num_layers=3, cross_attention_frequency=2, scan_layers=True)


def test_dropout_only_when_not_deterministic():
  cfg = QFormerConfig.tiny(dropout=0.5)
  enc, params = _setup(cfg)
  det = QFormer(cfg).apply({"params": params}, enc)
  det2 = QFormer(cfg).apply({"params": params}, enc, rngs={"dropout": jax.random.key(5)})
  np.testing.assert_array_equal(det, det2)
  drop = QFormer(cfg).apply({"params": params}, enc, deterministic=False,
                            rngs={"dropout": jax.random.key(5)})
  assert np.abs(np.asarray(drop - det)).max() > 1e-2
  no_drop = QFormer(dataclasses.replace(cfg, dropout=0.0)).apply(
      {"params": params}, enc, deterministic=False, rngs={"dropout": jax.random.key(5)})
  assert_reorder_close(no_drop, det, depth=cfg.num_layers)


def test_wrong_encoder_width_is_an_error():
  cfg = QFormerConfig.tiny()
  _, params = _setup(cfg)
  with pytest.raises(ValueError, match="encoder_hidden_size 32"):
    QFormer(cfg).apply({"params": params}, jnp.zeros((1, 3, 16)))


def test_from_config_and_real_size_matches_transformers():
  transformers = pytest.importorskip("transformers")
  torch = pytest.importorskip("torch")
  cfg = QFormerConfig.from_config(base_config().model.qformer, scan_layers=True)
  assert (cfg.num_query_tokens, cfg.hidden_size, cfg.num_layers) == (32, 768, 12)
  with torch.device("meta"):
    hf = transformers.Blip2QFormerModel(transformers.Blip2QFormerConfig())
  want = sum(p.numel() for p in hf.parameters()) + 32 * 768  # + query_tokens
  shapes = jax.eval_shape(lambda: QFormer(cfg).init(jax.random.key(0),
                                                    jnp.zeros((1, 257, 1408))))
  assert sum(x.size for x in jax.tree.leaves(nn.unbox(shapes))) == want
  assert cfg == QFormerConfig.from_hf({"qformer_config": transformers.Blip2QFormerConfig()
                                       .to_dict(), "num_query_tokens": 32}, scan_layers=True)
