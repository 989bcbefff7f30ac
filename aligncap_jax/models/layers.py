"""Small building blocks shared by AlignCap's trainable heads.

Every parameter carries logical axis names (`embed`, `heads`, `kv`, `mlp`);
the config's rules map them to mesh axes.
"""
from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from aligncap_jax.models.vit import DenseGeneral

Dtype = Any


def dense(features: int, axes: tuple, name: str, dtype: Dtype, param_dtype: Dtype,
          use_bias: bool = True) -> nn.Dense:
  """nn.Dense whose kernel/bias carry logical axis names `axes` = (in, out)."""
  return nn.Dense(
      features, use_bias=use_bias, dtype=dtype, param_dtype=param_dtype, name=name,
      kernel_init=nn.with_logical_partitioning(nn.initializers.xavier_uniform(), axes),
      bias_init=nn.with_logical_partitioning(nn.initializers.zeros, (axes[1],)))


def layer_norm(name: str, dtype: Dtype, param_dtype: Dtype, eps: float = 1e-5) -> nn.LayerNorm:
  return nn.LayerNorm(
      epsilon=eps, dtype=dtype, param_dtype=param_dtype, name=name,
      scale_init=nn.with_logical_partitioning(nn.initializers.ones, ("embed",)),
      bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)))


class Attention(nn.Module):
  """Multi-head attention with separate query / key / value inputs.

  Attributes:
    num_heads: number of heads; the width of `inputs_q` must be divisible by it.
  """
  num_heads: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, inputs_q, inputs_k, inputs_v, mask=None):
    """Attends `inputs_q` float[..., Lq, C] to keys float[..., Lk, Ck] / values float[..., Lk, Cv].

    Args:
      mask: optional bool[..., Lk] (True = attend) broadcast over heads and queries.

    Returns:
      float[..., Lq, C].
    """
    width = inputs_q.shape[-1]
    if width % self.num_heads:
      raise ValueError(f"width {width} is not divisible by num_heads={self.num_heads}")
    head_dim = width // self.num_heads

    def proj(name):
      return DenseGeneral(
          (self.num_heads, head_dim), dtype=self.dtype, param_dtype=self.param_dtype,
          name=name,
          kernel_init=nn.with_logical_partitioning(
              nn.initializers.xavier_uniform(), ("embed", "heads", "kv")),
          bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("heads", "kv")))

    q = proj("query")(inputs_q)
    k = proj("key")(inputs_k)
    v = proj("value")(inputs_v)
    logits = jnp.einsum("...qhd,...khd->...hqk", q, k) / jnp.sqrt(head_dim).astype(q.dtype)
    if mask is not None:
      big_neg = jnp.finfo(logits.dtype).min
      logits = jnp.where(mask[..., None, None, :], logits, big_neg)
    weights = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(v.dtype)
    out = jnp.einsum("...hqk,...khd->...qhd", weights, v)
    return DenseGeneral(
        width, axis=(-2, -1), dtype=self.dtype, param_dtype=self.param_dtype, name="out",
        kernel_init=nn.with_logical_partitioning(
            nn.initializers.xavier_uniform(), ("heads", "kv", "embed")),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)))(out)


class Mlp(nn.Module):
  """Dense(hidden) -> act -> [Dense(hidden) -> act]* -> Dense(width)."""
  hidden: int
  num_hidden_layers: int = 1
  activation: Callable = nn.gelu
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    width = x.shape[-1]
    for i in range(self.num_hidden_layers):
      x = dense(self.hidden, ("embed" if i == 0 else None, "mlp"), f"fc{i + 1}",
                self.dtype, self.param_dtype)(x)
      x = self.activation(x)
    return dense(width, ("mlp", "embed"), f"fc{self.num_hidden_layers + 1}",
                 self.dtype, self.param_dtype)(x)


class CrossAttentionLayer(nn.Module):
  """BERT-style post-LN [cross-attention + FFN] with no self-attention.

  x = LN(x + Attn(q=x, kv=memory)); x = LN(x + FFN(x)).
  """
  num_heads: int
  mlp_dim: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, memory, memory_mask=None):
    a = Attention(self.num_heads, self.dtype, self.param_dtype, name="attn")(
        x, memory, memory, memory_mask)
    x = layer_norm("ln_attn", self.dtype, self.param_dtype, 1e-12)(x + a)
    f = Mlp(self.mlp_dim, 1, nn.gelu, self.dtype, self.param_dtype, name="ffn")(x)
    return layer_norm("ln_ffn", self.dtype, self.param_dtype, 1e-12)(x + f)
