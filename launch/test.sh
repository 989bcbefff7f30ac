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
# The real-model trainer tests compile the whole tiny model under several meshes;
# after the rest of the suite the interpreter has aborted inside XLA there, so they
# run in a fresh process of their own.
isolated=tests/test_train_real_model.py
set +e
.venv/bin/python -m pytest tests -q -p no:cacheprovider --ignore="$isolated" "$@"
rc=$?
set -e
if [[ $rc -eq 5 ]]; then
  echo "[test.sh] ERROR: pytest collected no tests; this is a broken run." >&2
  exit 1
fi
set +e
.venv/bin/python -m pytest "$isolated" -q -p no:cacheprovider "$@"
rc2=$?
set -e
if [[ $rc -ne 0 ]]; then exit $rc; fi
if [[ $rc2 -eq 5 ]]; then exit 0; fi
exit $rc2
