"""Asymmetric loss for multi-label tagging (Ridnik et al., ICCV 2021)."""
from __future__ import annotations

import jax
import jax.numpy as jnp


def _focal_weight(base: jax.Array, gamma: float) -> jax.Array:
  """`base ** gamma` with a finite gradient at base == 0 (and 1 when gamma == 0)."""
  if gamma == 0.0:
    return jnp.ones_like(base)
  safe = jnp.where(base > 0, base, 1.0)
  return jnp.where(base > 0, safe ** gamma, 0.0)


def asymmetric_loss(logits: jax.Array, labels: jax.Array, *, gamma_neg: float = 7.0,
                    gamma_pos: float = 0.0, clip: float = 0.05, eps: float = 1e-8,
                    mask: jax.Array | None = None) -> jax.Array:
  """ASL summed over tags and averaged over (valid) regions.

  As the public reference: p = sigmoid(logit); negatives use the shifted
  probability `p_m = max(p - clip, 0)` (i.e. `1 - p_m = min(1 - p + clip, 1)`);
  `L = -sum[y * (1-p)^gamma_pos * log(max(p, eps))
            + (1-y) * p_m^gamma_neg * log(max(1 - p_m, eps))]`.
  Computed in float32.

  Args:
    logits: float[B, V] one logit per tag.
    labels: float/int/bool[B, V] multi-hot targets.
    gamma_neg: focusing exponent of the negatives.
    gamma_pos: focusing exponent of the positives.
    clip: probability margin of the negatives (0 disables shifting).
    eps: floor inside the logs.
    mask: optional [B] (bool or 0/1): regions that count; the mean is over them.

  Returns:
    float32 scalar.
  """
  if logits.shape != labels.shape or logits.ndim != 2:
    raise ValueError(
        f"asymmetric_loss: logits and labels must both be [B, V], got {logits.shape} "
        f"and {labels.shape}")
  x = logits.astype(jnp.float32)
  y = labels.astype(jnp.float32)
  p = jax.nn.sigmoid(x)
  q = 1.0 - p
  if clip > 0:
    q = jnp.minimum(q + clip, 1.0)
  loss = (y * jnp.log(jnp.maximum(p, eps)) * _focal_weight(1.0 - p, gamma_pos)
          + (1.0 - y) * jnp.log(jnp.maximum(q, eps)) * _focal_weight(1.0 - q, gamma_neg))
  per_region = -jnp.sum(loss, axis=-1)
  if mask is None:
    return jnp.mean(per_region)
  if mask.shape != per_region.shape:
    raise ValueError(f"asymmetric_loss: mask must be [B]={per_region.shape}, got {mask.shape}")
  m = mask.astype(jnp.float32)
  return jnp.sum(per_region * m) / jnp.maximum(jnp.sum(m), 1.0)
