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

`valid` (bool[N], optional) marks padding: a row i and column i with
valid[i] == False take part in no pair, and the sum is divided by the number of
valid rows, so the loss and its gradients equal those of the valid subset alone.
Every form takes any N: the chunked form pads its last column block, the ring
pads N up to a multiple of its devices, both with masked copies of real items
(never zeros: a scorer may normalise them).
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


def _check_inputs(x: Any, y: Any, score_fn: ScoreFn | None, valid: Any,
                  name: str = "pairwise_sigmoid_loss") -> tuple[int, jax.Array | None]:
  """N, and `valid` as bool[N] (None stays None)."""
  n = _leading_size(x, "x")
  m = _leading_size(y, "y")
  if n != m:
    raise ValueError(f"{name}: x has N={n} rows but y has N={m}")
  if score_fn is None:
    for arg, t in (("x", x), ("y", y)):
      if not hasattr(t, "ndim") or t.ndim != 2:
        raise ValueError(
            f"{name}: with score_fn=None '{arg}' must be one float[N, D] "
            "array (pass a score_fn for token sets or pytrees)")
  if valid is None:
    return n, None
  valid = jnp.asarray(valid)
  if valid.shape != (n,):
    raise ValueError(f"{name}: valid must have shape ({n},) like the rows, got {valid.shape}")
  return n, valid.astype(bool)


def _mean(total: jax.Array, n: int, valid: jax.Array | None) -> jax.Array:
  """`total` over the number of valid rows (N without a mask; 1 if none is valid)."""
  if valid is None:
    return total / n
  return total / jnp.maximum(jnp.sum(valid), 1).astype(total.dtype)


def _as_float(a: Any) -> jax.Array:
  a = jnp.asarray(a)
  return a.astype(jnp.promote_types(a.dtype, jnp.float32))


def _acc_dtype(*trees: Any) -> jnp.dtype:
  """float32, or float64 when an input is float64 (for x64 references)."""
  floats = [l.dtype for l in jax.tree.leaves(trees) if jnp.issubdtype(l.dtype, jnp.floating)]
  return jnp.promote_types(jnp.result_type(*floats) if floats else jnp.float32, jnp.float32)


def _block_terms(s: jax.Array, log_t: jax.Array, b: jax.Array, row_ids: jax.Array,
                 col_ids: jax.Array, row_valid: jax.Array | None = None,
                 col_valid: jax.Array | None = None) -> jax.Array:
  """Sum of -log sigmoid(z * logit) over the pairs of one [r, c] block whose row
  and column are both valid (`jnp.where`, so masked pairs pass no gradient)."""
  s = s.astype(jnp.promote_types(s.dtype, jnp.float32))
  logits = jnp.exp(log_t).astype(s.dtype) * s + b.astype(s.dtype)
  z = jnp.where(row_ids[:, None] == col_ids[None, :], 1.0, -1.0)
  terms = -jax.nn.log_sigmoid(z * logits)
  mask = None
  if row_valid is not None:
    mask = row_valid[:, None]
  if col_valid is not None:
    mask = col_valid[None, :] if mask is None else mask & col_valid[None, :]
  if mask is not None:
    terms = jnp.where(mask, terms, 0.0)
  return jnp.sum(terms)


def _dense_sum(x, y, log_t, b, score_fn, score_params, valid) -> jax.Array:
  n = _leading_size(x, "x")
  ids = jnp.arange(n)
  return _block_terms(score_fn(score_params, x, y), log_t, b, ids, ids, valid, valid)


def _chunked_sum(x, y, log_t, b, score_fn, score_params, block_size: int,
                 valid: jax.Array | None) -> jax.Array:
  """Sum over all valid (row, column) pairs, scanning over column blocks of y."""
  n_rows = _leading_size(x, "x")
  n = _leading_size(y, "y")
  num_blocks = -(-n // block_size)
  padded = num_blocks * block_size
  # Pad by repeating real columns (never zeros: a scorer may normalise them).
  take = jnp.arange(padded) % n
  blocks = lambda a: a.reshape((num_blocks, block_size) + a.shape[1:])
  y_blocks = jax.tree.map(lambda a: blocks(jnp.take(a, take, axis=0)), y)
  col_valid = jnp.arange(padded) < n
  if valid is not None:
    col_valid = col_valid & jnp.take(valid, take)
  row_ids = jnp.arange(n_rows)

  @jax.checkpoint
  def block_sum(params, lt, bias, y_blk, start, v_blk):
    s = score_fn(params, x, y_blk)
    return _block_terms(s, lt, bias, row_ids, start + jnp.arange(block_size), valid, v_blk)

  def body(acc, inputs):
    y_blk, start, v_blk = inputs
    return acc + block_sum(score_params, log_t, b, y_blk, start, v_blk).astype(acc.dtype), None

  starts = jnp.arange(num_blocks) * block_size
  total, _ = jax.lax.scan(body, jnp.zeros((), _acc_dtype(x, y)),
                          (y_blocks, starts, blocks(col_valid)))
  return total


def pairwise_sigmoid_loss(x: Any, y: Any, log_t: jax.Array, b: jax.Array, *,
                          block_size: int | None = None,
                          score_fn: ScoreFn | None = None,
                          score_params: Any = None,
                          valid: jax.Array | None = None) -> jax.Array:
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
    valid: optional bool[N]; False marks a padding item, whose row and column
      take part in no pair. The loss is averaged over the valid rows: it equals
      the loss of the valid subset alone, in value and gradients.

  Returns:
    float32 scalar loss.
  """
  n, valid = _check_inputs(x, y, score_fn, valid)
  score_fn = score_fn or dot_score
  log_t, b = _as_float(log_t), _as_float(b)
  if block_size is None:
    total = _dense_sum(x, y, log_t, b, score_fn, score_params, valid)
  else:
    if int(block_size) < 1:
      raise ValueError(f"pairwise_sigmoid_loss: block_size must be >= 1, got {block_size}")
    total = _chunked_sum(x, y, log_t, b, score_fn, score_params, min(int(block_size), n),
                         valid)
  return _mean(total, n, valid)


def _mesh_size(mesh: jax.sharding.Mesh, axis_names: Sequence[str], name: str) -> int:
  for a in axis_names:
    if a not in mesh.shape:
      raise ValueError(f"{name}: axis '{a}' is not in the mesh axes {tuple(mesh.shape)}")
  size = 1
  for a in axis_names:
    size *= mesh.shape[a]
  return size


def _sharded(local_fn, x, y, log_t, b, score_fn, score_params, valid, mesh, axis_names,
             name):
  """Runs `local_fn((x_loc, v_loc), (y_loc, v_loc), log_t, b, params)` -> local sum
  on every device, v_loc being the device's slice of the validity mask.

  N is padded up to a multiple of the devices with masked copies of the first
  rows, so any N works; the padding's gradient is zero and the transpose of the
  gather adds it to those rows, leaving their gradients exact.

  Replicated inputs (log_t, b, score_params) enter with an explicit leading
  device axis, so that the gradient of each device's copy comes back as one
  slice and the broadcast's transpose sums them: exact gradients without relying
  on shard_map's replication tracking (off here, `check_vma=False`).
  """
  axis_names = tuple(axis_names)
  n, valid = _check_inputs(x, y, score_fn, valid, name)
  score_fn = score_fn or dot_score
  devices = _mesh_size(mesh, axis_names, name)
  padded = -(-n // devices) * devices
  mask = jnp.ones((n,), bool) if valid is None else valid
  if padded != n:
    take = jnp.arange(padded) % n
    x, y = (jax.tree.map(lambda a: jnp.take(a, take, axis=0), t) for t in (x, y))
    mask = jnp.concatenate([mask, jnp.zeros((padded - n,), bool)])
  spec = P(axis_names)
  rep = lambda a: jnp.broadcast_to(jnp.asarray(a)[None], (devices,) + jnp.shape(a))
  replicated = jax.tree.map(rep, (_as_float(log_t), _as_float(b), score_params))

  def per_device(x_loc, y_loc, m_loc, rep_loc):
    lt, bias, params = jax.tree.map(lambda a: a[0], rep_loc)
    return local_fn((x_loc, m_loc), (y_loc, m_loc), lt, bias, params, score_fn,
                    padded // devices, devices)[None]

  sums = jax.shard_map(
      per_device, mesh=mesh,
      in_specs=(jax.tree.map(lambda _: spec, x), jax.tree.map(lambda _: spec, y), spec,
                jax.tree.map(lambda _: spec, replicated)),
      out_specs=spec, check_vma=False)(x, y, mask, replicated)
  return _mean(jnp.sum(sums), n, valid)


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

  `x_loc` and `y_loc` are (items, bool[n_loc] validity) pairs; the validity of a
  y block travels with it.

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
    (x_items, x_valid), (y_items, y_valid) = x, y_blk
    src = (me() - step) % devices
    s = score_fn(p, x_items, y_items)
    return _block_terms(s, lt, bias, me() * n_loc + jnp.arange(n_loc),
                        src * n_loc + jnp.arange(n_loc), x_valid, y_valid).astype(acc_dtype)

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
                                  score_params: Any = None,
                                  valid: jax.Array | None = None) -> jax.Array:
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
      Any N: when the product of their sizes does not divide it, N is padded
      inside with masked rows.
    score_fn: `score_fn(score_params, rows, cols) -> float[r, c]`; None is the
      dot product.
    score_params: pytree passed to `score_fn` (replicated).
    valid: optional bool[N], as in `pairwise_sigmoid_loss`.

  Returns:
    float32 scalar loss.
  """
  axis_names = tuple(axis_names)
  local = lambda *a: _ring_local(*a, axis_names=axis_names)
  return _sharded(local, x, y, log_t, b, score_fn, score_params, valid, mesh, axis_names,
                  "sharded_pairwise_sigmoid_loss")


def _allgather_local(x_loc, y_loc, log_t, b, params, score_fn, n_loc, devices, axis_names):
  (x_items, x_valid), (y_items, y_valid) = x_loc, y_loc
  me = jax.lax.axis_index(axis_names)
  y_all, valid_all = jax.tree.map(lambda a: jax.lax.all_gather(a, axis_names, tiled=True),
                                  (y_items, y_valid))
  s = score_fn(params, x_items, y_all)
  return _block_terms(s, log_t, b, me * n_loc + jnp.arange(n_loc), jnp.arange(n_loc * devices),
                      x_valid, valid_all)


def reference_allgather_pairwise_sigmoid_loss(
    x: Any, y: Any, log_t: jax.Array, b: jax.Array, *, mesh: jax.sharding.Mesh,
    axis_names: Sequence[str] = ("data",), score_fn: ScoreFn | None = None,
    score_params: Any = None, valid: jax.Array | None = None) -> jax.Array:
  """The PyTorch reference strategy, for comparison: all-gather every column
  item, then score the local rows against all N columns at once
  (O(N/d * N) pairs per device). Same arguments and result as
  `sharded_pairwise_sigmoid_loss`."""
  axis_names = tuple(axis_names)
  local = lambda *a: _allgather_local(*a, axis_names=axis_names)
  return _sharded(local, x, y, log_t, b, score_fn, score_params, valid, mesh, axis_names,
                  "reference_allgather_pairwise_sigmoid_loss")
