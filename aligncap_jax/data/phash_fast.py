"""pHash resampling of many crops of one image, bit-equal to PIL's Lanczos.

`god.box_hashes(method="exact")` crops each box from the grey image with PIL
and resizes it to 32 x 32 with `Image.Resampling.LANCZOS`, as `imagehash.phash`
does: one C call per crop, scalar fixed-point loops, about 6 multiply-adds per
crop pixel. On Visual-Genome-sized records (800 x 600, ~300 distinct boxes
covering ~33 Mpx in all) that is ~0.2 s per image.

This module computes the same 32 x 32 uint8 images with the same arithmetic,
compiled with numba and vectorised over image rows:

- the coefficients are PIL's (`precompute_coeffs` in `libImaging/Resample.c`:
  Lanczos-3 support scaled by the downscale factor, each row normalised in
  double, then rounded to 22-bit fixed point as `normalize_coeffs_8bpc` does);
- the horizontal pass runs first and rounds to uint8 (PIL's intermediate
  image), then the vertical pass, except for crops over 100x taller than
  wide, which `Image.resize` resizes vertically first;
- both passes sum in int32 as PIL's `int ss0` does and round with
  `clip8((2^21 + sum) >> 22)`; the horizontal pass (the bulk: ~6
  multiply-adds per crop pixel, as in PIL) is vectorised over the image rows
  each tap multiplies (8 lanes per instruction), the vertical pass is one
  dot product per output along a row of the horizontal pass's result.

Windows sharing a column range (union views of one wide object) share one
horizontal pass over the union of their rows, and each input size's
coefficients are computed once per process (`_CoefficientTable`).

Why not an approximate resample: on those records 38% of regions have an exact
tie in pHash distance at the j-1 cutoff and 78% a gap of <= 2 bits, so the
selected views follow single-bit changes. Measured (10 records, evaluation
order, 2 slots): one shared grey pyramid (2x box or Lanczos levels, the level
with >= 32-64 px, then PIL's Lanczos) kept the views of 82-96% of regions at
55-116 ms per image; even a float Lanczos with PIL's own coefficients, only
skipping the uint8 rounding between the passes, kept 90%. Equal views need
equal hashes.

numba compiles the kernels on the first call in a process that finds no cache
(~10 s; cached on disk beside this file, or in numba's user cache dir when the
package folder is read-only); later processes load them in well under a second.
"""
from __future__ import annotations

import math

import numba
import numpy as np

_OUT = 32            # imagehash.phash: hash_size 8 * highfreq_factor 4
_PRECISION_BITS = 22  # PIL: 32 - 8 - 2
_HALF = np.int32(1 << (_PRECISION_BITS - 1))
_SCALE = float(1 << _PRECISION_BITS)


@numba.njit(cache=True)
def _lanczos(x: float) -> float:
  if -3.0 <= x < 3.0:
    a = 1.0 if x == 0.0 else math.sin(x * math.pi) / (x * math.pi)
    y = x / 3.0
    b = 1.0 if y == 0.0 else math.sin(y * math.pi) / (y * math.pi)
    return a * b
  return 0.0


@numba.njit(cache=True)
def _ksize(in_size: int) -> int:
  scale = in_size / _OUT
  return int(math.ceil(3.0 * (scale if scale > 1.0 else 1.0))) * 2 + 1


@numba.njit(cache=True)
def _fill(in_size: int, flat: np.ndarray, offsets: np.ndarray, bounds: np.ndarray) -> None:
  """PIL's fixed-point Lanczos coefficients of `in_size` -> 32 (box = whole input).

  Writes flat[offsets[in_size]:][:32 * ksize] (int32, row xx = output
  xx, zero past its taps) and bounds[in_size] = (first input index, taps) per
  output. `precompute_coeffs` + `normalize_coeffs_8bpc`, statement by statement.
  """
  scale = in_size / _OUT
  filterscale = scale if scale > 1.0 else 1.0
  support = 3.0 * filterscale
  ksize = _ksize(in_size)
  ss = 1.0 / filterscale
  k = np.zeros(ksize)
  base = offsets[in_size]
  for xx in range(_OUT):
    center = (xx + 0.5) * scale
    xmin = int(center - support + 0.5)
    if xmin < 0:
      xmin = 0
    xmax = int(center + support + 0.5)
    if xmax > in_size:
      xmax = in_size
    xmax -= xmin
    ww = 0.0
    for x in range(xmax):
      w = _lanczos((x + xmin - center + 0.5) * ss)
      k[x] = w
      ww += w
    for x in range(ksize):
      v = 0.0
      if x < xmax:
        v = k[x] / ww if ww != 0.0 else k[x]
      v *= _SCALE
      flat[base + xx * ksize + x] = int(-0.5 + v) if v < 0 else int(0.5 + v)
    bounds[in_size, xx, 0] = xmin
    bounds[in_size, xx, 1] = xmax


@numba.njit(cache=True, error_model="numpy")
def _pass(src: np.ndarray, n_in: int, n_lines: int, flat: np.ndarray, offsets: np.ndarray,
          bounds: np.ndarray, acc: np.ndarray, dst: np.ndarray) -> None:
  """dst[o, l] = clip8((2^21 + sum_t src[first_o + t, l] * k[o, t]) >> 22), 32 outputs o.

  `src` is [n_in, >= n_lines] with lines contiguous, so each tap is one
  vectorised int32 sweep over the lines (PIL's `int ss0` arithmetic).
  """
  ksize = _ksize(n_in)
  base = offsets[n_in]
  a = acc[:n_lines]
  for o in range(_OUT):
    a[:] = _HALF
    first = bounds[n_in, o, 0]
    taps = bounds[n_in, o, 1]
    row = base + o * ksize
    t = 0
    while t + 4 <= taps:  # four taps per sweep: a quarter of the loads/stores of `a`
      k0, k1, k2, k3 = flat[row + t], flat[row + t + 1], flat[row + t + 2], flat[row + t + 3]
      c0, c1 = src[first + t], src[first + t + 1]
      c2, c3 = src[first + t + 2], src[first + t + 3]
      for l in range(n_lines):
        a[l] += np.int32((np.int32(c0[l]) * k0 + np.int32(c1[l]) * k1)
                         + (np.int32(c2[l]) * k2 + np.int32(c3[l]) * k3))
      t += 4
    while t < taps:
      k0 = flat[row + t]
      c0 = src[first + t]
      for l in range(n_lines):
        a[l] += np.int32(np.int32(c0[l]) * k0)
      t += 1
    for l in range(n_lines):
      dst[o, l] = np.uint8(min(max(a[l] >> _PRECISION_BITS, 0), 255))


@numba.njit(cache=True, error_model="numpy")
def _vertical(mid: np.ndarray, top: int, h: int, flat: np.ndarray, offsets: np.ndarray,
              bounds: np.ndarray, dst: np.ndarray) -> None:
  """dst[i, j] = clip8((2^21 + sum_t mid[j, top + first_i + t] * k[i, t]) >> 22): one
  int32 dot product along a contiguous row of the horizontal pass per output."""
  ksize = _ksize(h)
  base = offsets[h]
  for i in range(_OUT):
    first = top + bounds[h, i, 0]
    taps = bounds[h, i, 1]
    k = flat[base + i * ksize:base + i * ksize + taps]
    for j in range(_OUT):
      line = mid[j, first:first + taps]
      s = np.int32(_HALF)
      for t in range(taps):
        s += np.int32(np.int32(line[t]) * k[t])
      dst[i, j] = np.uint8(min(max(s >> _PRECISION_BITS, 0), 255))


@numba.njit(cache=True)
def _resample(grey_t: np.ndarray, windows: np.ndarray, order: np.ndarray, flat: np.ndarray,
              offsets: np.ndarray, bounds: np.ndarray, ready: np.ndarray) -> np.ndarray:
  """`resample_crops` on the transposed image, windows visited in `order` (sorted by
  (left, right)): windows sharing a column range share one horizontal pass."""
  n = windows.shape[0]
  out = np.empty((n, _OUT, _OUT), np.uint8)
  longest = _OUT
  for c in range(n):
    for d in range(2):
      size = windows[c, d + 2] - windows[c, d]
      longest = max(longest, size)
      if not ready[size]:
        _fill(size, flat, offsets, bounds)
        ready[size] = True
  height = grey_t.shape[1]
  acc = np.empty(max(longest, height), np.int32)
  crop_t = np.empty((longest, longest), np.uint8)   # [y, x] or [x, y]
  mid = np.empty((_OUT, height), np.uint8)          # horizontal pass, [x out, image row]
  res = np.empty((_OUT, _OUT), np.uint8)
  g = 0
  while g < n:
    # One group: the windows with this column range.
    left, right = windows[order[g], 0], windows[order[g], 2]
    end = g
    lo, hi, rows = height, 0, 0
    while end < n and windows[order[end], 0] == left and windows[order[end], 2] == right:
      c = order[end]
      lo = min(lo, windows[c, 1])
      hi = max(hi, windows[c, 3])
      rows += windows[c, 3] - windows[c, 1]
      end += 1
    w = right - left
    shared = end - g > 1 and hi - lo <= rows
    if shared:
      if w == _OUT:
        for j in range(_OUT):
          mid[j, lo:hi] = grey_t[left + j, lo:hi]
      else:
        _pass(grey_t[left:right, lo:hi], w, hi - lo, flat, offsets, bounds, acc,
              mid[:, lo:hi])
    for e in range(g, end):
      c = order[e]
      top, bottom = windows[c, 1], windows[c, 3]
      h = bottom - top
      if h > 100 * w and h > _OUT:
        # PIL's Image.resize: a crop over 100x taller than wide is resized
        # vertically first, as its own uint8 image.
        for y in range(h):
          for x in range(w):
            crop_t[y, x] = grey_t[left + x, top + y]
        _pass(crop_t, h, w, flat, offsets, bounds, acc, res)       # res[i, x]
        for x in range(w):
          for i in range(_OUT):
            crop_t[x, i] = res[i, x]
        _pass(crop_t, w, _OUT, flat, offsets, bounds, acc, res)    # res[j, i]
        for i in range(_OUT):
          for j in range(_OUT):
            out[c, i, j] = res[j, i]
        continue
      # Horizontal pass first, rounded to uint8 (skipped when already 32 wide).
      if not shared:
        if w == _OUT:
          for j in range(_OUT):
            mid[j, top:bottom] = grey_t[left + j, top:bottom]
        else:
          _pass(grey_t[left:right, top:bottom], w, h, flat, offsets, bounds, acc,
                mid[:, top:bottom])
      if h == _OUT:
        for i in range(_OUT):
          for j in range(_OUT):
            out[c, i, j] = mid[j, top + i]
        continue
      _vertical(mid, top, h, flat, offsets, bounds, out[c])
    g = end
  return out


class _CoefficientTable:
  """PIL's coefficients per input size, computed on first use, kept for the process.

  Sizes up to `capacity`: int32 (PIL's 22-bit fixed point), about 8 MB for
  1,024 px, 30 MB for 2,048 px. Grows (and starts over) for a larger image.
  """

  def __init__(self):
    self.capacity = 0

  def arrays(self, longest: int):
    if longest > self.capacity:
      self.capacity = max(1024, 1 << (int(longest) - 1).bit_length())
      sizes = np.array([_ksize(n) if n else 0 for n in range(self.capacity + 1)], np.int64)
      self.offsets = np.concatenate([[0], np.cumsum(_OUT * sizes)]).astype(np.int64)
      self.flat = np.zeros(int(self.offsets[-1]), np.int32)
      self.bounds = np.zeros((self.capacity + 1, _OUT, 2), np.int64)
      self.ready = np.zeros(self.capacity + 1, np.bool_)
    return self.flat, self.offsets, self.bounds, self.ready


_TABLE = _CoefficientTable()


def resample_crops(grey: np.ndarray, windows: np.ndarray) -> np.ndarray:
  """uint8[N, 32, 32]: `Image.fromarray(grey).crop(w).resize((32, 32), LANCZOS)` per window.

  Args:
    grey: uint8[H, W] grey image (PIL mode "L" as an array).
    windows: int[N, 4] integer windows (left, top, right, bottom) inside the
      image, each at least one pixel wide and high (`god.crop_pixels`).
  """
  grey = np.asarray(grey)
  windows = np.asarray(windows, np.int64).reshape(-1, 4)
  if grey.dtype != np.uint8 or grey.ndim != 2:
    raise ValueError(f"grey must be uint8[H, W], got {grey.dtype}{list(grey.shape)}")
  height, width = grey.shape
  if len(windows) and (windows[:, 0].min() < 0 or windows[:, 1].min() < 0
                       or windows[:, 2].max() > width or windows[:, 3].max() > height
                       or (windows[:, 2] <= windows[:, 0]).any()
                       or (windows[:, 3] <= windows[:, 1]).any()):
    raise ValueError(f"windows must be non-empty and inside the {width}x{height} image")
  tables = _TABLE.arrays(max(width, height))
  order = np.lexsort((windows[:, 2], windows[:, 0])).astype(np.int64)
  return _resample(np.ascontiguousarray(grey.T), windows, order, *tables)
