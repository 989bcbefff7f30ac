"""The trainer's TensorBoard scalars: written with tensorboardX, TensorFlow never imported."""
from __future__ import annotations

import glob
import json
import os
import struct
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_TRAIN = """
import sys
sys.path[:0] = [{tests!r}, {configs!r}]
import fixtures_train as ft
import tiny
from aligncap_jax import train
c = tiny.get_config()
c.train.total_steps = 3
c.train.eval_every_steps = -1
train.train_and_evaluate(c, sys.argv[1], model_lib=ft.FakeModelLib,
                         pipeline_lib=ft.FakePipelineLib)
print("tensorflow imported:", "tensorflow" in sys.modules)
"""


def _events(path: str):
  """(step, tag, value) of every scalar in a TFRecord event file."""
  from tensorboardX.proto import event_pb2
  with open(path, "rb") as f:
    data = f.read()
  out, pos = [], 0
  while pos < len(data):
    (n,) = struct.unpack("<Q", data[pos:pos + 8])
    event = event_pb2.Event()
    event.ParseFromString(data[pos + 12:pos + 12 + n])   # length, crc, data, crc
    pos += 12 + n + 4
    out.extend((event.step, v.tag, v.simple_value) for v in event.summary.value)
  return out


def test_trainer_writes_tensorboard_scalars_without_tensorflow(tmp_path):
  code = _TRAIN.format(tests=os.path.join(ROOT, "tests"), configs=os.path.join(ROOT, "configs"))
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env["XLA_FLAGS"] = " ".join(f for f in env.get("XLA_FLAGS", "").split()
                              if not f.startswith("--xla_force_host_platform_device_count"))
  proc = subprocess.run([sys.executable, "-c", code, str(tmp_path)], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "tensorflow imported: False" in proc.stdout
  files = glob.glob(str(tmp_path / "tensorboard" / "events.out.tfevents.*"))
  assert len(files) == 1, files
  scalars = {(step, tag): value for step, tag, value in _events(files[0])}
  with open(tmp_path / "train_metrics.jsonl") as f:
    lines = [json.loads(x) for x in f]
  assert [r["step"] for r in lines] == [1, 2, 3]
  for record in lines:
    for key, value in record.items():
      if key != "step":
        assert scalars[(record["step"], key)] == pytest.approx(value, rel=1e-6), key
  assert len(scalars) == sum(len(r) - 1 for r in lines)
