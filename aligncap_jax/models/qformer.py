"""BLIP-2's Q-Former, the sampler of AlignCap (DESIGN.md section 3, "Sampler").

As HF `Blip2QFormerModel` runs inside `Blip2ForConditionalGeneration`: learned
query tokens only (no text), `layernorm` + dropout on the queries, then BERT
(post-LN) layers of self-attention, cross-attention to the encoder states in
every layer with `layer_idx % cross_attention_frequency == 0`, and the query
feed-forward block (`intermediate_query` / `output_query`).

With `scan_layers`, the layers are scanned in groups of
`cross_attention_frequency` (one cross-attention layer followed by the plain
ones), so `num_layers` must be a multiple of it; params then sit under
`layers/layer_{j}` with a leading `layers` axis of size
`num_layers / cross_attention_frequency`.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from aligncap_jax.models.vit import (activation, apply_layers, dense,
                                     dot_product_attention, fields_from_config,
                                     layer_norm)

Dtype = Any


@dataclasses.dataclass(frozen=True)
class QFormerConfig:
  """Q-Former sizes (field names follow `config.model.qformer`)."""
  num_query_tokens: int = 32
  hidden_size: int = 768
  num_layers: int = 12
  num_heads: int = 12
  intermediate_size: int = 3072
  cross_attention_frequency: int = 2
  encoder_hidden_size: int = 1408
  layer_norm_eps: float = 1e-12
  hidden_act: str = "gelu"
  max_position_embeddings: int = 512
  vocab_size: int = 30522
  dropout: float = 0.0
  scan_layers: bool = False
  remat: bool = False

  def __post_init__(self):
    if self.hidden_size % self.num_heads:
      raise ValueError(f"QFormerConfig.hidden_size {self.hidden_size} is not divisible "
                       f"by num_heads {self.num_heads}")
    if self.cross_attention_frequency < 1:
      raise ValueError("QFormerConfig.cross_attention_frequency must be >= 1, got "
                       f"{self.cross_attention_frequency}")
    if self.scan_layers and self.num_layers % self.cross_attention_frequency:
      raise ValueError(
          f"QFormerConfig.scan_layers needs num_layers ({self.num_layers}) to be a "
          f"multiple of cross_attention_frequency ({self.cross_attention_frequency})")
    activation(self.hidden_act)

  @classmethod
  def tiny(cls, **overrides) -> QFormerConfig:
    """4 query tokens, 2 layers, 32 wide, cross-attending to 32-wide states."""
    kw = dict(num_query_tokens=4, hidden_size=32, num_layers=2, num_heads=4,
              intermediate_size=64, cross_attention_frequency=2,
              encoder_hidden_size=32, vocab_size=100, max_position_embeddings=32)
    kw.update(overrides)
    return cls(**kw)

  @classmethod
  def from_hf(cls, blip2: dict, **overrides) -> QFormerConfig:
    """From a full `Blip2Config` dict (its `qformer_config` and `num_query_tokens`);
    missing keys take transformers' defaults."""
    d = dict(vocab_size=30522, hidden_size=768, num_hidden_layers=12,
             num_attention_heads=12, intermediate_size=3072, hidden_act="gelu",
             layer_norm_eps=1e-12, max_position_embeddings=512,
             cross_attention_frequency=2, encoder_hidden_size=1408)
    d.update(blip2.get("qformer_config") or {})
    kw = dict(num_query_tokens=blip2.get("num_query_tokens", 32),
              hidden_size=d["hidden_size"], num_layers=d["num_hidden_layers"],
              num_heads=d["num_attention_heads"], intermediate_size=d["intermediate_size"],
              cross_attention_frequency=d["cross_attention_frequency"],
              encoder_hidden_size=d["encoder_hidden_size"],
              layer_norm_eps=d["layer_norm_eps"], hidden_act=d["hidden_act"],
              max_position_embeddings=d["max_position_embeddings"],
              vocab_size=d["vocab_size"])
    kw.update(overrides)
    return cls(**kw)

  def to_hf(self) -> dict:
    """The `qformer_config` fields this config fixes."""
    return dict(hidden_size=self.hidden_size, num_hidden_layers=self.num_layers,
                num_attention_heads=self.num_heads,
                intermediate_size=self.intermediate_size,
                cross_attention_frequency=self.cross_attention_frequency,
                encoder_hidden_size=self.encoder_hidden_size,
                layer_norm_eps=self.layer_norm_eps, hidden_act=self.hidden_act)

  @classmethod
  def from_config(cls, cd, **overrides) -> QFormerConfig:
    """From `config.model.qformer`; `overrides` set the rest (dropout, scan, remat)."""
    return cls(**fields_from_config(cls, cd, "model.qformer"), **overrides)


class BertAttention(nn.Module):
  """BERT attention block: `LayerNorm(x + dropout(out(attention(x -> kv))))`."""
  num_heads: int
  layer_norm_eps: float
  dropout: float = 0.0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, kv: jax.Array, mask: jax.Array | None,
               deterministic: bool) -> jax.Array:
    """x: float[B, Q, H]; kv: float[B, L, Ckv]; mask: bool [B, 1, 1, L] or None."""
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    hidden = x.shape[-1]
    head_dim = hidden // self.num_heads
    heads = (self.num_heads, head_dim)
    q = dense(heads, ("embed", "heads", "kv"), name="query", **kw)(x)
    k = dense(heads, ("embed", "heads", "kv"), name="key", **kw)(kv)
    v = dense(heads, ("embed", "heads", "kv"), name="value", **kw)(kv)
    rng = self.make_rng("dropout") if self.dropout and not deterministic else None
    out = dot_product_attention(q, k, v, mask, dropout_rate=self.dropout, dropout_rng=rng)
    out = dense(hidden, ("heads", "kv", "embed"), axis=(-2, -1), name="dense", **kw)(out)
    out = nn.Dropout(self.dropout)(out, deterministic=deterministic)
    return layer_norm(self.layer_norm_eps, name="norm", **kw)(out + x)


class QFormerLayer(nn.Module):
  """One Q-Former layer on the queries: self-attn, [cross-attn], query FFN."""
  config: QFormerConfig
  has_cross_attention: bool
  deterministic: bool = True
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, encoder_hidden: jax.Array,
               encoder_mask: jax.Array | None):
    """x: float[B, Q, H]; encoder_hidden: float[B, L, Ce] -> (float[B, Q, H], None)."""
    cfg = self.config
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    attn = dict(num_heads=cfg.num_heads, layer_norm_eps=cfg.layer_norm_eps,
                dropout=cfg.dropout, **kw)
    x = BertAttention(name="self_attn", **attn)(x, x, None, self.deterministic)
    if self.has_cross_attention:
      x = BertAttention(name="cross_attn", **attn)(x, encoder_hidden, encoder_mask,
                                                   self.deterministic)
    h = dense(cfg.intermediate_size, ("embed", "mlp"), name="fc1", **kw)(x)
    h = nn.with_logical_constraint(activation(cfg.hidden_act)(h), ("batch", "length", "mlp"))
    h = dense(cfg.hidden_size, ("mlp", "embed"), name="fc2", **kw)(h)
    h = nn.Dropout(cfg.dropout)(h, deterministic=self.deterministic)
    x = layer_norm(cfg.layer_norm_eps, name="ffn_norm", **kw)(h + x)
    return nn.with_logical_constraint(x, ("batch", "length", "embed")), None


class QFormerGroup(nn.Module):
  """`cross_attention_frequency` consecutive layers, the first with cross-attention."""
  config: QFormerConfig
  deterministic: bool = True
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, encoder_hidden, encoder_mask):
    for j in range(self.config.cross_attention_frequency):
      x, _ = QFormerLayer(self.config, j == 0, self.deterministic, self.dtype,
                          self.param_dtype, name=f"layer_{j}")(x, encoder_hidden,
                                                               encoder_mask)
    return x, None


class QFormer(nn.Module):
  """BLIP-2's Q-Former on its learned queries (no text input)."""
  config: QFormerConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, encoder_hidden: jax.Array, encoder_mask: jax.Array | None = None,
               deterministic: bool = True) -> jax.Array:
    """Samples the encoder states with the learned queries.

    Args:
      encoder_hidden: float[B, L, Ce] (e.g. the 257 region tokens).
      encoder_mask: optional bool/int [B, L]; 0 = padding, not attended.
      deterministic: False enables dropout (needs a 'dropout' rng).

    Returns:
      float[B, Q, H]: HF `last_hidden_state`.
    """
    cfg = self.config
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    if encoder_hidden.shape[-1] != cfg.encoder_hidden_size:
      raise ValueError(f"encoder_hidden width {encoder_hidden.shape[-1]} differs from "
                       f"QFormerConfig.encoder_hidden_size {cfg.encoder_hidden_size}")
    b = encoder_hidden.shape[0]
    query_tokens = self.param(
        "query_tokens", nn.with_logical_partitioning(nn.initializers.normal(0.02),
                                                     (None, None, "embed")),
        (1, cfg.num_query_tokens, cfg.hidden_size), self.param_dtype)
    x = jnp.broadcast_to(query_tokens.astype(self.dtype),
                         (b, cfg.num_query_tokens, cfg.hidden_size))
    x = layer_norm(cfg.layer_norm_eps, name="layernorm", **kw)(x)
    x = nn.Dropout(cfg.dropout)(x, deterministic=deterministic)
    encoder_hidden = nn.with_logical_constraint(encoder_hidden.astype(self.dtype),
                                                ("batch", "length", "embed"))
    mask = None
    if encoder_mask is not None:
      mask = encoder_mask.astype(bool)[:, None, None, :]
    if cfg.scan_layers:
      x = apply_layers(QFormerGroup, dict(config=cfg, deterministic=deterministic, **kw),
                       cfg.num_layers // cfg.cross_attention_frequency, x,
                       encoder_hidden, mask, scan_layers=True, remat=cfg.remat)
    else:
      cls = nn.remat(QFormerLayer) if cfg.remat else QFormerLayer
      for i in range(cfg.num_layers):
        x, _ = cls(cfg, i % cfg.cross_attention_frequency == 0, deterministic,
                   name=f"layers_{i}", **kw)(x, encoder_hidden, mask)
    return nn.with_logical_constraint(x, ("batch", "length", "embed"))
