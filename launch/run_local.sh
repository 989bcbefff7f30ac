#!/usr/bin/env bash
# The default run on a fresh machine: venv + pinned install, synthetic dataset
# (TFDS), AlignCap training with configs/synthetic.py, evaluation, metrics table.
#   bash launch/run_local.sh [--dry-run] [--smoke] [WORKDIR] [extra --config.x=y flags...]
# --smoke: the same commands on configs/synthetic.py:smoke (20 steps, 20 eval
# regions), default workdir workdirs/synthetic_smoke; CI runs it in a fresh clone.
set -euo pipefail
cd "$(dirname "$0")/.."
dry=0
config=configs/synthetic.py
default_workdir=workdirs/synthetic
while [[ $# -gt 0 ]]; do
  case "$1" in
    --dry-run) dry=1; shift ;;
    --smoke) config=configs/synthetic.py:smoke; default_workdir=workdirs/synthetic_smoke; shift ;;
    *) break ;;
  esac
done
workdir=$default_workdir
if [[ $# -gt 0 && "$1" != --* ]]; then workdir=$1; shift; fi
train_cmd=(.venv/bin/python -m aligncap_jax.main --config "$config" --workdir "$workdir" --mode train "$@")
eval_cmd=(.venv/bin/python -m aligncap_jax.main --config "$config" --workdir "$workdir" --mode eval "$@")
echo "[run_local] ${train_cmd[*]}"
echo "[run_local] ${eval_cmd[*]}"
if [[ $dry -eq 1 ]]; then exit 0; fi
if [[ ! -x .venv/bin/python ]]; then
  echo "[run_local] creating .venv"
  python3 -m venv .venv
fi
# Install stamp (as launch/test.sh): `import aligncap_jax` proves nothing here, since
# run from the repo root it finds the source folder with no dependency installed.
# launch/test.sh's stamp also counts (it installs the same package plus test extras).
stamp=.venv/.aligncap_installed
test_stamp=.venv/.aligncap_test_installed
fresh() { [[ -f $1 && ! setup.py -nt $1 && ! requirements.lock -nt $1 ]]; }
if ! fresh "$stamp" && ! fresh "$test_stamp"; then
  echo "[run_local] installing aligncap_jax (pinned versions, requirements.lock)"
  .venv/bin/pip install -q --upgrade pip
  .venv/bin/pip install -q -e .
  touch "$stamp"
fi
export HF_HUB_OFFLINE=1 TF_CPP_MIN_LOG_LEVEL=3 PYTHONUNBUFFERED=1
start=$(date +%s)
"${train_cmd[@]}"
"${eval_cmd[@]}"
echo "[run_local] total wall time: $(( $(date +%s) - start )) s"
