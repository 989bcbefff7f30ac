#!/usr/bin/env bash
# The default run on a fresh machine: venv + pinned install, synthetic dataset
# (TFDS), AlignCap training with configs/synthetic.py, evaluation, metrics table.
#   bash launch/run_local.sh [--dry-run] [WORKDIR] [extra --config.x=y flags...]
set -euo pipefail
cd "$(dirname "$0")/.."
dry=0
if [[ "${1:-}" == "--dry-run" ]]; then dry=1; shift; fi
workdir=${1:-workdirs/synthetic}
shift || true
config=configs/synthetic.py
train_cmd=(.venv/bin/python -m aligncap_jax.main --config "$config" --workdir "$workdir" --mode train "$@")
eval_cmd=(.venv/bin/python -m aligncap_jax.main --config "$config" --workdir "$workdir" --mode eval "$@")
echo "[run_local] ${train_cmd[*]}"
echo "[run_local] ${eval_cmd[*]}"
if [[ $dry -eq 1 ]]; then exit 0; fi
if [[ ! -x .venv/bin/python ]]; then
  echo "[run_local] creating .venv"
  python3 -m venv .venv
fi
if ! .venv/bin/python -c "import aligncap_jax" 2>/dev/null; then
  echo "[run_local] installing aligncap_jax (pinned versions, requirements.lock)"
  .venv/bin/pip install -q --upgrade pip
  .venv/bin/pip install -q -e .
fi
export HF_HUB_OFFLINE=1 TF_CPP_MIN_LOG_LEVEL=3 PYTHONUNBUFFERED=1
start=$(date +%s)
"${train_cmd[@]}"
"${eval_cmd[@]}"
echo "[run_local] total wall time: $(( $(date +%s) - start )) s"
