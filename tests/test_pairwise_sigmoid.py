"""Chunked and ring pairwise sigmoid losses equal the dense formula, values and gradients;
with a `valid` mask they equal the loss of the valid subset alone."""
from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from aligncap_jax.losses import pairwise_sigmoid_loss
from aligncap_jax.losses import reference_allgather_pairwise_sigmoid_loss
from aligncap_jax.losses import sharded_pairwise_sigmoid_loss
from aligncap_jax.models.pairwise_scorer import PairwiseScorer
from aligncap_jax.models.pairwise_scorer import make_score_fn

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
  """Leaf by leaf: max|a - b| <= rtol * max|b| (DESIGN.md section 10). A leaf whose
  exact value is zero (the scorer's key bias: softmax ignores a constant shift of
  the logits) is held to the scale of the whole tree instead."""
  got_l, want_l = jax.tree.leaves(got), jax.tree.leaves(want)
  assert len(got_l) == len(want_l)
  tree_scale = max(np.max(np.abs(np.asarray(b, np.float64))) for b in want_l)
  for a, b in zip(got_l, want_l):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    assert a.shape == b.shape
    err, scale = np.max(np.abs(a - b)), np.max(np.abs(b))
    if scale < 1e-12 * tree_scale:
      scale = tree_scale
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
  with pytest.raises(ValueError, match=r"valid must have shape \(12,\)"):
    pairwise_sigmoid_loss(x, y, LOG_T, BIAS, valid=jnp.ones((11,), bool))
  with pytest.raises(ValueError, match=r"sharded_pairwise_sigmoid_loss: valid must have shape"):
    sharded_pairwise_sigmoid_loss(x, y, LOG_T, BIAS, mesh=_mesh((8,), ("data",)),
                                  valid=jnp.ones((12, 1), bool))
  with pytest.raises(ValueError, match="axis 'fsdp' is not in the mesh"):
    sharded_pairwise_sigmoid_loss(x, y, LOG_T, BIAS, mesh=_mesh((8,), ("data",)),
                                  axis_names=("data", "fsdp"))


# --------------------------------------------------------------- valid mask
# Padding rows (valid == False) take part in no pair and the loss is averaged over
# the valid rows: every form equals the dense loss of the valid subset alone.

N_MASKED = 13                       # odd: the chunked and ring forms pad it
INVALID = (0, 6, 7, 12)             # both ends and two neighbours in one block
DIM, HEADS, MLP, TOKENS = 8, 2, 16, 3


def _valid(n=N_MASKED, invalid=INVALID):
  return np.isin(np.arange(n), invalid, invert=True)


def _form_loss(form):
  """`loss(x, y, log_t, b, score_fn=..., score_params=..., valid=...)` of one form."""
  if form == "dense":
    return pairwise_sigmoid_loss
  if form == "chunked":
    return lambda *a, **kw: pairwise_sigmoid_loss(*a, block_size=4, **kw)
  fn = (reference_allgather_pairwise_sigmoid_loss if form == "allgather"
        else sharded_pairwise_sigmoid_loss)
  shape, names = ((4, 2), ("data", "fsdp")) if form == "ring_2d" else ((8,), ("data",))
  mesh = _mesh(shape, names)
  return lambda *a, **kw: fn(*a, mesh=mesh, axis_names=names, **kw)


def _dot_problem(valid):
  """Dot scorer: unit rows; the padding rows are large and not normalised, so
  they would dominate the loss if they leaked into it."""
  x, y = _inputs(len(valid), seed=3)
  junk = 5.0 * jax.random.normal(jax.random.key(9), x.shape)
  x = jnp.where(valid[:, None], x, junk)
  y = jnp.where(valid[:, None], y, -junk)

  def loss(form, x, y, lt, b, valid=None, subset=None):
    del subset  # no per-row constants
    return _form_loss(form)(x, y, lt, b, valid=valid)
  return loss, (x, y, LOG_T, BIAS)


def _scorer_problem(valid):
  """The paper's learned scorer: region tokens (+ token mask) and captions; the
  loss projects the regions first, so gradients reach the tokens and every
  scorer parameter. Padding rows are large random tokens and captions."""
  n = len(valid)
  k = jax.random.split(jax.random.key(4), 5)
  tokens = jax.random.normal(k[0], (n, TOKENS, DIM))
  tok_mask = (jax.random.uniform(k[1], (n, TOKENS)) > 0.3).at[:, 0].set(True)
  captions = jax.random.normal(k[2], (n, DIM)) + tokens.mean(1)
  tokens = jnp.where(valid[:, None, None], tokens, 5.0 * jax.random.normal(k[3], tokens.shape))
  captions = jnp.where(valid[:, None], captions, 5.0 * jax.random.normal(k[4], captions.shape))
  module = lambda dt: PairwiseScorer(dim=DIM, num_heads=HEADS, mlp_dim=MLP, num_layers=1,
                                     dtype=dt, param_dtype=dt)
  variables = nn.meta.unbox(module(jnp.float32).init(
      jax.random.key(5), tokens[:2], tok_mask[:2], captions[:2]))

  def loss(form, t, c, lt, b, params, valid=None, subset=None):
    """`subset`: the row indices t and c hold (default all); float64 inputs run
    the scorer in float64."""
    scorer = module(t.dtype)
    m = tok_mask if subset is None else tok_mask[subset]
    rows = scorer.apply(params, t, m, method=PairwiseScorer.project_regions)
    return _form_loss(form)(rows, c, lt, b, score_fn=make_score_fn(scorer),
                            score_params=params, valid=valid)
  return loss, (tokens, captions, LOG_T, BIAS, variables)


def _subset_reference(loss, args, valid):
  """Value and gradients of the dense loss on the valid rows alone, in float64,
  the row gradients scattered back to [N, ...] with zeros for the padding rows."""
  idx = np.flatnonzero(valid)
  argnums = tuple(range(len(args)))
  with jax.enable_x64(True):
    sub = [jax.tree.map(lambda a: jnp.asarray(np.asarray(a), jnp.float64), a)
           for a in (args[0][idx], args[1][idx]) + tuple(args[2:])]
    fn = lambda *a: loss("dense", *a, subset=idx)
    val, grads = jax.jit(jax.value_and_grad(fn, argnums=argnums))(*sub)
    val, grads = np.asarray(val), jax.tree.map(np.asarray, grads)
  full = []
  for g, a in zip(grads[:2], args[:2]):
    out = np.zeros(a.shape, np.float64)
    out[idx] = g
    full.append(out)
  return val, tuple(full) + tuple(grads[2:])


@functools.cache
def _masked_case(scorer):
  """(loss, args, valid, subset reference) of one scorer, shared by the forms."""
  valid = _valid()
  loss, args = (_dot_problem if scorer == "dot" else _scorer_problem)(valid)
  return loss, args, valid, _subset_reference(loss, args, valid)


@pytest.mark.parametrize("scorer", ["dot", "learned"])
@pytest.mark.parametrize("form", ["dense", "chunked", "ring", "ring_2d", "allgather"])
def test_masked_loss_equals_loss_on_the_valid_subset(form, scorer):
  loss, args, valid, (want_val, want_grads) = _masked_case(scorer)
  argnums = tuple(range(len(args)))
  fn = lambda *a: loss(form, *a, valid=jnp.asarray(valid))
  got_val, got_grads = jax.jit(jax.value_and_grad(fn, argnums=argnums))(*args)
  _assert_close(got_val, want_val)
  for g, w in zip(got_grads, want_grads):
    _assert_close(g, w)
  # The padding rows were large enough to matter had they leaked in.
  unmasked = jax.jit(lambda *a: loss(form, *a))(*args)
  assert abs(float(unmasked) - float(want_val)) > 1e-2 * abs(float(want_val))


@pytest.mark.parametrize("form", ["dense", "chunked", "ring"])
def test_all_valid_mask_equals_no_mask(form):
  loss, args = _dot_problem(np.ones(N_MASKED, bool))
  argnums = tuple(range(len(args)))
  vg = lambda valid: jax.jit(jax.value_and_grad(
      lambda *a: loss(form, *a, valid=valid), argnums=argnums))(*args)
  # Same float32 operations, the mask only selects every term: equal to the
  # exactness tolerance of DESIGN.md section 10.
  _assert_close(vg(jnp.ones(N_MASKED, bool)), vg(None))


def test_no_valid_row_gives_zero_loss_and_gradients():
  loss, args = _dot_problem(np.ones(N_MASKED, bool))
  val, grads = jax.jit(jax.value_and_grad(
      lambda *a: loss("chunked", *a, valid=jnp.zeros(N_MASKED, bool)), argnums=(0, 1, 2, 3)))(
          *args)
  assert float(val) == 0.0
  assert all(float(jnp.max(jnp.abs(g))) == 0.0 for g in grads)


# --------------------------------------------------------- any N on the ring
@pytest.mark.parametrize("n", [3, 19])
@pytest.mark.parametrize("fn", [sharded_pairwise_sigmoid_loss,
                                reference_allgather_pairwise_sigmoid_loss])
def test_ring_takes_n_not_divisible_by_the_devices(n, fn):
  """N = 8k + 3 on 8 devices (k = 0: fewer rows than devices) against the formula."""
  mesh = _mesh((8,), ("data",))
  x, y = _inputs(n, seed=n + 2)
  val, grads = _dense64(x, y)
  with jax.set_mesh(mesh):
    got_val, got_grads = _vg(lambda *a: fn(*a, mesh=mesh))(x, y, LOG_T, BIAS)
  _assert_close(got_val, val)
  _assert_close(got_grads, grads)


def test_ring_pads_pytree_inputs_and_masks_them_too():
  """Pytree rows/cols with N = 19 on 8 devices, with and without a mask."""
  n = 19
  x, y = _inputs(n, d=8, seed=6)
  rows = {"a": x[:, :4], "b": x[:, 4:]}
  cols = (y[:, :4], y[:, 4:])
  valid = _valid(n, (2, 18))
  idx = np.flatnonzero(valid)
  ring = lambda r, c, lt, b, valid=None: sharded_pairwise_sigmoid_loss(
      r, c, lt, b, mesh=_mesh((8,), ("data",)), score_fn=_split_score,
      score_params={"w": 1.0}, valid=valid)
  vg = lambda f, *a: jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2, 3)))(*a)
  # With w = 1 the pytree scorer is the dot product: the formula is the reference.
  got_val, (g_rows, g_cols, g_lt, g_b) = vg(ring, rows, cols, LOG_T, BIAS)
  val, (gx, gy, glt, gb) = _dense64(x, y)
  _assert_close(got_val, val)
  _assert_close((jnp.concatenate([g_rows["a"], g_rows["b"]], 1),
                 jnp.concatenate(g_cols, 1), g_lt, g_b), (gx, gy, glt, gb))
  got_val, (g_rows, g_cols, g_lt, g_b) = vg(
      lambda *a: ring(*a, valid=jnp.asarray(valid)), rows, cols, LOG_T, BIAS)
  val, (gx, gy, glt, gb) = _dense64(x[idx], y[idx])
  want_x, want_y = np.zeros((n, 8)), np.zeros((n, 8))
  want_x[idx], want_y[idx] = gx, gy
  _assert_close(got_val, val)
  _assert_close((jnp.concatenate([g_rows["a"], g_rows["b"]], 1),
                 jnp.concatenate(g_cols, 1), g_lt, g_b), (want_x, want_y, glt, gb))
