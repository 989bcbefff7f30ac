"""PairwiseScorer vs a per-pair loop, and inside the chunked / ring losses."""
from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from aligncap_jax.losses import pairwise_sigmoid_loss
from aligncap_jax.losses import sharded_pairwise_sigmoid_loss
from aligncap_jax.models.pairwise_scorer import PairwiseScorer
from aligncap_jax.models.pairwise_scorer import make_score_fn
from aligncap_jax.ops import dot_product_attention
from tolerance import assert_reorder_close  # noqa: E402

DIM, HEADS, MLP, LAYERS, L = 16, 2, 32, 2, 5
LOG_T, BIAS = float(np.log(10.0)), -10.0
_erf = np.vectorize(math.erf)


def _scorer(dtype=jnp.float32):
  return PairwiseScorer(dim=DIM, num_heads=HEADS, mlp_dim=MLP, num_layers=LAYERS,
                        dtype=dtype, param_dtype=dtype)


def _setup(n, m=None, seed=0):
  m = n if m is None else m
  k = jax.random.split(jax.random.key(seed), 4)
  tokens = jax.random.normal(k[0], (n, L, DIM))
  mask = jax.random.uniform(k[1], (n, L)) > 0.3
  mask = mask.at[:, 0].set(True)
  captions = jax.random.normal(k[2], (m, DIM))
  variables = nn.meta.unbox(_scorer().init(k[3], tokens, mask, captions))
  return tokens, mask, captions, variables


def _ln(x, p, eps=1e-12):
  mu = x.mean(-1, keepdims=True)
  var = ((x - mu) ** 2).mean(-1, keepdims=True)
  return (x - mu) / np.sqrt(var + eps) * p["scale"] + p["bias"]


def _pair_score(p, region, region_mask, caption):
  """One caption against one region, written from the definition in float64."""
  dh = DIM // HEADS
  x = caption
  for l in range(LAYERS):
    lin = lambda a, name: (a @ p[f"layer_{l}_{name}"]["kernel"].reshape(DIM, DIM)
                           + p[f"layer_{l}_{name}"]["bias"].reshape(-1))
    q, k, v = lin(x, "query"), lin(region, "key"), lin(region, "value")
    heads = []
    for h in range(HEADS):
      sl = slice(h * dh, (h + 1) * dh)
      logits = np.array([q[sl] @ k[t, sl] / math.sqrt(dh) if region_mask[t] else -np.inf
                         for t in range(region.shape[0])])
      w = np.exp(logits - logits.max())
      w /= w.sum()
      heads.append(w @ v[:, sl])
    attn = np.concatenate(heads) @ p[f"layer_{l}_attn_out"]["kernel"].reshape(DIM, DIM)
    x = _ln(x + attn + p[f"layer_{l}_attn_out"]["bias"], p[f"layer_{l}_attn_norm"])
    h = x @ p[f"layer_{l}_mlp_in"]["kernel"] + p[f"layer_{l}_mlp_in"]["bias"]
    h = 0.5 * h * (1.0 + _erf(h / math.sqrt(2.0)))
    x = _ln(x + h @ p[f"layer_{l}_mlp_out"]["kernel"] + p[f"layer_{l}_mlp_out"]["bias"],
            p[f"layer_{l}_mlp_norm"])
  x = x / np.linalg.norm(x)
  return float(x @ p["score_head"]["kernel"][:, 0] + p["score_head"]["bias"][0])


def test_matches_per_pair_loop():
  tokens, mask, captions, variables = _setup(4, 3)
  got = jax.jit(_scorer().apply)(variables, tokens, mask, captions)
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), variables["params"])
  want = np.array([[_pair_score(p, np.asarray(tokens[i], np.float64), np.asarray(mask[i]),
                                np.asarray(captions[j], np.float64))
                    for j in range(3)] for i in range(4)])
  assert got.shape == (4, 3)
  np.testing.assert_allclose(np.asarray(got), want, atol=1e-5, rtol=0)


def test_attention_helper_with_mask():
  k = jax.random.split(jax.random.key(7), 3)
  q = jax.random.normal(k[0], (2, 3, 2, 4))
  kk = jax.random.normal(k[1], (2, 5, 2, 4))
  v = jax.random.normal(k[2], (2, 5, 2, 4))
  mask = jnp.array([[True, True, False, True, False], [False] * 5])[:, None, None, :]
  got = np.asarray(dot_product_attention(q, kk, v, mask))
  qn, kn, vn = (np.asarray(a, np.float64) for a in (q, kk, v))
  for h in range(2):
    logits = qn[0, :, h] @ kn[0, :, h].T / 2.0
    logits[:, [2, 4]] = -np.inf
    w = np.exp(logits - logits.max(-1, keepdims=True))
    w /= w.sum(-1, keepdims=True)
    np.testing.assert_allclose(got[0, :, h], w @ vn[0, :, h], atol=1e-5)
  assert np.all(got[1] == 0.0)   # every key masked: zeros, not NaN


def test_project_then_score_in_blocks():
  tokens, _, captions, variables = _setup(3, 2)
  scorer = _scorer()
  rows = scorer.apply(variables, tokens, None, method=PairwiseScorer.project_regions)
  assert [a.shape for a in rows["keys"]] == [(3, L, HEADS, DIM // HEADS)] * LAYERS
  assert bool(jnp.all(rows["mask"]))
  score_fn = make_score_fn(scorer)
  assert_reorder_close(score_fn(variables, rows, captions),
                       scorer.apply(variables, tokens, None, captions), depth=LAYERS)
  # Scoring a block of captions equals scoring them one at a time.
  one = jnp.concatenate([score_fn(variables, rows, captions[j:j + 1]) for j in range(2)], 1)
  assert_reorder_close(one, score_fn(variables, rows, captions), depth=LAYERS)


def test_bad_shapes():
  tokens, mask, captions, variables = _setup(2)
  with pytest.raises(ValueError, match="tokens must be"):
    _scorer().apply(variables, tokens[..., :4], None, method=PairwiseScorer.project_regions)
  with pytest.raises(ValueError, match="mask must be"):
    _scorer().apply(variables, tokens, mask[:, :2], method=PairwiseScorer.project_regions)
  with pytest.raises(ValueError, match="not divisible"):
    PairwiseScorer(dim=10, num_heads=3).init(jax.random.key(0), tokens, None, captions)


def _loss(form, tokens, mask, captions, log_t, b, variables, dtype=jnp.float32, mesh=None):
  """Projects the regions, then the pairwise loss with the scorer (grads reach all params)."""
  scorer = _scorer(dtype)
  rows = scorer.apply(variables, tokens, mask, method=PairwiseScorer.project_regions)
  kw = dict(score_fn=make_score_fn(scorer), score_params=variables)
  if form == "ring":
    return sharded_pairwise_sigmoid_loss(rows, captions, log_t, b, mesh=mesh,
                                         axis_names=mesh.axis_names, **kw)
  return pairwise_sigmoid_loss(rows, captions, log_t, b,
                               block_size=None if form == "dense" else 4, **kw)


def _dense64(args):
  with jax.enable_x64(True):
    args64 = jax.tree.map(lambda a: jnp.asarray(np.asarray(a), jnp.float64), args)
    fn = lambda t, c, lt, b, v: _loss("dense", t, args[1], c, lt, b, v, dtype=jnp.float64)
    out = jax.jit(jax.value_and_grad(fn, argnums=(0, 1, 2, 3, 4)))(
        args64[0], args64[2], args64[3], args64[4], args64[5])
    return jax.tree.map(np.asarray, out)


def _assert_close(got, want, rtol=1e-5):
  """Leaf by leaf max|a - b| <= rtol * max|b|; a leaf whose exact value is zero
  (the key bias: softmax ignores a constant shift of the logits) is held to the
  scale of the whole tree instead."""
  leaves = [(np.asarray(a, np.float64), np.asarray(b, np.float64))
            for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True)]
  tree_scale = max(np.max(np.abs(b)) for _, b in leaves)
  for a, b in leaves:
    err, scale = np.max(np.abs(a - b)), np.max(np.abs(b))
    if scale < 1e-12 * tree_scale:
      scale = tree_scale
    assert err <= rtol * scale, f"max err {err:.3g} > {rtol} * {scale:.3g}"


@pytest.mark.parametrize("form,n,mesh_shape", [
    ("chunked", 11, None),
    pytest.param("ring", 16, (8,), marks=pytest.mark.slow),
    pytest.param("ring", 8, (4, 2), marks=pytest.mark.slow)])
def test_loss_with_scorer_equals_dense(form, n, mesh_shape):
  tokens, mask, captions, variables = _setup(n, seed=n)
  # Align captions with their regions so positives and negatives both matter.
  captions = captions + tokens.mean(1)
  args = (tokens, mask, captions, LOG_T, BIAS, variables)
  want = _dense64(args)
  mesh = None
  if mesh_shape is not None:
    names = ("data", "fsdp")[:len(mesh_shape)]
    mesh = jax.make_mesh(mesh_shape, names,
                         axis_types=(jax.sharding.AxisType.Auto,) * len(names))
    rows = NamedSharding(mesh, P(names))
    tokens, mask, captions = (jax.device_put(a, rows) for a in (tokens, mask, captions))
  fn = lambda t, c, lt, b, v: _loss(form, t, mask, c, lt, b, v, mesh=mesh)
  got = jax.jit(jax.value_and_grad(fn, argnums=(0, 1, 2, 3, 4)))(
      tokens, captions, LOG_T, BIAS, variables)
  _assert_close(got[0], want[0])
  for g, w in zip(got[1], want[1]):
    _assert_close(g, w)
  # Every scorer parameter but the key bias gets a gradient (per-region K/V and
  # per-pair layers alike).
  grads = got[1][4]["params"]
  for name, layer in grads.items():
    for leaf, g in layer.items():
      if not (name.endswith("_key") and leaf == "bias"):
        assert float(jnp.max(jnp.abs(g))) > 0.0, (name, leaf)
