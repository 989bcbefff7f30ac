"""Activations whose compiled form matters."""
from __future__ import annotations

import jax


def gelu_exact(x: jax.Array) -> jax.Array:
  """The exact (erf) GELU, `jax.nn.gelu(x, approximate=False)`, as its own kernel.

  Same values as `jax.nn.gelu(x, approximate=False)` (torch's `GELU()`, Hugging
  Face's "gelu"). The optimization barrier stops XLA from fusing the erfc
  expansion (about 40 elementwise ops with branches and an exp) into the matmul
  that consumes it: on TPU such a matmul fusion fails its first tilings and
  took 45-55 s to compile each (the Q-Former's fc2, forward and rematerialised
  backward), against about 2 s for the plain matmul plus an elementwise kernel.
  """
  return jax.lax.optimization_barrier(jax.nn.gelu(x, approximate=False))
