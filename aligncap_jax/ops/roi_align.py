"""RoI-align on NHWC feature maps, numerically equal to `torchvision.ops.roi_align`.

Bilinear interpolation is separable: the value sampled at (y, x) is
`sum_hw wy(h) * wx(w) * F[h, w]` with one-dimensional tent weights, and the
out-of-map rule of torchvision ("a sample with y < -1, y > H, x < -1 or x > W is
zero") is the product of a row test and a column test. Averaging over the
`grid_h x grid_w` samples of a bin therefore factorises too, so every box becomes
two small weight matrices `Wy[out_h, H]`, `Wx[out_w, W]` and the pooled output is
`Wy @ F @ Wx^T` per channel: two einsums over all boxes at once, no gather and no
loop over boxes (the matmul form is what TPUs are fast at). With few boxes per
map the two are one einsum over the whole map with the outer product `Wy x Wx`.
"""
from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp


def _pair(output_size: int | Sequence[int]) -> tuple[int, int]:
  if isinstance(output_size, int):
    size = (output_size, output_size)
  else:
    size = tuple(int(s) for s in output_size)
  if len(size) != 2 or min(size) < 1:
    raise ValueError(
        f"roi_align: output_size must be a positive int or (h, w), got {output_size!r}")
  return size


def _tent_weights(coords: jax.Array, size: int) -> jax.Array:
  """torchvision's bilinear weights along one axis.

  Args:
    coords: float[..., S] sample coordinates (in feature-map pixels).
    size: length of the feature-map axis.

  Returns:
    float[..., S, size]: weight of each map index for each sample; zero rows for
    samples outside [-1, size].
  """
  valid = (coords >= -1.0) & (coords <= size)
  c = jnp.maximum(coords, 0.0)
  low = jnp.floor(c).astype(jnp.int32)
  at_end = low >= size - 1
  low = jnp.where(at_end, size - 1, low)
  high = jnp.where(at_end, size - 1, low + 1)
  c = jnp.where(at_end, low.astype(c.dtype), c)
  frac = c - low.astype(c.dtype)
  idx = jnp.arange(size, dtype=jnp.int32)
  w = (jnp.where(idx == low[..., None], 1.0 - frac[..., None], 0.0)
       + jnp.where(idx == high[..., None], frac[..., None], 0.0))
  return w * valid[..., None].astype(w.dtype)


def _axis_weights(start: jax.Array, length: jax.Array, out: int, size: int,
                  grid: int | jax.Array) -> jax.Array:
  """Average of the tent weights over the samples of each output bin.

  Args:
    start: float[B, K] RoI start along this axis (feature-map pixels).
    length: float[B, K] RoI length along this axis.
    out: number of output bins.
    size: feature-map length along this axis.
    grid: samples per bin: a static int, or int[B, K] (adaptive sampling).

  Returns:
    float[B, K, out, size].
  """
  bin_size = length / out
  bins = jnp.arange(out, dtype=start.dtype)
  base = start[..., None] + bins * bin_size[..., None]          # [B, K, out]
  if isinstance(grid, int):
    offs = (jnp.arange(grid, dtype=start.dtype) + 0.5) / grid   # [G]
    coords = base[..., None] + offs * bin_size[..., None, None]  # [B, K, out, G]
    return _tent_weights(coords, size).mean(axis=-2)
  # Adaptive sampling: each box has its own count, so loop over the sample
  # index up to the largest count (a traced bound) and mask the rest.
  grid = jax.lax.stop_gradient(grid)
  gf = grid.astype(start.dtype)[..., None]                      # [B, K, 1]

  def body(carry):
    i, acc = carry
    coords = base + (i + 0.5) / gf * bin_size[..., None]
    w = _tent_weights(coords, size) * (i < grid)[..., None, None].astype(acc.dtype)
    return i + 1, acc + w

  acc0 = jnp.zeros(start.shape + (out, size), start.dtype)
  _, acc = jax.lax.while_loop(lambda c: c[0] < jnp.max(grid), body,
                              (jnp.zeros((), jnp.int32), acc0))
  return acc / jnp.maximum(gf, 1.0)[..., None]


def roi_align(features: jax.Array, boxes: jax.Array,
              output_size: int | Sequence[int], spatial_scale: float,
              sampling_ratio: int = 2, aligned: bool = True) -> jax.Array:
  """Pools each box of a batch of NHWC feature maps to a fixed grid.

  Same numbers as `torchvision.ops.roi_align(features_nchw, boxes_list,
  output_size, spatial_scale, sampling_ratio, aligned)`: each output bin is the
  mean of `sampling_ratio**2` bilinear samples (`ceil(roi_size / bins)` per axis
  when `sampling_ratio <= 0`), coordinates are shifted by -0.5 pixel when
  `aligned`, RoIs are at least 1x1 when not `aligned`, samples outside
  `[-1, H] x [-1, W]` count as zero and samples near the border are clamped.
  Differentiable w.r.t. `features`; boxes get no gradient (as in torchvision).

  Args:
    features: float[B, H, W, C] feature maps.
    boxes: float[B, K, 4] boxes `x1, y1, x2, y2` in input-image pixels.
    output_size: `out` or `(out_h, out_w)`.
    spatial_scale: feature-map pixels per input pixel (1 / patch size).
    sampling_ratio: samples per bin and axis; <= 0 for torchvision's adaptive
      count.
    aligned: shift box coordinates by -0.5 (pixel-centre convention).

  Returns:
    float[B, K, out_h, out_w, C] in the dtype of `features`.
  """
  out_h, out_w = _pair(output_size)
  if features.ndim != 4:
    raise ValueError(f"roi_align: features must be [B, H, W, C], got shape {features.shape}")
  if boxes.ndim != 3 or boxes.shape[-1] != 4 or boxes.shape[0] != features.shape[0]:
    raise ValueError(
        f"roi_align: boxes must be [B, K, 4] with B={features.shape[0]}, got shape {boxes.shape}")
  _, height, width, _ = features.shape
  boxes = jax.lax.stop_gradient(boxes).astype(jnp.float32)
  offset = 0.5 if aligned else 0.0
  x1, y1, x2, y2 = [boxes[..., i] * spatial_scale - offset for i in range(4)]
  roi_w, roi_h = x2 - x1, y2 - y1
  if not aligned:
    roi_w, roi_h = jnp.maximum(roi_w, 1.0), jnp.maximum(roi_h, 1.0)
  if sampling_ratio > 0:
    grid_h = grid_w = int(sampling_ratio)
  else:
    grid_h = jnp.ceil(roi_h / out_h).astype(jnp.int32)
    grid_w = jnp.ceil(roi_w / out_w).astype(jnp.int32)
  wy = _axis_weights(y1, roi_h, out_h, height, grid_h)   # [B, K, out_h, H]
  wx = _axis_weights(x1, roi_w, out_w, width, grid_w)    # [B, K, out_w, W]
  hp = jax.lax.Precision.HIGHEST
  b, k, channels = features.shape[0], boxes.shape[1], features.shape[-1]
  if k * out_h * out_w * height * width <= height * width * channels:
    # One contraction over the whole map with the outer product of the two axis
    # weights, float[B, K, out_h * out_w, H * W] (no bigger than the features
    # here: few boxes per map, e.g. the model's one): a plain batched matmul with
    # a contraction of H * W. The two chained einsums below (contractions of H,
    # then W, with batch-major operands) compiled about 10x slower on TPU (21 s
    # and 6 s for the model's ViT-g maps).
    joint = (wy[:, :, :, None, :, None] * wx[:, :, None, :, None, :]).reshape(
        b, k, out_h * out_w, height * width)
    out = jnp.einsum("bkPH,bHc->bkPc", joint.astype(features.dtype),
                     features.reshape(b, height * width, channels), precision=hp)
    return out.reshape(b, k, out_h, out_w, channels).astype(features.dtype)
  rows = jnp.einsum("bkph,bhwc->bkpwc", wy.astype(features.dtype), features, precision=hp)
  out = jnp.einsum("bkqw,bkpwc->bkpqc", wx.astype(features.dtype), rows, precision=hp)
  return out.astype(features.dtype)


def box_coverage(boxes: jax.Array, grid_size: int, cell_size: float) -> jax.Array:
  """The fraction of each grid cell that a box covers.

  Args:
    boxes: float[N, 4] boxes `x1, y1, x2, y2` in pixels.
    grid_size: g; the grid has g x g cells of `cell_size` pixels (a ViT's patches).
    cell_size: pixels per cell side.

  Returns:
    float32[N, g * g] in [0, 1], cells in row-major order (as a ViT's patch tokens).
  """
  boxes = boxes.astype(jnp.float32)
  edges = jnp.arange(grid_size, dtype=jnp.float32) * cell_size

  def overlap(lo, hi):   # [N] box extent on one axis -> [N, g] covered fraction
    start = jnp.maximum(lo[:, None], edges[None])
    end = jnp.minimum(hi[:, None], edges[None] + cell_size)
    return jnp.clip(end - start, 0.0, cell_size) / cell_size

  fx = overlap(boxes[:, 0], boxes[:, 2])
  fy = overlap(boxes[:, 1], boxes[:, 3])
  return (fy[:, :, None] * fx[:, None, :]).reshape((boxes.shape[0], grid_size * grid_size))


def box_geometry(boxes: jax.Array, size: float, centred: bool = False) -> jax.Array:
  """Scale-free features of boxes inside a `size x size` view.

  Args:
    boxes: float[..., 4] `x1, y1, x2, y2` in view pixels.
    size: the view's side in pixels.
    centred: measure the corners and the centre from the view's centre (each
      minus 0.5), so a box's side of the view is the sign of its feature; the
      extent is unchanged. Same information, zero-mean inputs for what reads it.

  Returns:
    float32[..., 8]: the corners, the centre and the extent, each divided by
    `size` (so in [0, 1] for boxes inside the view; [-0.5, 0.5] for the corners
    and centre when `centred`).
  """
  b = boxes.astype(jnp.float32) / size
  if centred:
    b = b - 0.5
  centre = (b[..., :2] + b[..., 2:]) / 2
  extent = b[..., 2:] - b[..., :2]
  return jnp.concatenate([b, centre, extent], axis=-1)
