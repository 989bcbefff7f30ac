"""Fake CPU devices (`--xla_force_host_platform_device_count`) that cannot stall.

Imports nothing heavy: call it before jax initialises its CPU backend (the first
`jax.devices()` or computation), i.e. at the top of a test conftest, a benchmark
or the entry point.

Why: XLA's CPU client sizes its thread pools max(cores, devices) (jaxlib 0.10.2),
unless `PJRT_NPROC` says otherwise. N fake devices on a machine with fewer than N
cores get exactly N threads, one per device. An N-device collective blocks one
thread per participant until all N arrive, so a single pool thread busy with
other work leaves the last participant waiting for a thread that never frees:
the run deadlocks in the rendezvous with the CPU idle. Sizing the pools well above
the device count leaves that slack.

Evidence (2026-12-02, tests/test_train_real_model.py, jaxlib 0.10.2, 2 cores, 8
fake devices, PJRT_NPROC=8): a stalled process had exactly 8 `tf_XLAEigen` threads,
every one blocked in `xla::internal::AwaitAndLogIfStuck` inside an AllGather or
AllToAll thunk: two all-gathers over device pairs {0,1} and {6,7} (op 6), two
all-to-alls over the same pairs (op 290) and four all-gathers over all 8 devices
(op 360). One device program runs independent thunks concurrently, so a device had
3 collectives in flight at once, each holding a pool thread while it waits; with
all 8 threads waiting, the partners' thunks were queued with no thread to run them.
Hence 8 threads per fake device: room for every device to hold several blocked
collectives and still run the thunks that release them.
"""
from __future__ import annotations

import os
import re

_COUNT_FLAG = "--xla_force_host_platform_device_count"
# Threads per fake device in XLA's CPU pools (PJRT_NPROC); see the module docstring.
THREADS_PER_DEVICE = 8
MIN_THREADS = 64


def requested_devices(xla_flags: str | None = None) -> int:
  """The fake CPU device count that XLA_FLAGS asks for (1 when it asks none)."""
  flags = os.environ.get("XLA_FLAGS", "") if xla_flags is None else xla_flags
  found = re.findall(_COUNT_FLAG + r"=(\d+)", flags)
  return int(found[-1]) if found else 1


def pool_size(num_devices: int) -> int:
  return max(MIN_THREADS, THREADS_PER_DEVICE * num_devices, os.cpu_count() or 1)


def ensure_thread_slack(env: dict[str, str] | None = None) -> dict[str, str]:
  """Sets PJRT_NPROC in `env` (default os.environ) when it fakes more devices than cores.

  A PJRT_NPROC the user set already is kept. Returns `env`.
  """
  env = os.environ if env is None else env
  n = requested_devices(env.get("XLA_FLAGS", ""))
  if n > 1 and "PJRT_NPROC" not in env:
    env["PJRT_NPROC"] = str(pool_size(n))
  return env


def use_fake_cpu_devices(n: int, *extra_flags: str, env: dict[str, str] | None = None
                         ) -> dict[str, str]:
  """Asks XLA for `n` fake CPU devices (plus `extra_flags`) with thread slack.

  Flags already in XLA_FLAGS win over `extra_flags` of the same name; the device
  count is replaced. Returns `env` (default os.environ), updated.
  """
  env = os.environ if env is None else env
  have = re.sub(_COUNT_FLAG + r"=\d+", "", env.get("XLA_FLAGS", "")).split()
  names = {f.split("=")[0] for f in have}
  flags = have + [f"{_COUNT_FLAG}={n}"] + [f for f in extra_flags
                                            if f.split("=")[0] not in names]
  env["XLA_FLAGS"] = " ".join(flags)
  return ensure_thread_slack(env)
