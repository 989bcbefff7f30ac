"""Float tolerances set from the dtype and the depth of a computation.

Two programs that compute the same math in another order (scan vs unrolled
layers, remat, masked vs dropped tokens, 1 vs 8 devices, or the same program on
a CPU with another SIMD width) differ by rounding only. Each layer (sums over its
width in blocked order, softmax, layer norm's division) adds a few ulps relative
to the scale of its output, and layers compound about linearly, so

  atol = ULPS_PER_LAYER * eps(dtype) * depth * max|reference|

with ULPS_PER_LAYER = 64 (sums of up to a few hundred terms, layer norm's
amplification up to ~4x): 7.6e-6 of the tensor's scale per float32 layer. The
bound is absolute, at the scale of the whole tensor: an element near zero gets
the same room as a large one (reassociation error follows the magnitudes summed,
not the result). A real bug (a wrong mask, a missing layer, swapped weights)
moves outputs by 1e-2 of that scale or more, three orders above it.
"""
from __future__ import annotations

import numpy as np

ULPS_PER_LAYER = 64


def reorder_atol(want, depth: int, dtype=np.float32) -> float:
  """The absolute tolerance for `want` after `depth` sequential layers."""
  scale = float(np.max(np.abs(np.asarray(want, np.float64)))) if np.size(want) else 0.0
  return ULPS_PER_LAYER * float(np.finfo(dtype).eps) * max(depth, 1) * max(scale, 1e-30)


def assert_reorder_close(got, want, depth: int, dtype=np.float32) -> None:
  """`got` equals `want` up to the rounding of `depth` layers computed in another order."""
  np.testing.assert_allclose(np.asarray(got, np.float64), np.asarray(want, np.float64),
                             rtol=0, atol=reorder_atol(want, depth, dtype))
