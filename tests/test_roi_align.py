"""roi_align against torchvision's documented CPU algorithm and hand-computed cases."""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from aligncap_jax.ops import roi_align


def _bilinear(f, y, x):
  """torchvision's bilinear_interpolate for one sample of a [H, W, C] map."""
  h, w = f.shape[:2]
  if y < -1.0 or y > h or x < -1.0 or x > w:
    return np.zeros(f.shape[-1])
  y, x = max(y, 0.0), max(x, 0.0)
  y_low, x_low = int(y), int(x)
  if y_low >= h - 1:
    y_high = y_low = h - 1
    y = float(y_low)
  else:
    y_high = y_low + 1
  if x_low >= w - 1:
    x_high = x_low = w - 1
    x = float(x_low)
  else:
    x_high = x_low + 1
  ly, lx = y - y_low, x - x_low
  hy, hx = 1.0 - ly, 1.0 - lx
  return (hy * hx * f[y_low, x_low] + hy * lx * f[y_low, x_high]
          + ly * hx * f[y_high, x_low] + ly * lx * f[y_high, x_high])


def _reference(features, boxes, out_hw, scale, ratio, aligned):
  """Plain loops over boxes, bins and samples (torchvision roi_align_kernel.cpp)."""
  features = np.asarray(features, np.float64)
  boxes = np.asarray(boxes, np.float64)
  b, k = boxes.shape[:2]
  oh, ow = out_hw
  out = np.zeros((b, k, oh, ow, features.shape[-1]))
  off = 0.5 if aligned else 0.0
  for bi in range(b):
    for ki in range(k):
      x1, y1, x2, y2 = boxes[bi, ki] * scale - off
      rw, rh = x2 - x1, y2 - y1
      if not aligned:
        rw, rh = max(rw, 1.0), max(rh, 1.0)
      bh, bw = rh / oh, rw / ow
      gh = ratio if ratio > 0 else math.ceil(rh / oh)
      gw = ratio if ratio > 0 else math.ceil(rw / ow)
      count = max(gh * gw, 1)
      for ph in range(oh):
        for pw in range(ow):
          acc = np.zeros(features.shape[-1])
          for iy in range(gh):
            y = y1 + ph * bh + (iy + 0.5) * bh / gh
            for ix in range(gw):
              x = x1 + pw * bw + (ix + 0.5) * bw / gw
              acc += _bilinear(features[bi], y, x)
          out[bi, ki, ph, pw] = acc / count
  return out


def _random_case(seed, b=2, k=5, h=7, w=9, c=3, img=28.0):
  rng = np.random.default_rng(seed)
  feats = rng.normal(size=(b, h, w, c)).astype(np.float32)
  # Boxes partly outside the image, tiny ones and ordinary ones.
  x1 = rng.uniform(-0.3 * img, img, size=(b, k))
  y1 = rng.uniform(-0.3 * img, img, size=(b, k))
  bw = rng.uniform(0.0, 0.8 * img, size=(b, k))
  bh = rng.uniform(0.0, 0.8 * img, size=(b, k))
  bw[:, 0], bh[:, 0] = 0.3, 0.2            # tiny box
  x1[:, 1], y1[:, 1] = -5.0, img - 3.0      # crosses two borders
  boxes = np.stack([x1, y1, x1 + bw, y1 + bh], -1).astype(np.float32)
  return feats, boxes


@pytest.mark.parametrize("aligned", [True, False])
@pytest.mark.parametrize("ratio,out", [(2, 4), (1, (3, 5)), (3, (2, 1)), (0, (3, 2)), (-1, 4)])
def test_matches_loop_reference(aligned, ratio, out):
  feats, boxes = _random_case(seed=ratio + 2 + 10 * aligned)
  scale = 0.25
  got = jax.jit(roi_align, static_argnums=(2, 3, 4, 5))(
      jnp.asarray(feats), jnp.asarray(boxes), out, scale, ratio, aligned)
  out_hw = (out, out) if isinstance(out, int) else out
  want = _reference(feats, boxes, out_hw, scale, ratio, aligned)
  assert got.shape == want.shape
  np.testing.assert_allclose(np.asarray(got), want, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("aligned", [True, False])
@pytest.mark.parametrize("ratio,out", [(2, 4), (1, (3, 5)), (0, (3, 2))])
def test_few_boxes_per_map_matches_loop_reference(aligned, ratio, out):
  """Few boxes per map and many channels: the single einsum over the whole map."""
  feats, boxes = _random_case(seed=ratio + 5 + 10 * aligned, b=3, k=2, c=64)
  scale = 0.25
  out_hw = (out, out) if isinstance(out, int) else out
  assert 2 * out_hw[0] * out_hw[1] * 7 * 9 <= 7 * 9 * 64   # the joint form's condition
  got = jax.jit(roi_align, static_argnums=(2, 3, 4, 5))(
      jnp.asarray(feats), jnp.asarray(boxes), out, scale, ratio, aligned)
  want = _reference(feats, boxes, out_hw, scale, ratio, aligned)
  assert got.shape == want.shape
  np.testing.assert_allclose(np.asarray(got), want, atol=2e-5, rtol=1e-5)


def test_hand_computed_3x3():
  """F[y, x] = 3y + x on a 3x3 map, worked out by hand from the algorithm."""
  f = jnp.arange(9.0).reshape(1, 3, 3, 1)
  boxes = jnp.array([[[0, 0, 2, 2],       # 1 sample at (1, 1): 4
                      [1, 1, 3, 3],       # samples (1.5|2.5)^2, 2.5 clamps to 2: (6+6.5+7.5+8)/4
                      [-2, 0, 0, 1],      # x=-1.5 is outside (0); x=-0.5 clamps to 0
                      [-3, -3, -1, -1]]], jnp.float32)  # wholly outside: 0
  r1 = roi_align(f, boxes[:, :1], 1, 1.0, sampling_ratio=1, aligned=False)
  assert float(r1[0, 0, 0, 0, 0]) == pytest.approx(4.0)
  r = roi_align(f, boxes[:, 1:], 1, 1.0, sampling_ratio=2, aligned=False)
  np.testing.assert_allclose(np.asarray(r)[0, :, 0, 0, 0], [7.0, 0.75, 0.0], atol=1e-6)
  # aligned: box (0, 0, 2, 2) becomes (-0.5, -0.5, 1.5, 1.5); one sample at (0.5, 0.5) = 2.
  ra = roi_align(f, boxes[:, :1], 1, 1.0, sampling_ratio=1, aligned=True)
  assert float(ra[0, 0, 0, 0, 0]) == pytest.approx(2.0)


def test_grad_wrt_features():
  feats, boxes = _random_case(seed=3, b=1, k=3, h=5, w=6, c=2)
  boxes = jnp.asarray(boxes)
  fn = lambda f: roi_align(f, boxes, (3, 2), 0.25, 2, False)
  check_grads(fn, (jnp.asarray(feats, jnp.float32),), order=1, modes=("rev",),
              eps=1e-2, atol=1e-2, rtol=1e-2)
  # roi_align is linear in the features: the VJP of a cotangent equals the
  # weighted scatter of that cotangent, i.e. <vjp(g), f> == <g, roi_align(f)>.
  g = jax.random.normal(jax.random.key(0), fn(jnp.asarray(feats)).shape)
  (vjp,) = jax.vjp(fn, jnp.asarray(feats))[1](g)
  lhs = float(jnp.vdot(vjp, jnp.asarray(feats)))
  rhs = float(jnp.vdot(g, fn(jnp.asarray(feats))))
  assert lhs == pytest.approx(rhs, rel=1e-5)


def test_bad_inputs():
  f = jnp.zeros((2, 4, 4, 1))
  with pytest.raises(ValueError, match="boxes must be"):
    roi_align(f, jnp.zeros((3, 1, 4)), 2, 1.0)
  with pytest.raises(ValueError, match="output_size"):
    roi_align(f, jnp.zeros((2, 1, 4)), 0, 1.0)
  with pytest.raises(ValueError, match="features must be"):
    roi_align(jnp.zeros((4, 4, 1)), jnp.zeros((2, 1, 4)), 2, 1.0)
