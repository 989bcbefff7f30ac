"""Multi-host path: 2 CPU processes (gloo) train like 1 process with 2 devices.

Each process runs `python -m aligncap_jax.main --mode train` (through the
trainer's stand-in model and pipeline, `tests/fixtures_train.py`, so the test
exercises the distributed runtime, per-process data shards, sharded global
batches and orbax writes from both processes, not the model's speed) with one
CPU device and `--coordinator_address/--num_processes/--process_id`.
"""
from __future__ import annotations

import json
import os
import pathlib
import socket
import subprocess
import sys

import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
STEPS = 3
OVERRIDES = [f"--config.train.total_steps={STEPS}", "--config.train.log_every_steps=1",
             "--config.train.checkpoint_every_steps=3", "--config.train.per_device_batch_size=2",
             "--config.train.eval_max_examples=2", "--config.train.eval_batch_size=2"]


def _env(devices: int) -> dict[str, str]:
  env = dict(os.environ)
  env.update(XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
             JAX_PLATFORMS="cpu", JAX_CPU_COLLECTIVES_IMPLEMENTATION="gloo",
             HF_HUB_OFFLINE="1", TF_CPP_MIN_LOG_LEVEL="3", PYTHONPATH=str(ROOT))
  env.pop("ALIGNCAP_DISTRIBUTED", None)
  return env


def _cmd(workdir, *extra):
  return [sys.executable, str(ROOT / "tests" / "fixtures_train.py"),
          "--config", str(ROOT / "configs" / "synthetic.py:smoke"), "--workdir", str(workdir),
          "--mode", "train", *OVERRIDES, *extra]


def _losses(workdir) -> np.ndarray:
  lines = (pathlib.Path(workdir) / "train_metrics.jsonl").read_text().splitlines()
  rows = [json.loads(l) for l in lines]
  assert [r["step"] for r in rows] == list(range(1, STEPS + 1)), rows
  return np.asarray([r["loss"] for r in rows])


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_match_one_process_with_two_devices(tmp_path):
  single = tmp_path / "single"
  res = subprocess.run(_cmd(single), env=_env(2), cwd=ROOT, capture_output=True, text=True,
                       timeout=300)
  assert res.returncode == 0, res.stderr[-3000:]

  multi = tmp_path / "multi"
  port = _free_port()
  procs = [subprocess.Popen(
      _cmd(multi, f"--coordinator_address=localhost:{port}", "--num_processes=2",
           f"--process_id={i}"),
      env=_env(1), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
           for i in range(2)]
  outs = []
  for p in procs:
    try:
      outs.append(p.communicate(timeout=300))
    except subprocess.TimeoutExpired:
      for q in procs:
        q.kill()
      raise
  for i, (p, (_, err)) in enumerate(zip(procs, outs)):
    assert p.returncode == 0, f"process {i} failed:\n{err[-3000:]}"

  np.testing.assert_allclose(_losses(multi), _losses(single), rtol=1e-6)
  # Both processes wrote their part of the final checkpoint.
  assert (multi / "checkpoints" / str(STEPS) / "state").is_dir()
