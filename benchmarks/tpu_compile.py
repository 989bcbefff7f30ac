"""TPU compile time of one step under compiler-option variants, side by side.

Each variant compiles the step in a fresh process (libtpu keeps no state between
them) with the TPU compiler running here without a TPU (`pip install .[tpu]`), and
prints its compile seconds and per-chip memory; the last lines compare each
variant with the first. Run on an otherwise idle machine: the TPU backend emits
fusions one after another, and load on the other core moves the figures.

  python benchmarks/tpu_compile.py                       # vg_t5xl:v5e_8, train
  python benchmarks/tpu_compile.py --step decode --variants baseline,effort_low
  python benchmarks/tpu_compile.py --config configs/tiny.py --topology v5e:2x4

Variants (`VARIANTS`): options handed to `Lowered.compile(compiler_options=...)`
and/or JAX's compiler effort settings; `effort_low_no_windowed_einsum` is what the
config fields `train.xla_exec_time_effort=-1` and `train.tpu_windowed_einsum=False`
set. The default compares it with XLA's defaults.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from aligncap_jax.sharding import TPU_WINDOWED_EINSUM_OFF as NO_WE  # pylint: disable=g-import-not-at-top,wrong-import-position

# name -> (compiler_options, jax config updates)
VARIANTS: dict[str, tuple[dict, dict]] = {
    "baseline": ({}, {}),
    # The fsdp all-gather / reduce-scatter matmuls as plain collectives plus one
    # matmul instead of windowed-einsum loops (a loop of partial matmuls that
    # overlaps the collective with compute).
    "no_windowed_einsum": (NO_WE, {}),
    # XLA's effort levels (openxla.org/xla/effort_levels): less search for speed.
    "effort_low": ({}, {"jax_exec_time_optimization_effort": -1.0}),
    "opt_level_o1": ({}, {"jax_optimization_level": "O1"}),
    "o1_no_windowed_einsum": (NO_WE,
                              {"jax_optimization_level": "O1"}),
    "effort_low_no_windowed_einsum": (
        NO_WE,
        {"jax_exec_time_optimization_effort": -1.0}),
}


def _one(args) -> None:
  """Child: compile one step for one variant and print a JSON line."""
  import jax  # pylint: disable=g-import-not-at-top
  options, updates = VARIANTS[args.one]
  for k, v in updates.items():
    jax.config.update(k, v)
  sys.path.insert(0, ROOT)
  from aligncap_jax import aot, captioner  # pylint: disable=g-import-not-at-top
  config = captioner.config_from_file(args.config)
  res = aot.compile_steps(config, args.topology, steps=(args.step,), compiler_options=options)
  r = res[args.step]
  cost = r["compiled"].cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else (cost or {})
  # The compiler's own estimate of the step, where the backend gives one.
  estimate = {k: float(v) for k, v in cost.items()
              if any(w in k for w in ("second", "flops", "bytes accessed"))
              and isinstance(v, (int, float)) and ("{" not in k)}
  print("RESULT " + json.dumps({"variant": args.one, "lower_s": r["lower_s"],
                                "compile_s": r["compile_s"], "memory": r["memory"],
                                "cost": estimate}), flush=True)


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--config", default="configs/vg_t5xl.py:v5e_8")
  p.add_argument("--topology", default="v5e:2x4")
  p.add_argument("--step", default="train", choices=("train", "decode"))
  p.add_argument("--variants", default="baseline,effort_low_no_windowed_einsum",
                 help=f"comma-separated, first is the reference; of {', '.join(VARIANTS)}")
  p.add_argument("--one", help=argparse.SUPPRESS)
  args = p.parse_args()
  if args.one:
    _one(args)
    return
  names = [v for v in args.variants.split(",") if v]
  unknown = [v for v in names if v not in VARIANTS]
  if unknown:
    p.error(f"unknown variants {unknown}; known: {', '.join(VARIANTS)}")
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  rows = []
  for i, name in enumerate(names):
    print(f"[{i + 1}/{len(names)}] {name}: compiling {args.step} of {args.config} for "
          f"{args.topology} ...", flush=True)
    out = subprocess.run([sys.executable, __file__, "--config", args.config, "--topology",
                          args.topology, "--step", args.step, "--one", name],
                         env=env, cwd=ROOT, capture_output=True, text=True, check=False)
    got = [l for l in out.stdout.splitlines() if l.startswith("RESULT ")]
    if out.returncode or not got:
      sys.exit(f"variant {name} failed (exit {out.returncode}):\n{out.stderr[-3000:]}")
    r = json.loads(got[-1][len("RESULT "):])
    rows.append(r)
    m = r["memory"]
    print(f"  lower {r['lower_s']:.1f} s, compile {r['compile_s']:.1f} s, temporary "
          f"{m['temporary'] / 2**30:.3f} GiB, peak {m['peak'] / 2**30:.3f} GiB", flush=True)
    if r["cost"]:
      print("  compiler's cost analysis: " + ", ".join(
          f"{k} {v:.4g}" for k, v in sorted(r["cost"].items())), flush=True)
  ref = rows[0]
  print(f"\n{'variant':<32} {'compile s':>10} {'speed-up':>9} {'peak GiB':>9} {'peak vs ref':>12}"
        f" {'flops vs ref':>13}")
  for r in rows:
    # The compiler's FLOP count of the step: a hint of the run-time cost, which
    # compiling here cannot measure.
    flops = (f"{100 * (r['cost']['flops'] / ref['cost']['flops'] - 1):>+12.1f}%"
             if r["cost"].get("flops") and ref["cost"].get("flops") else f"{'-':>13}")
    print(f"{r['variant']:<32} {r['compile_s']:>10.1f} "
          f"{ref['compile_s'] / r['compile_s']:>8.2f}x {r['memory']['peak'] / 2**30:>9.3f} "
          f"{100 * (r['memory']['peak'] / ref['memory']['peak'] - 1):>+11.2f}% {flops}")


if __name__ == "__main__":
  main()
