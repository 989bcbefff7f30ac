"""benchmarks/interleave.py: call order, statistics and report of the shared helper
(with a fake clock; no timing is measured here)."""
import argparse
import importlib.util
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("interleave", ROOT / "benchmarks" / "interleave.py")
interleave = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(interleave)


def test_schedule_warms_up_then_alternates():
  assert interleave.schedule(["a", "b"], rounds=3, warmup=1) == [
      ("a", False), ("b", False),
      ("a", True), ("b", True), ("a", True), ("b", True), ("a", True), ("b", True)]
  assert interleave.schedule(["a"], rounds=2, warmup=0) == [("a", True), ("a", True)]
  with pytest.raises(ValueError, match="rounds"):
    interleave.schedule(["a", "b"], rounds=0)
  with pytest.raises(ValueError, match="repeat"):
    interleave.schedule(["a", "a"], rounds=1)


def test_run_calls_in_order_and_times_each_call():
  calls = []
  # Fake clock: each call advances it; warm-up calls (0.5 s, 5 s) are not timed.
  durations = {"a": iter([0.5, 1.0, 3.0, 2.0]), "b": iter([5.0, 10.0, 30.0, 20.0])}
  clock_value = [0.0]

  def make(name):
    def fn():
      calls.append(name)
      clock_value[0] += next(durations[name])
    return fn

  times = interleave.run({"a": make("a"), "b": make("b")}, rounds=3, warmup=1,
                         clock=lambda: clock_value[0], verbose=False)
  assert calls == ["a", "b", "a", "b", "a", "b", "a", "b"]
  assert times == {"a": [1.0, 3.0, 2.0], "b": [10.0, 30.0, 20.0]}
  assert len(times.load_before) == 3 and len(times.load_after) == 3


def test_stats_ratio_and_pairs():
  times = {"ours": [1.0, 4.0, 2.0, 1.5, 3.0], "theirs": [3.0, 8.0, 2.0, 6.0, 9.0]}
  assert interleave.stats(times["ours"]) == interleave.Stats(2.0, 1.0, 4.0, 5)
  assert interleave.stats([1.0, 2.0, 3.0, 4.0]).median == 2.5
  # median(theirs) 6 / median(ours) 2.
  assert interleave.ratio(times, "ours", "theirs") == pytest.approx(3.0)
  # Per round pair: 3, 2, 1, 4, 3.
  assert interleave.pair_ratios(times, "ours", "theirs") == pytest.approx((1.0, 4.0))
  line = interleave.ratio_line(times, "ours", "theirs")
  assert "3.00x" in line and "1.00x-4.00x" in line and "5 interleaved rounds" in line


def test_table_reports_rates_from_median_and_extremes():
  text = interleave.table({"ours": [2.0, 1.0, 4.0]}, unit="images/s", work=8)
  row = text.splitlines()[-1]
  # 8 images / 2 s median; slowest call 8/4, fastest 8/1.
  assert row == "| ours | 2.000 (1.000-4.000) | 4.00 (2.00-8.00) |"


def test_args_and_environment():
  p = argparse.ArgumentParser()
  interleave.add_args(p)
  assert p.parse_args([]).rounds == 5
  assert p.parse_args(["--repeats", "7"]).rounds == 7
  env = interleave.environment()
  assert env.startswith("# load average") and "os.cpu_count" in env and "XLA_FLAGS" in env
  times = interleave.Timings(a=[1.0])
  times.load_before, times.load_after = (1000.0, 1.0, 1.0), (2.0, 1.0, 1.0)
  env = interleave.environment(times)
  assert "before rounds 1000.00 1.00 1.00, after 2.00 1.00 1.00" in env
  assert "WARNING: 1-minute load 1000.00" in env
  times.load_before = (0.0, 0.0, 0.0)
  assert "WARNING" not in interleave.environment(times)
