"""Fake CPU devices come with thread slack in XLA's CPU pools (PJRT_NPROC)."""
from __future__ import annotations

import os
import subprocess
import sys

from aligncap_jax import fake_devices

_PROBE = r"""
import collections, os
from aligncap_jax import fake_devices
fake_devices.use_fake_cpu_devices(8)
import jax, jax.numpy as jnp
x = jax.pmap(lambda v: jax.lax.psum(v, "i"), axis_name="i")(jnp.arange(8.0))
assert float(x[0]) == 28.0
names = collections.Counter()
for tid in os.listdir("/proc/self/task"):
  with open(f"/proc/self/task/{tid}/comm") as f:
    names[f.read().strip()] += 1
print(os.environ["PJRT_NPROC"], names.get("tf_XLAEigen", 0), len(jax.devices()))
"""


def test_flags_and_pool_size():
  assert fake_devices.requested_devices("--a=1 --xla_force_host_platform_device_count=8") == 8
  assert fake_devices.requested_devices("") == 1
  env = {"XLA_FLAGS": "--xla_cpu_x=1 --xla_force_host_platform_device_count=2"}
  fake_devices.use_fake_cpu_devices(8, "--xla_cpu_x=2", "--xla_cpu_y=3", env=env)
  assert env["XLA_FLAGS"].split() == ["--xla_cpu_x=1", "--xla_force_host_platform_device_count=8",
                                      "--xla_cpu_y=3"]
  assert int(env["PJRT_NPROC"]) >= 8 * 8
  # A value the user chose is kept; one device needs no slack.
  env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=8", "PJRT_NPROC": "12"}
  assert fake_devices.ensure_thread_slack(env)["PJRT_NPROC"] == "12"
  assert "PJRT_NPROC" not in fake_devices.ensure_thread_slack({"XLA_FLAGS": ""})


def test_xla_cpu_pools_get_the_slack():
  """The running client honours it: with 8 fake devices, the intra-op pool has
  pool_size(8) threads, not one per device (jaxlib 0.10.2 reads PJRT_NPROC)."""
  env = {k: v for k, v in os.environ.items() if k not in ("PJRT_NPROC", "XLA_FLAGS")}
  out = subprocess.run([sys.executable, "-c", _PROBE], env=env, capture_output=True,
                       text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  nproc, eigen, devices = (int(v) for v in out.stdout.split())
  assert devices == 8
  assert nproc == fake_devices.pool_size(8)
  assert eigen >= nproc, f"{eigen} XLA Eigen threads for PJRT_NPROC={nproc}"
