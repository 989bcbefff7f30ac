"""Test-wide setup: 8 fake CPU devices, offline hubs, absl flags parsed."""
import os

from aligncap_jax import fake_devices

# 8 fake CPU devices, with XLA's CPU thread pools sized well above 8 (PJRT_NPROC):
# at exactly one thread per device, 8-device collectives deadlocked now and then in
# their rendezvous (aligncap_jax/fake_devices.py says why). Subprocesses inherit
# both. If a collective ever waits that long again, XLA names the stuck rendezvous
# after 60 s and aborts after 300 s instead of hanging the suite.
fake_devices.use_fake_cpu_devices(
    8, "--xla_cpu_collective_call_warn_stuck_timeout_seconds=60",
    "--xla_cpu_collective_call_terminate_timeout_seconds=300",
    "--xla_cpu_collective_timeout_seconds=300")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

from absl import flags  # noqa: E402

flags.FLAGS.mark_as_parsed()


# The longest files start first: pytest-xdist (--dist loadfile) deals files to the
# workers in collection order, so a long file collected last would run alone at the
# end while the other worker idles.
_LONGEST_FIRST = ("test_train_real_model.py", "test_serve.py", "test_aligncap.py")


def pytest_collection_modifyitems(items):
  def rank(item):
    name = item.path.name
    return _LONGEST_FIRST.index(name) if name in _LONGEST_FIRST else len(_LONGEST_FIRST)
  items.sort(key=rank)   # stable: the order within and among other files is kept
