"""Pairwise sigmoid loss (paper Eq. 2/3 in the SigLIP form) for any pair scorer.

`L = -(1/N) * sum_ij log sigmoid(z_ij * (exp(log_t) * s_ij + b))`, z = +1 on the
diagonal and -1 elsewhere, s_ij = score_fn(score_params, x[i], y[j]).

Three forms with the same value and gradients:
- dense: all N x N scores at once (the reference; O(N^2) memory);
- chunked: `lax.scan` over column blocks of `y`, each block rematerialised in the
  backward pass, so at most one [N, block] block of scores (and of the scorer's
  per-pair activations) is live: O(N * block) memory;
- ring: `jax.shard_map` over the mesh axes the batch is sharded on; each device
  keeps its rows of `x` and the blocks of `y` travel around the ring with
  `lax.ppermute`; the backward pass is a second trip round the ring that
  recomputes each step's pairs: O((N / devices)^2) memory per device.

`x` and `y` may be pytrees whose leaves share the leading axis N (e.g. a
scorer's pre-projected keys/values plus a token mask); blocks are cut and
passed leaf by leaf.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

ScoreFn = Callable[[Any, Any, Any], jax.Array]


def dot_score(params: Any, rows: jax.Array, cols: jax.Array) -> jax.Array:
  """The default scorer: `rows @ cols.T` of float[r, D] and float[c, D] -> float[r, c]."""
  del params
  out_dtype = jnp.promote_types(jnp.result_type(rows, cols), jnp.float32)
  return jnp.einsum("rd,cd->rc", rows, cols, preferred_element_type=out_dtype,
                    precision=jax.lax.Precision.HIGHEST)


def _leading_size(tree: Any, name: str) -> int:
  leaves = jax.tree.leaves(tree)
  if not leaves:
    raise ValueError(f"pairwise_sigmoid_loss: '{name}' has no array leaves")
  sizes = {leaf.shape[0] if leaf.ndim else None for leaf in leaves}
  if len(sizes) != 1 or None in sizes:
    shapes = [leaf.shape for leaf in leaves]
    raise ValueError(
        f"pairwise_sigmoid_loss: every leaf of '{name}' needs the same leading axis N, "
        f"got shapes {shapes}")
  return sizes.pop()


def _check_inputs(x: Any, y: Any, score_fn: ScoreFn | None) -> int:
  n = _leading_size(x, "x")
  m = _leading_size(y, "y")
  if n != m:
    raise ValueError(f"pairwise_sigmoid_loss: x has N={n} rows but y has N={m}")
  if score_fn is None:
    for name, t in (("x", x), ("y", y)):
      if not hasattr(t, "ndim") or t.ndim != 2:
        raise ValueError(
            f"pairwise_sigmoid_loss: with score_fn=None '{name}' must be one float[N, D] "
            "array (pass a score_fn for token sets or pytrees)")
  return n


def _as_float(a: Any) -> jax.Array:
  a = jnp.asarray(a)
  return a.astype(jnp.promote_types(a.dtype, jnp.float32))


def _acc_dtype(*trees: Any) -> jnp.dtype:
  """float32, or float64 when an input is float64 (for x64 references)."""
  floats = [l.dtype for l in jax.tree.leaves(trees) if jnp.issubdtype(l.dtype, jnp.floating)]
  return jnp.promote_types(jnp.result_type(*floats) if floats else jnp.float32, jnp.float32)


def _block_terms(s: jax.Array, log_t: jax.Array, b: jax.Array, row_ids: jax.Array,
                 col_ids: jax.Array, col_valid: jax.Array | None = None) -> jax.Array:
  """Sum of -log sigmoid(z * logit) over one [r, c] block of scores."""
  s = s.astype(jnp.promote_types(s.dtype, jnp.float32))
  logits = jnp.exp(log_t).astype(s.dtype) * s + b.astype(s.dtype)
  z = jnp.where(row_ids[:, None] == col_ids[None, :], 1.0, -1.0)
  terms = -jax.nn.log_sigmoid(z * logits)
  if col_valid is not None:
    terms = jnp.where(col_valid[None, :], terms, 0.0)
  return jnp.sum(terms)


def _dense_sum(x, y, log_t, b, score_fn, score_params) -> jax.Array:
  n = _leading_size(x, "x")
  ids = jnp.arange(n)
  return _block_terms(score_fn(score_params, x, y), log_t, b, ids, ids)


def _chunked_sum(x, y, log_t, b, score_fn, score_params, block_size: int) -> jax.Array:
  """Sum over all (row, column) pairs, scanning over column blocks of y."""
  n_rows = _leading_size(x, "x")
  n = _leading_size(y, "y")
  num_blocks = -(-n // block_size)
  padded = num_blocks * block_size
  # Pad by repeating real columns (never zeros: a scorer may normalise them).
  take = jnp.arange(padded) % n
  y_blocks = jax.tree.map(
      lambda a: jnp.take(a, take, axis=0).reshape((num_blocks, block_size) + a.shape[1:]), y)
  row_ids = jnp.arange(n_rows)

  @jax.checkpoint
  def block_sum(params, lt, bias, y_blk, start):
    col_ids = start + jnp.arange(block_size)
    s = score_fn(params, x, y_blk)
    return _block_terms(s, lt, bias, row_ids, col_ids, col_ids < n)

  def body(acc, inputs):
    y_blk, start = inputs
    return acc + block_sum(score_params, log_t, b, y_blk, start).astype(acc.dtype), None

  starts = jnp.arange(num_blocks) * block_size
  total, _ = jax.lax.scan(body, jnp.zeros((), _acc_dtype(x, y)), (y_blocks, starts))
  return total


def pairwise_sigmoid_loss(x: Any, y: Any, log_t: jax.Array, b: jax.Array, *,
                          block_size: int | None = None,
                          score_fn: ScoreFn | None = None,
                          score_params: Any = None) -> jax.Array:
  """Pairwise sigmoid loss on one device, dense or chunked over column blocks.

  Args:
    x: row items, float[N, D] (L2-normalised) for the dot scorer, or any pytree
      whose leaves have leading axis N that `score_fn` accepts as rows.
    y: column items, float[N, D] or a pytree with leading axis N.
    log_t: float[] log temperature.
    b: float[] bias.
    block_size: None for the dense form; an int scans over column blocks of
      this size (any N: the last block is padded and masked).
    score_fn: `score_fn(score_params, rows, cols) -> float[r, c]`; None is the
      dot product.
    score_params: pytree passed to `score_fn` (gradients flow to every leaf).

  Returns:
    float32 scalar loss.
  """
  n = _check_inputs(x, y, score_fn)
  score_fn = score_fn or dot_score
  log_t, b = _as_float(log_t), _as_float(b)
  if block_size is None:
    total = _dense_sum(x, y, log_t, b, score_fn, score_params)
  else:
    if int(block_size) < 1:
      raise ValueError(f"pairwise_sigmoid_loss: block_size must be >= 1, got {block_size}")
    total = _chunked_sum(x, y, log_t, b, score_fn, score_params, min(int(block_size), n))
  return total / n


def _mesh_size(mesh: jax.sharding.Mesh, axis_names: Sequence[str], name: str) -> int:
  for a in axis_names:
    if a not in mesh.shape:
      raise ValueError(f"{name}: axis '{a}' is not in the mesh axes {tuple(mesh.shape)}")
  size = 1
  for a in axis_names:
    size *= mesh.shape[a]
  return size


def _sharded(local_fn, x, y, log_t, b, score_fn, score_params, mesh, axis_names, name):
  """Runs `local_fn(x_loc, y_loc, log_t, b, params)` -> local sum on every device.

  Replicated inputs (log_t, b, score_params) enter with an explicit leading
  device axis, so that the gradient of each device's copy comes back as one
  slice and the broadcast's transpose sums them: exact gradients without relying
  on shard_map's replication tracking (off here, `check_vma=False`).
  """
  axis_names = tuple(axis_names)
  n = _check_inputs(x, y, score_fn)
  score_fn = score_fn or dot_score
  devices = _mesh_size(mesh, axis_names, name)
  if n % devices:
    raise ValueError(
        f"{name}: N={n} rows must be divisible by the {devices} devices of mesh axes "
        f"{axis_names}")
  spec = P(axis_names)
  rep = lambda a: jnp.broadcast_to(jnp.asarray(a)[None], (devices,) + jnp.shape(a))
  replicated = jax.tree.map(rep, (_as_float(log_t), _as_float(b), score_params))

  def per_device(x_loc, y_loc, rep_loc):
    lt, bias, params = jax.tree.map(lambda a: a[0], rep_loc)
    return local_fn(x_loc, y_loc, lt, bias, params, score_fn, n // devices, devices)[None]

  sums = jax.shard_map(
      per_device, mesh=mesh,
      in_specs=(jax.tree.map(lambda _: spec, x), jax.tree.map(lambda _: spec, y),
                jax.tree.map(lambda _: spec, replicated)),
      out_specs=spec, check_vma=False)(x, y, replicated)
  return jnp.sum(sums) / n


def _is_float(a: jax.Array) -> bool:
  return jnp.issubdtype(a.dtype, jnp.inexact)


def _float_leaves(tree: Any) -> list[jax.Array]:
  return [a for a in jax.tree.leaves(tree) if _is_float(a)]


def _with_float_leaves(tree: Any, floats: Sequence[jax.Array]) -> Any:
  """`tree` with its float leaves replaced, in order, by `floats`."""
  leaves, treedef = jax.tree.flatten(tree)
  it = iter(floats)
  return jax.tree.unflatten(treedef, [next(it) if _is_float(a) else a for a in leaves])


def _cotangent(tree: Any, float_grads: Sequence[jax.Array]) -> Any:
  """Full cotangent of `tree`: the float gradients, float0 zeros elsewhere."""
  leaves, treedef = jax.tree.flatten(tree)
  it = iter(float_grads)
  return jax.tree.unflatten(treedef, [
      next(it) if _is_float(a) else np.zeros(a.shape, jax.dtypes.float0) for a in leaves])


def _ring_local(x_loc, y_loc, log_t, b, params, score_fn, n_loc, devices, axis_names):
  """Sum of this device's rows against all columns, the y blocks circling the ring.

  A custom VJP keeps the backward pass a ring too: it sends the y blocks round
  again, recomputes each step's pairs, and the gradient of each y block travels
  with the block until both are back home. Nothing per step is stored, so
  per-device memory stays one block of pairs plus O(N/d) rows (autodiff through
  the forward scan would keep every visiting y block: O(N) per device).
  """
  perm = [(i, (i + 1) % devices) for i in range(devices)]
  shift = lambda t: jax.tree.map(lambda a: jax.lax.ppermute(a, axis_names, perm), t)
  acc_dtype = _acc_dtype(x_loc, y_loc)
  # Traced values are created inside the custom-VJP functions, never closed over.
  me = lambda: jax.lax.axis_index(axis_names)

  def step_sum(x, y_blk, lt, bias, p, step):
    src = (me() - step) % devices
    s = score_fn(p, x, y_blk)
    return _block_terms(s, lt, bias, me() * n_loc + jnp.arange(n_loc),
                        src * n_loc + jnp.arange(n_loc)).astype(acc_dtype)

  @jax.custom_vjp
  def ring(x, y, lt, bias, p):
    def body(carry, step):
      acc, y_blk = carry
      acc = acc + step_sum(x, y_blk, lt, bias, p, step)
      return (acc, shift(y_blk)), None
    (total, _), _ = jax.lax.scan(body, (jnp.zeros((), acc_dtype), y), jnp.arange(devices))
    return total

  def ring_fwd(x, y, lt, bias, p):
    return ring(x, y, lt, bias, p), (x, y, lt, bias, p)

  def ring_bwd(res, g):
    x, y, lt, bias, p = res
    xf, pf = _float_leaves(x), _float_leaves(p)

    def body(carry, step):
      dx, dy_blk, dlt, db, dp, y_blk = carry
      fn = lambda xf_, yf_, lt_, b_, pf_: step_sum(
          _with_float_leaves(x, xf_), _with_float_leaves(y_blk, yf_), lt_, b_,
          _with_float_leaves(p, pf_), step)
      _, vjp = jax.vjp(fn, xf, _float_leaves(y_blk), lt, bias, pf)
      gx, gy, glt, gb, gp = vjp(g.astype(acc_dtype))
      add = lambda u, v: jax.tree.map(jnp.add, u, v)
      dy_blk = add(dy_blk, gy)
      return (add(dx, gx), shift(dy_blk), dlt + glt, db + gb, add(dp, gp), shift(y_blk)), None

    zeros = lambda t: jax.tree.map(jnp.zeros_like, t)
    init = (zeros(xf), zeros(_float_leaves(y)), jnp.zeros_like(lt), jnp.zeros_like(bias),
            zeros(pf), y)
    (dx, dy, dlt, db, dp, _), _ = jax.lax.scan(body, init, jnp.arange(devices))
    return (_cotangent(x, dx), _cotangent(y, dy), dlt, db, _cotangent(p, dp))

  ring.defvjp(ring_fwd, ring_bwd)
  return ring(x_loc, y_loc, log_t, b, params)


def sharded_pairwise_sigmoid_loss(x: Any, y: Any, log_t: jax.Array, b: jax.Array, *,
                                  mesh: jax.sharding.Mesh,
                                  axis_names: Sequence[str] = ("data",),
                                  score_fn: ScoreFn | None = None,
                                  score_params: Any = None) -> jax.Array:
  """Ring form: rows stay on their device, column blocks travel around the ring.

  Equal in value and gradients to `pairwise_sigmoid_loss` on the gathered
  arrays. Per-device memory is one [N/d, N/d] block of scores (and of the
  scorer's per-pair activations) plus O(N/d) rows: the backward pass goes
  round the ring again, recomputing each step's pairs, with each y block's
  gradient travelling along with it.

  Args:
    x: row items (float[N, D] or a pytree with leading axis N), sharded or
      shardable by rows over `axis_names`.
    y: column items, same leading axis N.
    log_t: float[] log temperature (replicated).
    b: float[] bias (replicated).
    mesh: the device mesh.
    axis_names: the mesh axes the batch is split over, e.g. ("data", "fsdp").
      N must be divisible by the product of their sizes.
    score_fn: `score_fn(score_params, rows, cols) -> float[r, c]`; None is the
      dot product.
    score_params: pytree passed to `score_fn` (replicated).

  Returns:
    float32 scalar loss.
  """
  axis_names = tuple(axis_names)
  local = lambda *a: _ring_local(*a, axis_names=axis_names)
  return _sharded(local, x, y, log_t, b, score_fn, score_params, mesh, axis_names,
                  "sharded_pairwise_sigmoid_loss")


def _allgather_local(x_loc, y_loc, log_t, b, params, score_fn, n_loc, devices, axis_names):
  me = jax.lax.axis_index(axis_names)
  y_all = jax.tree.map(lambda a: jax.lax.all_gather(a, axis_names, tiled=True), y_loc)
  s = score_fn(params, x_loc, y_all)
  return _block_terms(s, log_t, b, me * n_loc + jnp.arange(n_loc), jnp.arange(n_loc * devices))


def reference_allgather_pairwise_sigmoid_loss(
    x: Any, y: Any, log_t: jax.Array, b: jax.Array, *, mesh: jax.sharding.Mesh,
    axis_names: Sequence[str] = ("data",), score_fn: ScoreFn | None = None,
    score_params: Any = None) -> jax.Array:
  """The PyTorch reference strategy, for comparison: all-gather every column
  item, then score the local rows against all N columns at once
  (O(N/d * N) pairs per device). Same arguments and result as
  `sharded_pairwise_sigmoid_loss`."""
  axis_names = tuple(axis_names)
  local = lambda *a: _allgather_local(*a, axis_names=axis_names)
  return _sharded(local, x, y, log_t, b, score_fn, score_params, mesh, axis_names,
                  "reference_allgather_pairwise_sigmoid_loss")
