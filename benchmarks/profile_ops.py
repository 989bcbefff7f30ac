"""Where a side-by-side benchmark's time goes: per-op profiles of ours and theirs.

The benchmarks' `--profile` flag uses this after the timed rounds: it profiles a
few more calls of each implementation, adds up the time of every kernel, and
splits it into matrix products (XLA's dot / convolution / XNNPACK fusions on the
CPU; aten mm / addmm / bmm / convolution in PyTorch) and everything else, with
the largest other ops named. With the matrix products' FLOPs it prints the rate
they ran at, the figure that says whether a speed-up target is bounded by the
matrix products themselves (evidence for issue 20's "what bounds them").

  import profile_ops
  print(profile_ops.report_jax(fn, calls=3, flops=F, wall=median_s))  # fn blocks
  print(profile_ops.report_torch(fn, calls=3, flops=F, wall=median_s))
  print(profile_ops.report_pair(("ours", f), ("theirs", g), medians, flops=F, what="..."))
"""
from __future__ import annotations

import collections
import glob
import gzip
import json
import os
import re
import tempfile
from typing import Callable

# Kernel names (digits stripped) that are matrix products.
_JAX_MATMUL = re.compile(r"^(dot|convolution|ynn_fusion|.*_dot_fusion|.*convolution_fusion|"
                         r"onednn.*|__onednn\$matmul)")
# Trace events that are not kernels: containers, waits and the Python stack.
_JAX_SKIP = ("ThunkExecutor", "$", "SlinkyThreadPool", "while", "cond", "call", "TfrtCpu",
             "PjitFunction", "CommonPjRt", "Latent",
             "PjRt", "Execute", "XLA", "jit_")
_TORCH_MATMUL = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::convolution",
                 "aten::_convolution", "aten::mkldnn_convolution", "aten::_mkldnn_linear",
                 "aten::mkldnn_linear")


def _kind(name: str) -> str:
  return name.rstrip("0123456789.").rstrip("_")


def _format(title: str, per_call: dict[str, float], matmul: set[str], calls: int,
            flops: float | None, top: int, wall: float | None) -> str:
  total = sum(per_call.values())
  mm = sum(v for k, v in per_call.items() if k in matmul)
  share = mm / max(total, 1e-12)
  lines = [f"{title}: {total * 1e3:.1f} ms of kernels per call; matrix products "
           f"{mm * 1e3:.1f} ms ({100 * share:.0f}%), the rest {(total - mm) * 1e3:.1f} ms"]
  if wall:
    # Kernel time is summed over threads on one side and measured per op on the
    # other; the share of it, times the call's median wall time, compares alike.
    lines.append(f"  of the {wall * 1e3:.0f} ms call (median of the rounds): matrix products "
                 f"~{share * wall * 1e3:.0f} ms, the rest ~{(1 - share) * wall * 1e3:.0f} ms")
  if flops:
    basis = share * wall if wall else mm
    lines.append(f"  matrix products: {flops / 1e9:.2f} GFLOP per call at "
                 f"{flops / max(basis, 1e-12) / 1e9:.1f} GFLOP/s"
                 f"{' (wall)' if wall else ''}")
  others = sorted(((v, k) for k, v in per_call.items() if k not in matmul), reverse=True)
  for v, k in others[:top]:
    lines.append(f"  {v * 1e3:8.2f} ms {100 * v / max(total, 1e-12):5.1f}%  {k}")
  lines.append(f"  ({calls} profiled calls)")
  return "\n".join(lines)


def report_jax(fn: Callable[[], object], *, calls: int = 3, flops: float | None = None,
               top: int = 6, title: str = "ours", wall: float | None = None) -> str:
  """Profiles `calls` calls of a jitted `fn` on the CPU with `jax.profiler`.

  Kernel times are summed over XLA's threads (they can exceed the wall time);
  `wall` (seconds per call, e.g. the rounds' median) turns shares into wall time.
  """
  import jax  # pylint: disable=g-import-not-at-top
  with tempfile.TemporaryDirectory(prefix="profile_ops_") as d:
    with jax.profiler.trace(d):
      for _ in range(calls):
        fn()
    files = glob.glob(os.path.join(d, "**", "*.trace.json.gz"), recursive=True)
    if not files:
      return f"{title}: no trace written (jax.profiler)"
    with gzip.open(files[0]) as f:
      events = json.load(f)["traceEvents"]
  per_kind: dict[str, float] = collections.Counter()
  spans = [e for e in events if e.get("ph") == "X" and not e["name"].startswith(_JAX_SKIP)]
  # XLA's thunk executor tags each kernel with the HLO op it runs; host-side
  # runtime events (MutexLock, buffer allocation, garbage collection) carry no
  # such tag and, on a busy machine, can outweigh the kernels themselves.
  if any("hlo_op" in e.get("args", {}) for e in spans):
    spans = [e for e in spans if "hlo_op" in e.get("args", {})]
  for e in spans:
    per_kind[_kind(e["name"])] += e["dur"] * 1e-6 / calls
  matmul = {k for k in per_kind if _JAX_MATMUL.match(k)}
  return _format(title, per_kind, matmul, calls, flops, top, wall)


def report_torch(fn: Callable[[], object], *, calls: int = 3, flops: float | None = None,
                 top: int = 6, title: str = "theirs", wall: float | None = None) -> str:
  """Profiles `calls` calls of `fn` with `torch.profiler` (self CPU time per op;
  `wall` as in `report_jax`)."""
  import torch  # pylint: disable=g-import-not-at-top
  with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
    for _ in range(calls):
      fn()
  per_op = {e.key: e.self_cpu_time_total * 1e-6 / calls for e in prof.key_averages()}
  matmul = {k for k in per_op if k in _TORCH_MATMUL}
  return _format(title, per_op, matmul, calls, flops, top, wall)


def report_pair(ours: tuple[str, Callable[[], object]], theirs: tuple[str, Callable[[], object]],
                medians: dict[str, float], *, flops: float, what: str, calls: int = 3) -> str:
  """Both sides' reports, ours (jax) then theirs (torch), each scaled to its median
  wall time in `medians` (name -> seconds per call); `what` says what `flops` counts."""
  return "\n".join([
      f"# profile: {flops / 1e9:.1f} GFLOP of matrix products per call ({what})",
      report_jax(ours[1], calls=calls, flops=flops, title=ours[0], wall=medians[ours[0]]),
      report_torch(theirs[1], calls=calls, flops=flops, title=theirs[0],
                   wall=medians[theirs[0]])])
