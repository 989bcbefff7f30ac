"""Test-wide setup: 8 fake CPU devices, offline hubs, absl flags parsed."""
import os

# 8 fake CPU devices. Their collectives rendezvous between 8 threads; on a loaded
# 2-core machine one thread can lag past XLA's default termination timeout, and
# XLA then aborts the process ("Termination timeout ... exceeded"), so the tests
# allow 15 minutes.
_FLAGS = ("--xla_force_host_platform_device_count=8",
          "--xla_cpu_collective_call_warn_stuck_timeout_seconds=120",
          "--xla_cpu_collective_call_terminate_timeout_seconds=900",
          "--xla_cpu_collective_timeout_seconds=900")
_have = os.environ.get("XLA_FLAGS", "")
os.environ["XLA_FLAGS"] = " ".join(
    [_have] + [f for f in _FLAGS if f.split("=")[0] not in _have]).strip()
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

from absl import flags  # noqa: E402

flags.FLAGS.mark_as_parsed()
