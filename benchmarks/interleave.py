"""Side-by-side timing that survives a noisy machine: the one helper of benchmarks/.

A benchmark that times implementation A `n` times and then B `n` times measures
whatever else held the cores during each block; on a shared machine that alone
moved a ratio by 6x (issue 20). Here every implementation runs once per round,
in the same order, for `rounds` rounds after a warm-up, so that a burst of load
lands on both sides alike; the report gives each side's median and min-max and
the ratio of medians, with the machine's load average and thread settings.

  import interleave                            # scripts run as benchmarks/X.py
  parser = argparse.ArgumentParser(); interleave.add_args(parser)   # --rounds
  times = interleave.run({"ours": f, "theirs": g}, rounds=args.rounds)
  print(interleave.environment(times))         # load average around the rounds
  print(interleave.table(times, unit="tokens/s", work=320))
  print(interleave.ratio_line(times, "ours", "theirs"))

Each callable must finish its work before it returns (`jax.block_until_ready`).
Nothing here imports jax or torch; their settings are reported when the
benchmark has imported them.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from typing import Any, Callable, NamedTuple

THREAD_VARS = ("XLA_FLAGS", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS",
               "TF_NUM_INTEROP_THREADS", "TF_NUM_INTRAOP_THREADS")


class Timings(dict):
  """name -> seconds per timed call (round order), plus the 1/5/15-minute load
  averages just before the first and just after the last timed round."""
  load_before: tuple[float, float, float] | None = None
  load_after: tuple[float, float, float] | None = None


class Stats(NamedTuple):
  """Seconds per call of one implementation over the timed rounds."""
  median: float
  lo: float
  hi: float
  n: int


def add_args(parser: argparse.ArgumentParser, default_rounds: int = 5) -> None:
  """Adds `--rounds` (alias `--repeats`) and `--warmup` to a benchmark's parser."""
  parser.add_argument("--rounds", "--repeats", dest="rounds", type=int, default=default_rounds,
                      help="timed rounds; each runs every implementation once (>= 1)")
  parser.add_argument("--warmup", type=int, default=1,
                      help="untimed calls of each implementation first (compilation)")


def schedule(names: list[str], rounds: int, warmup: int = 1) -> list[tuple[str, bool]]:
  """The call order: (name, timed) pairs, warm-up calls first, then A B A B ...

  Warm-up runs each implementation `warmup` times back to back (so that
  compilation and first-touch costs finish before any timing); each timed round
  calls every implementation once, in the given order.
  """
  if rounds < 1:
    raise ValueError(f"interleave: rounds must be >= 1, got {rounds}")
  if warmup < 0:
    raise ValueError(f"interleave: warmup must be >= 0, got {warmup}")
  if len(set(names)) != len(names):
    raise ValueError(f"interleave: implementation names repeat: {names}")
  order = [(n, False) for n in names for _ in range(warmup)]
  return order + [(n, True) for _ in range(rounds) for n in names]


def run(fns: dict[str, Callable[[], Any]], rounds: int = 5, warmup: int = 1,
        clock: Callable[[], float] = time.perf_counter,
        verbose: bool = True) -> Timings:
  """Calls the implementations in `schedule` order; returns seconds per timed call.

  Args:
    fns: name -> zero-argument callable that does the work and waits for it.
    rounds: timed rounds.
    warmup: untimed calls of each before the first round.
    clock: the timer (tests pass a fake one).
    verbose: print each round's times as they come (stderr), so a long run shows progress.

  Returns:
    name -> list of `rounds` durations in seconds, in round order, with the load
    averages around the timed rounds.
  """
  times = Timings({n: [] for n in fns})
  for name, timed in schedule(list(fns), rounds, warmup):
    if timed and times.load_before is None:
      times.load_before = _loadavg()
    start = clock()
    fns[name]()
    if timed:
      times[name].append(clock() - start)
      if verbose and name == list(fns)[-1]:
        k = len(times[name])
        print(f"  round {k}/{rounds}: " + ", ".join(
            f"{n} {t[k - 1]:.3f} s" for n, t in times.items()), file=sys.stderr, flush=True)
  times.load_after = _loadavg()
  return times


def _loadavg() -> tuple[float, float, float] | None:
  try:
    return os.getloadavg()
  except OSError:
    return None


def stats(times: list[float]) -> Stats:
  """Median and min-max of one implementation's durations."""
  if not times:
    raise ValueError("interleave.stats: no durations")
  return Stats(statistics.median(times), min(times), max(times), len(times))


def ratio(times: dict[str, list[float]], fast: str, slow: str) -> float:
  """Speed-up of `fast` over `slow`: median seconds of slow / median seconds of fast."""
  return stats(times[slow]).median / stats(times[fast]).median


def pair_ratios(times: dict[str, list[float]], fast: str, slow: str) -> tuple[float, float]:
  """Min and max over rounds of slow[r] / fast[r], the same round's pair."""
  per = [s / f for f, s in zip(times[fast], times[slow])]
  return min(per), max(per)


def environment(times: Timings | None = None) -> str:
  """Load average, cores, thread settings and jax/torch backends of the run.

  With `times` (from `run`), the 1/5/15-minute load averages before and after
  the timed rounds (they count this benchmark's own threads too) and, when the
  1-minute load before the rounds exceeded the core count, a warning line:
  under oversubscription, runtimes whose worker threads wait at barriers
  (torch's OpenMP pool) slow down far more than others, so the ratio reflects
  the load as much as the code (issue 20: 5.5x under load 5 on 2 cores, 1.04x
  at load 1, same scripts).
  """
  fmt = lambda la: "n/a" if la is None else "%.2f %.2f %.2f" % la
  parts = []
  if times is not None:
    parts.append(f"load average before rounds {fmt(times.load_before)}, "
                 f"after {fmt(times.load_after)}")
  else:
    parts.append(f"load average {fmt(_loadavg())}")
  parts.append(f"os.cpu_count {os.cpu_count()}")
  for var in THREAD_VARS:
    parts.append(f"{var}={os.environ.get(var, '(unset)')!r}")
  torch = sys.modules.get("torch")
  if torch is not None:
    parts.append(f"torch threads {torch.get_num_threads()} "
                 f"(inter-op {torch.get_num_interop_threads()})")
  jax = sys.modules.get("jax")
  if jax is not None:
    devs = jax.devices()
    parts.append(f"jax {jax.__version__} on {devs[0].platform} "
                 f"({devs[0].device_kind} x {len(devs)})")
  text = "# " + "; ".join(parts)
  cores = os.cpu_count() or 1
  if times is not None and times.load_before is not None and times.load_before[0] > cores:
    text += (f"\n# WARNING: 1-minute load {times.load_before[0]:.2f} > {cores} cores before "
             "the rounds: the machine was oversubscribed; thread pools that wait at "
             "barriers (torch's OpenMP) lose far more than others, so treat the ratio "
             "as load-dependent and rerun on a quieter machine")
  return text


def table(times: dict[str, list[float]], unit: str | None = None,
          work: float | None = None) -> str:
  """A markdown table: per implementation, seconds per call and (with `work`
  units of work per call) `unit` per second, each as median (min-max)."""
  head = "| implementation | s/call, median (min-max) |"
  rule = "|---|---|"
  if work is not None:
    head += f" {unit}, median (min-max) |"
    rule += "---|"
  lines = [head, rule]
  for name, ts in times.items():
    s = stats(ts)
    row = f"| {name} | {s.median:.3f} ({s.lo:.3f}-{s.hi:.3f}) |"
    if work is not None:
      row += f" {work / s.median:.2f} ({work / s.hi:.2f}-{work / s.lo:.2f}) |"
    lines.append(row)
  return "\n".join(lines)


def ratio_line(times: dict[str, list[float]], fast: str, slow: str) -> str:
  """'speed-up fast / slow: R x (ratio of medians; per round pair lo-hi), N rounds'."""
  lo, hi = pair_ratios(times, fast, slow)
  return (f"speed-up {fast} over {slow}: {ratio(times, fast, slow):.2f}x "
          f"(ratio of medians; per round pair {lo:.2f}x-{hi:.2f}x; "
          f"{len(times[fast])} interleaved rounds)")
