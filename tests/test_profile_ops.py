"""benchmarks/profile_ops.py: the split into matrix products and the rest, and a real
jax.profiler trace of a jitted matrix product read back."""
import importlib.util
import pathlib
import re

import jax
import jax.numpy as jnp

ROOT = pathlib.Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("profile_ops", ROOT / "benchmarks" / "profile_ops.py")
profile_ops = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(profile_ops)


def test_format_splits_kernel_time_and_scales_it_to_the_wall_time():
  per_call = {"ynn_fusion": 0.6, "dot": 0.2, "copy": 0.15, "add_fusion": 0.05}
  text = profile_ops._format("ours", per_call, {"ynn_fusion", "dot"}, calls=3,
                             flops=4e9, top=2, wall=0.5)
  lines = text.splitlines()
  # 0.8 s of 1.0 s of kernel time is matrix products: 80%, so 0.4 s of the 0.5 s call.
  assert lines[0] == ("ours: 1000.0 ms of kernels per call; matrix products 800.0 ms (80%), "
                      "the rest 200.0 ms")
  assert "matrix products ~400 ms, the rest ~100 ms" in lines[1]
  assert "4.00 GFLOP per call at 10.0 GFLOP/s (wall)" in lines[2]
  # The largest other ops, largest first, `top` of them.
  assert "copy" in lines[3] and "add_fusion" in lines[4] and len(lines) == 6
  # Without a wall time, the rate is over the kernel time itself.
  no_wall = profile_ops._format("t", per_call, {"ynn_fusion", "dot"}, 1, 4e9, 0, None)
  assert "at 5.0 GFLOP/s" in no_wall and "(wall)" not in no_wall


def test_report_jax_reads_a_real_trace_and_finds_the_matrix_product():
  a = jnp.ones((256, 256), jnp.float32)
  f = jax.jit(lambda x: jnp.tanh(x @ x) @ x)
  f(a).block_until_ready()
  text = profile_ops.report_jax(lambda: f(a).block_until_ready(), calls=2,
                                flops=2 * 2 * 256 ** 3)
  first = text.splitlines()[0]
  got = re.match(r"ours: ([\d.]+) ms of kernels per call; matrix products ([\d.]+) ms", first)
  assert got, text
  total, matmul = float(got.group(1)), float(got.group(2))
  # Two 256^3 products dominate a tanh of 256^2 elements.
  assert 0 < matmul <= total and matmul >= 0.5 * total, text
  assert "GFLOP/s" in text


def test_report_pair_profiles_both_sides_at_their_median():
  torch = __import__("pytest").importorskip("torch")
  a = jnp.ones((128, 128), jnp.float32)
  f = jax.jit(lambda x: x @ x)
  f(a).block_until_ready()
  t = torch.ones((128, 128))
  text = profile_ops.report_pair(("ours", lambda: f(a).block_until_ready()),
                                 ("theirs", lambda: t @ t), {"ours": 0.01, "theirs": 0.02},
                                 flops=2 * 128 ** 3, what="one product", calls=2)
  lines = text.splitlines()
  assert lines[0] == "# profile: 0.0 GFLOP of matrix products per call (one product)"
  ours = [l for l in lines if l.startswith("ours:")]
  theirs = [l for l in lines if l.startswith("theirs:")]
  assert len(ours) == 1 and len(theirs) == 1, text
  assert "of the 10 ms call" in text and "of the 20 ms call" in text
