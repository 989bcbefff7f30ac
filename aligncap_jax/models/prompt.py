"""The tag prompt of DESIGN.md section 3, built on device from predicted tags."""
from __future__ import annotations

import jax
import jax.numpy as jnp


def build_prompt_on_device(tag_on, tokens, lens, comma_id, bar_id, eos_id, max_len):
  """The tag prompt of DESIGN.md section 3, built without a host round trip.

  Selected tags (vocabulary order) joined by `comma_id`, then `bar_id`, then
  `eos_id`; when too long the sequence is cut to max_len - 1 and EOS appended.
  Same rule as `aligncap_jax.data.pipeline.build_prompt` on the host.

  Args:
    tag_on: bool[B, V] selected tags.
    tokens: int32[V, Lt] each tag's token ids (right-padded); lens: int32[V].
  Returns:
    (int32[B, max_len] tokens, int32[B, max_len] mask).
  """
  b, v = tag_on.shape
  lt = tokens.shape[1]
  seg = jnp.where(tag_on, lens + 1, 0)                       # tag tokens + separator
  start = jnp.cumsum(seg, axis=1) - seg                      # [B, V]
  total = jnp.sum(seg, axis=1)                               # [B]
  k = jnp.arange(lt + 1)
  tok = jnp.concatenate([tokens, jnp.zeros((v, 1), tokens.dtype)], axis=1)
  tok = jnp.where(k[None, :] == lens[:, None], comma_id, tok)  # [V, Lt+1]
  pos = start[:, :, None] + k[None, None, :]                 # [B, V, Lt+1]
  keep = tag_on[:, :, None] & (k[None, None, :] <= lens[None, :, None])
  # Separator after the last tag becomes '|'; with no tags the '|' sits at 0.
  length = jnp.maximum(total, 1)                             # tokens before EOS
  pos = jnp.where(keep, pos, max_len + lt + 2)               # out of range -> dropped
  buf = jnp.zeros((b, max_len + lt + 3), jnp.int32)
  buf = jax.vmap(lambda bb, p, t: bb.at[p.reshape(-1)].set(
      jnp.broadcast_to(t, p.shape).reshape(-1), mode="drop"), in_axes=(0, 0, None))(
      buf, pos, tok)
  buf = buf.at[jnp.arange(b), length - 1].set(bar_id, mode="drop")
  n = jnp.minimum(length, max_len - 1)                       # cut, keep EOS last
  buf = buf[:, :max_len]
  idx = jnp.arange(max_len)[None, :]
  out = jnp.where(idx < n[:, None], buf, 0)
  out = jnp.where(idx == n[:, None], eos_id, out)
  return out.astype(jnp.int32), (idx <= n[:, None]).astype(jnp.int32)
