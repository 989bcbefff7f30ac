"""Token cross-entropy of the caption (L_cap)."""
from __future__ import annotations

import jax
import jax.numpy as jnp


def caption_cross_entropy(logits: jax.Array, targets: jax.Array,
                          mask: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Mean next-token cross-entropy over unmasked tokens, in float32.

  Args:
    logits: float[B, T, V] (any float dtype; upcast to float32).
    targets: int[B, T] token ids.
    mask: bool/0-1[B, T]; padding is 0.

  Returns:
    (float32 scalar mean over unmasked tokens (0 when none), float32 token count).
  """
  if logits.ndim != 3 or targets.shape != logits.shape[:2] or mask.shape != targets.shape:
    raise ValueError(
        "caption_cross_entropy: need logits [B, T, V], targets [B, T] and mask [B, T], got "
        f"{logits.shape}, {targets.shape}, {mask.shape}")
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  nll = -jnp.take_along_axis(logp, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
  m = mask.astype(jnp.float32)
  count = jnp.sum(m)
  return jnp.sum(nll * m) / jnp.maximum(count, 1.0), count
