"""benchmarks/ablation.py: the --quick grid's machinery (not its numbers), and the table."""
from __future__ import annotations

import importlib.util
import json
import os
import pathlib
import re
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _ablation():
  spec = importlib.util.spec_from_file_location("ablation", ROOT / "benchmarks" / "ablation.py")
  mod = importlib.util.module_from_spec(spec)
  sys.modules["ablation"] = mod   # dataclasses look their module up
  spec.loader.exec_module(mod)
  return mod


def test_table_is_mean_and_sample_std_over_seeds(tmp_path):
  ab = _ablation()
  table_rows = [r for r in ab.rows(1.0) if r.name in ("full", "no_god")]
  records = [{"row": "full", "seed": k, "metrics": {"CIDEr": c, "attr_relation": a}, "curve": []}
             for k, (c, a) in enumerate([(100.0, 0.5), (110.0, 0.7), (120.0, 0.6)])]
  records.append({"row": "no_god", "seed": 0, "metrics": {"CIDEr": 90.0}, "curve": []})
  summary = ab.summarise(records, table_rows)
  assert summary["full"]["CIDEr"] == (110.0, 10.0, 3)
  assert summary["full"]["attr_relation"][:2] == pytest.approx((0.6, 0.1))
  assert summary["no_god"]["CIDEr"] == (90.0, 0.0, 1)
  text = ab.write_report(str(tmp_path / "t.md"), records, table_rows, "header")
  assert "| full | 3 | 110.00 ± 10.00 | 0.600 ± 0.100 | reference" in text
  assert "| no_god | 1 | 90.00 ± 0.00 | - | full > row" in text
  assert (tmp_path / "t.png").stat().st_size > 0
  assert json.loads((tmp_path / "t.json").read_text())["summary"]["full"]["CIDEr"]["std"] == 10.0


def _run(args, env):
  res = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "ablation.py"), *args],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
  assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
  return res.stdout


def test_quick_grid_writes_its_outputs_and_a_rerun_skips_finished_runs(tmp_path):
  env = dict(os.environ, TFDS_DATA_DIR=str(tmp_path / "tfds_env"))
  # The runs are single-device programs: drop the suite's fake devices.
  env["XLA_FLAGS"] = re.sub(r"--xla_force_host_platform_device_count=\d+", "",
                            env.get("XLA_FLAGS", ""))
  env.pop("PJRT_NPROC", None)
  work, results = tmp_path / "grid", tmp_path / "results" / "ablation.md"
  # Two runs at a time: no_god trains beside full while vcd waits for full's checkpoint.
  out = _run(["--quick", "--jobs", "2", "--rows", "full,no_god,vcd", "--workdir", str(work),
              "--results", str(results)], env)
  assert re.search(r"\[1/3\] full seed0: done in .*elapsed .*estimated .* left", out), out
  assert re.search(r"\[2/3\] no_god seed0: done in ", out), out
  assert re.search(r"\[3/3\] vcd seed0: done in ", out), out
  assert out.index("[1/3] full seed0: done in") < out.index("[3/3] vcd seed0: running in"), out
  assert (work / "tfds" / "synthetic_regions").is_dir()       # its own small dataset
  assert not (tmp_path / "tfds_env").exists()

  table = results.read_text()
  for row in ("full", "no_god", "vcd"):
    line = next(l for l in table.splitlines() if l.startswith(f"| {row} | 1 |"))
    assert line.count(" ± ") == 10, line                      # 4 caption metrics + 6 attributes
  assert "full > row: GOD" in table
  assert results.with_suffix(".png").stat().st_size > 0
  runs = json.loads(results.with_suffix(".json").read_text())["runs"]
  assert [r["row"] for r in runs] == ["full", "no_god", "vcd"]
  for r in runs:
    assert {"CIDEr", "attr_relation", "attr_neighbour", "exact_match"} <= set(r["metrics"])
    # The validation curve: steps 2 and 4, with the attribute accuracies.
    assert [p["step"] for p in r["curve"]] == [2, 4]
    assert all("attr_relation" in p for p in r["curve"])
  no_god = next(r for r in runs if r["row"] == "no_god")
  assert "data.context_views=False" in no_god["overrides"]
  assert not (work / "vcd" / "seed0" / "train.log").exists()
  vcd = next(r for r in runs if r["row"] == "vcd")
  assert "decode.contrastive_alpha=1" in vcd["overrides"]

  # Second invocation: every run is finished and skipped, the table rewritten.
  marks = {row: (work / row / "seed0" / "run.json").stat().st_mtime_ns
           for row in ("full", "no_god", "vcd")}
  results.unlink()
  out = _run(["--quick", "--workdir", str(work), "--results", str(results),
              "--rows", "full,no_god,vcd"], env)
  for k, row in enumerate(("full", "no_god", "vcd"), 1):
    assert f"[{k}/3] {row} seed0: finished before, skipped" in out, out
  assert marks == {row: (work / row / "seed0" / "run.json").stat().st_mtime_ns
                   for row in ("full", "no_god", "vcd")}
  assert "| vcd | 1 |" in results.read_text()
