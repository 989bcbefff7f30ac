"""The frozen CLIP text encoder (DESIGN.md section 3, "Tagging head").

HF `CLIPTextModel` (`CLIPTextTransformer`): token + position embeddings, causal
pre-LN transformer layers (the same layer as the CLIP vision tower), final layer
norm, and the pooled output taken at the end-of-text position exactly as HF
picks it: with the legacy `eos_token_id == 2` the argmax of the ids, otherwise
the first position holding `eos_token_id`.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from aligncap_jax.models.vit import (EncoderLayer, activation, apply_layers,
                                     fields_from_config, layer_norm)

Dtype = Any


@dataclasses.dataclass(frozen=True)
class CLIPTextConfig:
  """CLIP text tower sizes (field names follow `config.model.clip_text`)."""
  vocab_size: int = 49408
  hidden_size: int = 768
  num_layers: int = 12
  num_heads: int = 12
  intermediate_size: int = 3072
  max_position_embeddings: int = 77
  layer_norm_eps: float = 1e-5
  hidden_act: str = "quick_gelu"
  eos_token_id: int = 49407
  projection_dim: int = 768
  scan_layers: bool = False
  remat: bool = False

  def __post_init__(self):
    if self.hidden_size % self.num_heads:
      raise ValueError(f"CLIPTextConfig.hidden_size {self.hidden_size} is not divisible "
                       f"by num_heads {self.num_heads}")
    activation(self.hidden_act)

  @classmethod
  def tiny(cls, **overrides) -> CLIPTextConfig:
    """2 layers, 32 wide, 100 tokens, 16 positions, EOS id 99."""
    kw = dict(vocab_size=100, hidden_size=32, num_layers=2, num_heads=4,
              intermediate_size=64, max_position_embeddings=16, eos_token_id=99,
              projection_dim=16)
    kw.update(overrides)
    return cls(**kw)

  @classmethod
  def from_hf(cls, hf: dict, **overrides) -> CLIPTextConfig:
    """From a `CLIPTextConfig` dict or a `CLIPConfig` dict (its `text_config`);
    missing keys take transformers' defaults."""
    d = dict(vocab_size=49408, hidden_size=512, intermediate_size=2048,
             projection_dim=512, num_hidden_layers=12, num_attention_heads=8,
             max_position_embeddings=77, hidden_act="quick_gelu",
             layer_norm_eps=1e-5, eos_token_id=49407)
    if "text_config" in hf:
      d.update(hf["text_config"] or {})
      d.setdefault("projection_dim", hf.get("projection_dim", 512))
    else:
      d.update(hf)
    kw = dict(vocab_size=d["vocab_size"], hidden_size=d["hidden_size"],
              num_layers=d["num_hidden_layers"], num_heads=d["num_attention_heads"],
              intermediate_size=d["intermediate_size"],
              max_position_embeddings=d["max_position_embeddings"],
              layer_norm_eps=d["layer_norm_eps"], hidden_act=d["hidden_act"],
              eos_token_id=d["eos_token_id"], projection_dim=d["projection_dim"])
    kw.update(overrides)
    return cls(**kw)

  def to_hf(self) -> dict:
    """The text-config fields this config fixes."""
    return dict(vocab_size=self.vocab_size, hidden_size=self.hidden_size,
                num_hidden_layers=self.num_layers, num_attention_heads=self.num_heads,
                intermediate_size=self.intermediate_size,
                max_position_embeddings=self.max_position_embeddings,
                layer_norm_eps=self.layer_norm_eps, hidden_act=self.hidden_act,
                eos_token_id=self.eos_token_id)

  @classmethod
  def from_config(cls, cd, **overrides) -> CLIPTextConfig:
    """From `config.model.clip_text`; `overrides` set the rest (scan, remat)."""
    return cls(**fields_from_config(cls, cd, "model.clip_text"), **overrides)


def eos_positions(input_ids: jax.Array, eos_token_id: int) -> jax.Array:
  """int32[B]: where HF CLIP pools (argmax of ids if eos_token_id == 2, else the
  first position equal to eos_token_id; 0 when there is none, as HF)."""
  if eos_token_id == 2:
    return jnp.argmax(input_ids, axis=-1).astype(jnp.int32)
  return jnp.argmax(input_ids == eos_token_id, axis=-1).astype(jnp.int32)


class CLIPTextEncoder(nn.Module):
  """HF `CLIPTextModel` in Flax."""
  config: CLIPTextConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None
               ) -> tuple[jax.Array, jax.Array]:
    """Encodes token ids.

    Args:
      input_ids: int32[B, L], L <= max_position_embeddings.
      attention_mask: optional int/bool [B, L]; 0 = padding (not attended).

    Returns:
      (last_hidden float[B, L, D], pooled float[B, D]): HF `last_hidden_state`
      (after `final_layer_norm`) and `pooler_output`.
    """
    cfg = self.config
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    b, length = input_ids.shape
    if length > cfg.max_position_embeddings:
      raise ValueError(f"input_ids length {length} exceeds max_position_embeddings "
                       f"{cfg.max_position_embeddings}")
    tok = nn.Embed(cfg.vocab_size, cfg.hidden_size, name="token_embedding",
                   embedding_init=nn.with_logical_partitioning(
                       nn.initializers.normal(0.02), ("vocab", "embed")), **kw)
    pos = self.param("position_embedding",
                     nn.with_logical_partitioning(nn.initializers.normal(0.01),
                                                  (None, "embed")),
                     (cfg.max_position_embeddings, cfg.hidden_size), self.param_dtype)
    x = tok(input_ids) + pos[:length].astype(self.dtype)[None]
    x = nn.with_logical_constraint(x, ("batch", "length", "embed"))
    mask = jnp.tril(jnp.ones((length, length), bool))[None, None]
    if attention_mask is not None:
      mask = mask & attention_mask.astype(bool)[:, None, None, :]
    layer_kwargs = dict(num_heads=cfg.num_heads, mlp_dim=cfg.intermediate_size,
                        layer_norm_eps=cfg.layer_norm_eps, hidden_act=cfg.hidden_act,
                        qkv_bias=True, **kw)
    x = apply_layers(EncoderLayer, layer_kwargs, cfg.num_layers, x, mask,
                     scan_layers=cfg.scan_layers, remat=cfg.remat)
    x = layer_norm(cfg.layer_norm_eps, name="final_norm", **kw)(x)
    pooled = x[jnp.arange(b), eos_positions(input_ids, cfg.eos_token_id)]
    return x, pooled
