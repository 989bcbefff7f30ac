"""Multi-head scaled dot-product attention shared by the model blocks."""
from __future__ import annotations

import jax
import jax.numpy as jnp


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array,
                          mask: jax.Array | None = None) -> jax.Array:
  """Softmax attention of every query over its batch element's keys.

  The logits and the softmax are computed in float32 (float64 for float64
  inputs); the output has the dtype of `v`. A query whose keys are all masked gets zeros.

  Args:
    q: float[B, Lq, H, Dh] queries (not yet scaled).
    k: float[B, Lk, H, Dh] keys.
    v: float[B, Lk, H, Dv] values.
    mask: optional bool array broadcastable to [B, H, Lq, Lk]; True = attend
      (e.g. a key padding mask as `mask[:, None, None, :]`).

  Returns:
    float[B, Lq, H, Dv].
  """
  if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
    raise ValueError(
        "dot_product_attention: q, k, v must be [B, L, H, Dh], got "
        f"{q.shape}, {k.shape}, {v.shape}")
  acc = jnp.promote_types(jnp.result_type(q, k), jnp.float32)
  scale = 1.0 / jnp.sqrt(jnp.asarray(q.shape[-1], acc))
  logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=acc) * scale
  if mask is not None:
    logits = jnp.where(mask, logits, jnp.finfo(acc).min)
  weights = jax.nn.softmax(logits, axis=-1)
  if mask is not None:
    weights = jnp.where(mask, weights, 0.0)
  return jnp.einsum("bhqk,bkhd->bqhd", weights.astype(v.dtype), v)
