"""Asymmetric loss and caption cross-entropy against their formulas."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from aligncap_jax.losses import asymmetric_loss
from aligncap_jax.losses import caption_cross_entropy


def _asl_numpy(logits, labels, gamma_neg, gamma_pos, clip, eps, mask=None):
  """Ridnik et al.'s reference AsymmetricLoss, summed over tags, mean over regions."""
  x = np.asarray(logits, np.float64)
  y = np.asarray(labels, np.float64)
  xs_pos = 1.0 / (1.0 + np.exp(-x))
  xs_neg = 1.0 - xs_pos
  if clip > 0:
    xs_neg = np.minimum(xs_neg + clip, 1.0)
  loss = y * np.log(np.maximum(xs_pos, eps)) + (1 - y) * np.log(np.maximum(xs_neg, eps))
  pt = xs_pos * y + xs_neg * (1 - y)
  loss = loss * np.power(1 - pt, gamma_pos * y + gamma_neg * (1 - y))
  per_region = -loss.sum(-1)
  if mask is None:
    return per_region.mean()
  m = np.asarray(mask, np.float64)
  return (per_region * m).sum() / max(m.sum(), 1.0)


@pytest.mark.parametrize("gamma_neg,gamma_pos,clip", [(7.0, 0.0, 0.05), (4.0, 1.0, 0.0),
                                                      (2.5, 0.5, 0.2)])
def test_asl_matches_formula(gamma_neg, gamma_pos, clip):
  k1, k2 = jax.random.split(jax.random.key(0))
  logits = 3.0 * jax.random.normal(k1, (6, 20))
  labels = jax.random.bernoulli(k2, 0.3, (6, 20))
  got = jax.jit(lambda a, b: asymmetric_loss(a, b, gamma_neg=gamma_neg, gamma_pos=gamma_pos,
                                             clip=clip))(logits, labels)
  want = _asl_numpy(logits, labels, gamma_neg, gamma_pos, clip, 1e-8)
  assert float(got) == pytest.approx(want, rel=1e-5)
  mask = jnp.array([1, 0, 1, 1, 0, 1], bool)
  got_m = asymmetric_loss(logits, labels, gamma_neg=gamma_neg, gamma_pos=gamma_pos, clip=clip,
                          mask=mask)
  assert float(got_m) == pytest.approx(
      _asl_numpy(logits, labels, gamma_neg, gamma_pos, clip, 1e-8, mask), rel=1e-5)


def test_asl_hand_computed():
  # logit 0: p = 0.5. Positive (gamma_pos 0): -log 0.5.
  # Negative: 1 - p_m = min(0.5 + 0.05, 1) = 0.55, weight 0.45**7: -0.45**7 * log 0.55.
  got = asymmetric_loss(jnp.zeros((1, 2)), jnp.array([[1, 0]]))
  assert float(got) == pytest.approx(np.log(2.0) - 0.45 ** 7 * np.log(0.55), rel=1e-6)
  # A negative with p <= clip costs nothing; all regions masked gives 0.
  assert float(asymmetric_loss(jnp.full((1, 1), -5.0), jnp.zeros((1, 1)))) == 0.0
  assert float(asymmetric_loss(jnp.zeros((2, 2)), jnp.ones((2, 2)),
                               mask=jnp.zeros(2, bool))) == 0.0


def test_asl_grads_finite_when_saturated():
  logits = jnp.array([[60.0, -60.0, 0.3]])
  labels = jnp.array([[1.0, 0.0, 1.0]])
  for gp in (0.0, 0.5, 1.0):
    g = jax.grad(lambda a: asymmetric_loss(a, labels, gamma_pos=gp))(logits)
    assert bool(jnp.all(jnp.isfinite(g)))


def test_asl_bad_shapes():
  with pytest.raises(ValueError, match="logits and labels"):
    asymmetric_loss(jnp.zeros((2, 3)), jnp.zeros((2, 4)))
  with pytest.raises(ValueError, match="mask must be"):
    asymmetric_loss(jnp.zeros((2, 3)), jnp.zeros((2, 3)), mask=jnp.ones(3))


def test_caption_xent_matches_loop():
  k1, k2, k3 = jax.random.split(jax.random.key(1), 3)
  logits = jax.random.normal(k1, (3, 5, 11)).astype(jnp.bfloat16)
  targets = jax.random.randint(k2, (3, 5), 0, 11)
  mask = jax.random.bernoulli(k3, 0.6, (3, 5))
  loss, count = jax.jit(caption_cross_entropy)(logits, targets, mask)
  assert loss.dtype == jnp.float32
  lg = np.asarray(logits.astype(jnp.float32), np.float64)
  total, n = 0.0, 0
  for b in range(3):
    for t in range(5):
      if mask[b, t]:
        row = lg[b, t]
        total += np.log(np.exp(row - row.max()).sum()) + row.max() - row[int(targets[b, t])]
        n += 1
  assert float(count) == n
  assert float(loss) == pytest.approx(total / n, rel=1e-5)
  empty, zero = caption_cross_entropy(logits, targets, jnp.zeros_like(mask))
  assert float(empty) == 0.0 and float(zero) == 0.0


def test_caption_xent_hand_computed():
  # Uniform logits over 4 tokens: log 4 per token, whatever the target.
  loss, count = caption_cross_entropy(jnp.zeros((1, 2, 4)), jnp.array([[3, 1]]),
                                      jnp.array([[1, 0]]))
  assert float(loss) == pytest.approx(np.log(4.0)) and float(count) == 1.0
  with pytest.raises(ValueError, match="caption_cross_entropy"):
    caption_cross_entropy(jnp.zeros((1, 2, 4)), jnp.zeros((1, 3), int), jnp.zeros((1, 3)))
