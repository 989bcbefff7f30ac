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
export HF_HUB_OFFLINE=1 TF_CPP_MIN_LOG_LEVEL=3 PYTHONUNBUFFERED=1
# The real-model trainer tests (the whole tiny model on 1 and 8 fake devices) stall
# now and then in an XLA CPU collective rendezvous (open issue; XLA aborts after
# 300 s, see tests/conftest.py), so they run apart from the suite and only on request.
isolated=tests/test_train_real_model.py
# Most tests are bound by single-threaded XLA compiles: one pytest-xdist worker per
# core, whole files per worker (module fixtures compile once). ALIGNCAP_TEST_WORKERS=0
# runs in this process.
workers=${ALIGNCAP_TEST_WORKERS:-$(nproc 2>/dev/null || echo 2)}
xdist=()
if [[ $workers -gt 4 ]]; then workers=4; fi   # memory: each worker compiles its own models
if [[ $workers -gt 1 ]]; then xdist=(-n "$workers" --dist loadfile); fi
set +e
.venv/bin/python -m pytest tests -q -p no:cacheprovider --durations=15 "${xdist[@]}" \
  --ignore="$isolated" "$@"
rc=$?
set -e
if [[ $rc -eq 5 ]]; then
  echo "[test.sh] ERROR: pytest collected no tests; this is a broken run." >&2
  exit 1
fi
# With ALIGNCAP_TEST_REAL_MODEL=1: each test in a fresh process; an aborted test
# (exit 134) is run once more.
set +e
rc2=0
isolated_ids=()
if [[ "${ALIGNCAP_TEST_REAL_MODEL:-0}" == "1" ]]; then
  mapfile -t isolated_ids < <(.venv/bin/python -m pytest "$isolated" --collect-only -q \
                               -p no:cacheprovider "$@" 2>/dev/null | grep "::")
else
  # Off by default until the stall is fixed: it also hit a test alone in a fresh
  # process, so CI cannot rely on it. ALIGNCAP_TEST_REAL_MODEL=1 runs them.
  echo "[test.sh] WARNING: skipping $isolated (open XLA CPU rendezvous stall);" \
       "ALIGNCAP_TEST_REAL_MODEL=1 runs it" >&2
fi
if [[ ${#isolated_ids[@]} -eq 0 && $# -eq 0 && "${ALIGNCAP_TEST_REAL_MODEL:-0}" == "1" ]]; then
  echo "[test.sh] ERROR: collected no tests from $isolated" >&2
  rc2=1
fi
for id in "${isolated_ids[@]}"; do
  .venv/bin/python -m pytest "$id" -q -p no:cacheprovider -s
  r=$?
  if [[ $r -eq 134 ]]; then
    echo "[test.sh] WARNING: $id aborted inside XLA (exit 134, collective rendezvous" \
         "stall on fake CPU devices); running it once more" >&2
    .venv/bin/python -m pytest "$id" -q -p no:cacheprovider -s
    r=$?
  fi
  if [[ $r -ne 0 && $r -ne 5 ]]; then rc2=$r; fi
done
set -e
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
if [[ $rc2 -ne 0 && $rc2 -ne 5 ]]; then exit $rc2; fi
exit $rc3
