#!/usr/bin/env bash
# Creates/updates .venv/ with the test extras and runs the test suite.
#   bash launch/test.sh [pytest args...]
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ "${1:-}" == "--dry-run" ]]; then
  echo "python3 -m venv .venv && .venv/bin/pip install -e .[test,tpu] && .venv/bin/python -m pytest tests"
  exit 0
fi
if [[ ! -x .venv/bin/python ]]; then
  echo "[test.sh] creating .venv"
  python3 -m venv .venv
fi
stamp=.venv/.aligncap_test_installed
if [[ ! -f $stamp || setup.py -nt $stamp || requirements.lock -nt $stamp ]]; then
  echo "[test.sh] installing aligncap_jax with test extras (pinned, see requirements.lock)"
  .venv/bin/pip install -q --upgrade pip
  .venv/bin/pip install -q -e ".[test,tpu]"
  touch "$stamp"
fi
# The browser test (tests/test_serve.py) drives Debian's chromium through Playwright,
# never a downloaded browser; install it when missing (the test fails without it).
if ! command -v chromium >/dev/null 2>&1; then
  echo "[test.sh] installing chromium (apt-get) for the browser test"
  if ! { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; } \
      >/tmp/aligncap_chromium_install.log 2>&1; then
    echo "[test.sh] WARNING: could not install chromium (see /tmp/aligncap_chromium_install.log);" \
         "the browser test will fail" >&2
  fi
fi
export HF_HUB_OFFLINE=1 TF_CPP_MIN_LOG_LEVEL=3 PYTHONUNBUFFERED=1
# Most tests are bound by single-threaded XLA compiles: one pytest-xdist worker per
# core, whole files per worker (module fixtures compile once). ALIGNCAP_TEST_WORKERS=0
# runs in this process. tests/conftest.py gives every process 8 fake CPU devices
# with thread slack in XLA's pools (aligncap_jax/fake_devices.py).
workers=${ALIGNCAP_TEST_WORKERS:-$(nproc 2>/dev/null || echo 2)}
xdist=()
if [[ $workers -gt 4 ]]; then workers=4; fi   # memory: each worker compiles its own models
if [[ $workers -gt 1 ]]; then xdist=(-n "$workers" --dist loadfile); fi
# One persistent compilation cache for this run, shared by the xdist workers and every
# subprocess the tests start (main keeps a JAX_COMPILATION_CACHE_DIR it is given): the
# tiny models are compiled once per run, not once per process. Every compile is
# cached (JAX skips those under 1 s by default, i.e. most CPU compiles).
if [[ -z "${JAX_COMPILATION_CACHE_DIR:-}" ]]; then
  JAX_COMPILATION_CACHE_DIR=$(mktemp -d -t aligncap_test_jax_cache.XXXXXX)
  trap 'rm -rf "$JAX_COMPILATION_CACHE_DIR"' EXIT
fi
export JAX_COMPILATION_CACHE_DIR JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=0
set +e
.venv/bin/python -m pytest tests -q -p no:cacheprovider --durations=15 "${xdist[@]}" "$@"
rc=$?
set -e
if [[ $rc -eq 5 ]]; then
  echo "[test.sh] ERROR: pytest collected no tests; this is a broken run." >&2
  exit 1
fi
# The Apache Beam path of the GOD job needs its own venv (beam pins protobuf < 7).
# ALIGNCAP_TEST_BEAM=0 skips it.
rc3=0
if [[ "${ALIGNCAP_TEST_BEAM:-1}" == "1" && $# -eq 0 ]]; then
  beam_stamp=.venv-beam/.aligncap_beam_installed
  if [[ ! -x .venv-beam/bin/python ]]; then
    echo "[test.sh] creating .venv-beam (GOD job through Apache Beam)"
    python3 -m venv .venv-beam
  fi
  if [[ ! -f $beam_stamp || setup.py -nt $beam_stamp || requirements.lock -nt $beam_stamp ]]; then
    .venv-beam/bin/pip install -q --upgrade pip
    .venv-beam/bin/pip install -q -e ".[beam]" "pytest==9.2.0"
    touch "$beam_stamp"
  fi
  set +e
  ALIGNCAP_REQUIRE_BEAM=1 .venv-beam/bin/python -m pytest tests/test_god_tfds.py -q -p no:cacheprovider -k beam
  rc3=$?
  set -e
fi
if [[ $rc -ne 0 ]]; then exit $rc; fi
exit $rc3
