"""Spatial cross-view block and view fusion (paper 3.2, DESIGN.md section 3)."""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from aligncap_jax.models import layers

Dtype = Any


class CrossViewBlock(nn.Module):
  """Aligns a candidate view's tokens with the target view's tokens.

  In the paper's exact order: LN(candidate), LN(target) -> multi-head
  cross-attention (query = candidate, key = target, value = candidate, or the
  target with `value_from="target"`) -> dropout -> residual with the candidate
  -> LN -> MLP (two hidden layers, SiLU) -> residual.
  """
  num_heads: int = 8
  mlp_ratio: float = 4.0
  dropout: float = 0.1
  value_from: str = "candidate"
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, candidate, target, *, deterministic: bool = True):
    """Args: candidate, target float[B, L, C]. Returns float[B, L, C]."""
    if self.value_from not in ("candidate", "target"):
      raise ValueError(f"value_from must be 'candidate' or 'target', got {self.value_from!r}")
    c = layers.layer_norm("norm_candidate", self.dtype, self.param_dtype)(candidate)
    t = layers.layer_norm("norm_target", self.dtype, self.param_dtype)(target)
    v = c if self.value_from == "candidate" else t
    a = layers.Attention(self.num_heads, self.dtype, self.param_dtype, name="attn")(c, t, v)
    a = nn.Dropout(self.dropout)(a, deterministic=deterministic)
    x = candidate + a
    h = layers.layer_norm("norm_mlp", self.dtype, self.param_dtype)(x)
    h = layers.Mlp(int(candidate.shape[-1] * self.mlp_ratio), 2, nn.silu,
                   self.dtype, self.param_dtype, name="mlp")(h)
    return x + h


class ViewFusion(nn.Module):
  """Concatenate the j views along channels -> Linear(j*C -> C) -> ReLU -> Linear(C -> C)."""
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, views):
    """Args: views float[B, j, L, C]. Returns float[B, L, C]."""
    b, j, length, c = views.shape
    x = jnp.transpose(views, (0, 2, 1, 3)).reshape(b, length, j * c)
    x = layers.dense(c, (None, "mlp"), "fc1", self.dtype, self.param_dtype)(x)
    x = nn.relu(x)
    return layers.dense(c, ("mlp", "embed"), "fc2", self.dtype, self.param_dtype)(x)
