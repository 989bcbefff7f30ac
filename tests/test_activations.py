"""`ops.gelu_exact`: jax's exact GELU, kept out of the consuming matmul's fusion."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from aligncap_jax import ops
from aligncap_jax.models import t5, vit


def test_values_and_gradient_equal_jax_exact_gelu():
  x = jnp.linspace(-9.0, 9.0, 1001, dtype=jnp.float32)
  ref = lambda v: jax.nn.gelu(v, approximate=False)
  np.testing.assert_array_equal(np.asarray(jax.jit(ops.gelu_exact)(x)), np.asarray(jax.jit(ref)(x)))
  grad = lambda f: jax.jit(jax.grad(lambda v: jnp.sum(f(v) * jnp.cos(v))))(x)
  np.testing.assert_array_equal(np.asarray(grad(ops.gelu_exact)), np.asarray(grad(ref)))
  xb = x.astype(jnp.bfloat16)
  assert ops.gelu_exact(xb).dtype == jnp.bfloat16
  np.testing.assert_array_equal(np.asarray(ops.gelu_exact(xb), np.float32),
                                np.asarray(ref(xb), np.float32))


def test_towers_use_it_for_hf_gelu():
  assert vit.activation("gelu") is ops.gelu_exact
  assert t5.activation("gelu") is ops.gelu_exact


def test_barrier_in_the_lowered_program():
  text = jax.jit(ops.gelu_exact).lower(jnp.zeros((4,), jnp.float32)).as_text()
  assert "optimization_barrier" in text
