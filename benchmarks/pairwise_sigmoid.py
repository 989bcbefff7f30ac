"""Pairwise sigmoid loss: dense vs chunked vs ring, measured side by side in one run.

  python benchmarks/pairwise_sigmoid.py                          # dot: N=16384, D=256, block 512
  python benchmarks/pairwise_sigmoid.py --scorer cross_attention # N=256 x 32 tokens, block 16

Prints a markdown table of compiled temporary memory
(`memory_analysis().temp_size_in_bytes`) and forward+backward time of dense vs
chunked on one device (one warm-up each, then `--rounds` interleaved rounds,
dense, chunked, dense, ...: median (min-max); benchmarks/interleave.py), and
per-device temporary memory of the reference all-gather strategy vs the ring on
8 fake CPU devices, each with its target; then the load average and thread
settings of the run.
"""
from __future__ import annotations

import os

from aligncap_jax import fake_devices  # noqa: E402

# 8 fake devices with thread slack (their ring collectives deadlock without it).
fake_devices.use_fake_cpu_devices(8)
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import argparse  # noqa: E402

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

from aligncap_jax.losses import pairwise_sigmoid_loss  # noqa: E402
from aligncap_jax.losses import reference_allgather_pairwise_sigmoid_loss  # noqa: E402
from aligncap_jax.losses import sharded_pairwise_sigmoid_loss  # noqa: E402
from aligncap_jax.models.pairwise_scorer import PairwiseScorer  # noqa: E402
from aligncap_jax.models.pairwise_scorer import make_score_fn  # noqa: E402

import interleave  # noqa: E402  (benchmarks/, the script's folder)

LOG_T, BIAS = float(np.log(10.0)), -10.0
TARGETS = {"dot": 1.3, "cross_attention": 1.5}


def _problem(scorer: str, n: int, dim: int, tokens: int):
  """Returns (loss(form, args, mesh) -> scalar, args) for one scorer kind."""
  keys = jax.random.split(jax.random.key(0), 4)
  if scorer == "dot":
    unit = lambda a: a / jnp.linalg.norm(a, axis=-1, keepdims=True)
    args = (unit(jax.random.normal(keys[0], (n, dim))),
            unit(jax.random.normal(keys[1], (n, dim))), LOG_T, BIAS)

    def loss(form, block, mesh, x, y, lt, b):
      if form in ("ring", "allgather"):
        fn = (sharded_pairwise_sigmoid_loss if form == "ring"
              else reference_allgather_pairwise_sigmoid_loss)
        return fn(x, y, lt, b, mesh=mesh, axis_names=mesh.axis_names)
      return pairwise_sigmoid_loss(x, y, lt, b, block_size=block)
    return loss, args

  module = PairwiseScorer(dim=dim)
  region_tokens = jax.random.normal(keys[0], (n, tokens, dim))
  captions = jax.random.normal(keys[1], (n, dim))
  variables = nn.meta.unbox(module.init(keys[2], region_tokens[:2], None, captions[:2]))
  score_fn = make_score_fn(module)
  args = (region_tokens, captions, LOG_T, BIAS, variables)

  def loss(form, block, mesh, t, c, lt, b, v):
    rows = module.apply(v, t, None, method=PairwiseScorer.project_regions)
    kw = dict(score_fn=score_fn, score_params=v)
    if form in ("ring", "allgather"):
      fn = (sharded_pairwise_sigmoid_loss if form == "ring"
            else reference_allgather_pairwise_sigmoid_loss)
      return fn(rows, c, lt, b, mesh=mesh, axis_names=mesh.axis_names, **kw)
    return pairwise_sigmoid_loss(rows, c, lt, b, block_size=block, **kw)
  return loss, args


def _compile(loss, form, block, mesh, args):
  argnums = tuple(range(len(args)))
  fn = jax.jit(jax.value_and_grad(lambda *a: loss(form, block, mesh, *a), argnums=argnums))
  compiled = fn.lower(*args).compile()
  return compiled, compiled.memory_analysis().temp_size_in_bytes


def _mib(b: int) -> str:
  return f"{b / 2**20:,.1f} MiB"


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--scorer", choices=("dot", "cross_attention"), default="dot")
  parser.add_argument("--n", type=int, default=None,
                      help="global batch N (default 16384 dot, 256 cross_attention)")
  parser.add_argument("--block", type=int, default=None,
                      help="column block (default 512 dot, 16 cross_attention)")
  parser.add_argument("--dim", type=int, default=256)
  parser.add_argument("--tokens", type=int, default=32, help="region tokens (cross_attention)")
  interleave.add_args(parser)
  parser.add_argument("--skip-time", action="store_true", help="memory only")
  a = parser.parse_args()
  dot = a.scorer == "dot"
  n = a.n or (16384 if dot else 256)
  block = a.block or (512 if dot else 16)
  loss, args = _problem(a.scorer, n, a.dim, a.tokens)

  print(f"# pairwise sigmoid loss, scorer={a.scorer}, N={n}, D={a.dim}, block={block}"
        + ("" if dot else f", {a.tokens} tokens per region"))
  print(f"# device: {jax.devices()[0].device_kind} x {jax.device_count()} (fake CPU devices "
        f"share the host's {os.cpu_count()} cores); fwd+bwd = value_and_grad w.r.t. every input")
  dense_c, dense_mem = _compile(loss, "dense", None, None, args)
  chunk_c, chunk_mem = _compile(loss, "chunked", block, None, args)
  times = None
  if a.skip_time:
    dense_t = chunk_t = interleave.Stats(float("nan"), float("nan"), float("nan"), 0)
  else:
    times = interleave.run(
        {"dense": lambda: jax.block_until_ready(dense_c(*args)),
         "chunked": lambda: jax.block_until_ready(chunk_c(*args))},
        rounds=a.rounds, warmup=a.warmup)
    dense_t, chunk_t = interleave.stats(times["dense"]), interleave.stats(times["chunked"])
  del dense_c, chunk_c

  mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
  rows = NamedSharding(mesh, P("data"))
  sharded = tuple(jax.device_put(x, rows) for x in args[:2]) + tuple(args[2:])
  with jax.set_mesh(mesh):
    _, ref_mem = _compile(loss, "allgather", None, mesh, sharded)
    _, ring_mem = _compile(loss, "ring", None, mesh, sharded)

  t_target = TARGETS[a.scorer]
  mem_ratio, ring_ratio = chunk_mem / dense_mem, ring_mem / ref_mem
  t_ratio = chunk_t.median / dense_t.median
  ms = lambda s: f"{s.median * 1e3:,.1f} ms ({s.lo * 1e3:,.1f}-{s.hi * 1e3:,.1f})"
  ok = lambda c: "yes" if c else "no"
  print()
  print("| measurement | baseline | ours | ratio (ours / baseline) | target | met |")
  print("|---|---|---|---|---|---|")
  print(f"| temp memory, 1 device: dense vs chunked | {_mib(dense_mem)} | {_mib(chunk_mem)} "
        f"| {mem_ratio:.4f} | <= 0.125 | {ok(mem_ratio <= 0.125)} |")
  print(f"| fwd+bwd time, 1 device: dense vs chunked, median (min-max) | {ms(dense_t)} "
        f"| {ms(chunk_t)} | {t_ratio:.3f} | <= {t_target} | {ok(t_ratio <= t_target)} |")
  print(f"| temp memory per device, 8 devices: all-gather reference vs ring "
        f"| {_mib(ref_mem)} | {_mib(ring_mem)} | {ring_ratio:.4f} | <= 0.25 "
        f"| {ok(ring_ratio <= 0.25)} |")
  print()
  print(interleave.environment(times))
  if times is not None:
    print(interleave.ratio_line(times, "chunked", "dense"))


if __name__ == "__main__":
  main()
