"""Chunked and ring pairwise sigmoid losses equal the dense formula, values and gradients."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from aligncap_jax.losses import pairwise_sigmoid_loss
from aligncap_jax.losses import reference_allgather_pairwise_sigmoid_loss
from aligncap_jax.losses import sharded_pairwise_sigmoid_loss

LOG_T, BIAS = float(np.log(10.0)), -10.0


def _unit_rows(key, n, d):
  a = jax.random.normal(key, (n, d), jnp.float32)
  return a / jnp.linalg.norm(a, axis=-1, keepdims=True)


def _inputs(n, d=16, seed=0):
  kx, ky = jax.random.split(jax.random.key(seed))
  x, y = _unit_rows(kx, n, d), _unit_rows(ky, n, d)
  # Make the positives score high so that both label signs matter.
  y = (y + 2.0 * x) / jnp.linalg.norm(y + 2.0 * x, axis=-1, keepdims=True)
  return x, y


def _formula(x, y, log_t, b):
  """The loss written out over the full N x N matrix."""
  n = x.shape[0]
  logits = jnp.exp(log_t) * (x @ y.T) + b
  z = 2.0 * jnp.eye(n, dtype=logits.dtype) - 1.0
  return -jnp.sum(jax.nn.log_sigmoid(z * logits)) / n


def _dense64(x, y, log_t=LOG_T, b=BIAS):
  """Value and gradients (x, y, log_t, b) of the formula in float64."""
  with jax.enable_x64(True):
    args = [jnp.asarray(np.asarray(a), jnp.float64) for a in (x, y, log_t, b)]
    val, grads = jax.value_and_grad(_formula, argnums=(0, 1, 2, 3))(*args)
    return np.asarray(val), [np.asarray(g) for g in grads]


def _assert_close(got, want, rtol=1e-5):
  """Leaf by leaf: max|a - b| <= rtol * max|b| (DESIGN.md section 10)."""
  got_l, want_l = jax.tree.leaves(got), jax.tree.leaves(want)
  assert len(got_l) == len(want_l)
  for a, b in zip(got_l, want_l):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    assert a.shape == b.shape
    err, scale = np.max(np.abs(a - b)), np.max(np.abs(b))
    assert err <= rtol * scale, f"max err {err:.3g} > {rtol} * {scale:.3g}"


def _vg(fn):
  return jax.jit(jax.value_and_grad(fn, argnums=(0, 1, 2, 3)))


def test_dense_form_equals_formula():
  x, y = _inputs(33)
  val, grads = _dense64(x, y)
  got_val, got_grads = _vg(pairwise_sigmoid_loss)(x, y, LOG_T, BIAS)
  _assert_close(got_val, val)
  _assert_close(got_grads[:2], grads[:2])


def test_hand_computed_two_pairs():
  # N = 2, s = [[1, 0], [0, 1]], t = 1, b = 0:
  # L = -(1/2) * (2 log sig(1) + 2 log sig(0)) = log(1 + e^-1) + log 2.
  x = jnp.eye(2)
  got = pairwise_sigmoid_loss(x, x, 0.0, 0.0, block_size=1)
  assert float(got) == pytest.approx(np.log1p(np.exp(-1.0)) + np.log(2.0), rel=1e-6)


@pytest.mark.parametrize("n,block", [(8, 8), (8, 3), (37, 16), (300, 64), (1000, 128),
                                     (4096, 512)])
def test_chunked_equals_dense(n, block):
  x, y = _inputs(n, seed=n)
  val, grads = _dense64(x, y)
  got_val, got_grads = _vg(lambda *a: pairwise_sigmoid_loss(*a, block_size=block))(
      x, y, LOG_T, BIAS)
  _assert_close(got_val, val)
  _assert_close(got_grads, grads)


def _mesh(shape, names):
  return jax.make_mesh(shape, names, axis_types=(jax.sharding.AxisType.Auto,) * len(names))


@pytest.mark.parametrize("shape,names", [((8,), ("data",)), ((4, 2), ("data", "fsdp"))])
@pytest.mark.parametrize("n", [8, 200])
@pytest.mark.parametrize("fn", [sharded_pairwise_sigmoid_loss,
                                reference_allgather_pairwise_sigmoid_loss])
def test_ring_equals_dense(shape, names, n, fn):
  mesh = _mesh(shape, names)
  x, y = _inputs(n, seed=n + 1)
  val, grads = _dense64(x, y)
  row_sharding = NamedSharding(mesh, P(names))
  xs, ys = jax.device_put(x, row_sharding), jax.device_put(y, row_sharding)
  with jax.set_mesh(mesh):
    got_val, got_grads = _vg(lambda *a: fn(*a, mesh=mesh, axis_names=names))(
        xs, ys, LOG_T, BIAS)
  _assert_close(got_val, val)
  _assert_close(got_grads, grads)


def _split_score(params, rows, cols):
  """A scorer over pytree rows/cols: <rows["a"], cols[0]> * w + <rows["b"], cols[1]>."""
  return (params["w"] * (rows["a"] @ cols[0].T) + rows["b"] @ cols[1].T)


def test_pytree_inputs_chunked_and_ring():
  n = 24
  x, y = _inputs(n, d=8, seed=5)
  rows = {"a": x[:, :4], "b": x[:, 4:]}
  cols = (y[:, :4], y[:, 4:])
  params = {"w": jnp.asarray(0.7)}

  def loss(form, rows, cols, lt, b, params):
    if form == "ring":
      return sharded_pairwise_sigmoid_loss(rows, cols, lt, b, mesh=_mesh((8,), ("data",)),
                                           score_fn=_split_score, score_params=params)
    block = None if form == "dense" else 5
    return pairwise_sigmoid_loss(rows, cols, lt, b, block_size=block,
                                 score_fn=_split_score, score_params=params)

  args = (rows, cols, LOG_T, BIAS, params)
  grad = lambda form, args: jax.jit(jax.value_and_grad(
      lambda *a: loss(form, *a), argnums=(0, 1, 2, 3, 4)))(*args)
  with jax.enable_x64(True):
    want = jax.tree.map(np.asarray, grad("dense", jax.tree.map(
        lambda a: jnp.asarray(np.asarray(a), jnp.float64), args)))
  # The pytree scorer with w = 1 is the dot product: check against the formula too.
  w1 = jax.jit(lambda r, c: pairwise_sigmoid_loss(
      r, c, LOG_T, BIAS, score_fn=_split_score, score_params={"w": 1.0}))(rows, cols)
  _assert_close(w1, _dense64(x, y)[0])
  for form in ("dense", "chunked", "ring"):
    got = grad(form, args)
    _assert_close(got[0], want[0])
    for g, w in zip(got[1], want[1]):
      _assert_close(g, w)


def test_errors():
  x, y = _inputs(12)
  with pytest.raises(ValueError, match="x has N=12 rows but y has N=11"):
    pairwise_sigmoid_loss(x, y[:11], LOG_T, BIAS)
  with pytest.raises(ValueError, match="must be one float"):
    pairwise_sigmoid_loss(x[:, None], y, LOG_T, BIAS)
  with pytest.raises(ValueError, match="block_size must be >= 1"):
    pairwise_sigmoid_loss(x, y, LOG_T, BIAS, block_size=0)
  with pytest.raises(ValueError, match="divisible by the 8 devices"):
    sharded_pairwise_sigmoid_loss(x, y, LOG_T, BIAS, mesh=_mesh((8,), ("data",)))
  with pytest.raises(ValueError, match="axis 'fsdp' is not in the mesh"):
    sharded_pairwise_sigmoid_loss(x, y, LOG_T, BIAS, mesh=_mesh((8,), ("data",)),
                                  axis_names=("data", "fsdp"))
