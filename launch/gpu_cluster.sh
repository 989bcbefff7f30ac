#!/usr/bin/env bash
# SLURM batch script: one aligncap_jax process per GPU, on every node of the job.
#
#   sbatch --nodes=2 launch/gpu_cluster.sh --config configs/vg_t5xl.py --workdir /shared/runs/vg \
#       [--mode train] [--port 8476] [--python .venv/bin/python] [--dry-run] [-- extra main.py flags]
#
# The coordinator is the job's first node (`scontrol show hostnames
# $SLURM_JOB_NODELIST | head -n1`); every task gets `--coordinator_address`,
# `--num_processes` ($SLURM_NTASKS) and its own `--process_id` ($SLURM_PROCID), which
# main.py passes to jax.distributed.initialize(). The workdir must be on a file
# system every node sees (orbax writes from all processes). --dry-run (inside an
# allocation, e.g. `salloc`) prints the exact srun command and exits 0.
#SBATCH --job-name=aligncap
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=8
#SBATCH --time=48:00:00
#SBATCH --output=aligncap-%j.out
set -euo pipefail

config="" workdir="" mode="train" port=8476 python=".venv/bin/python" dry_run=0
extra=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --config) config="$2"; shift 2 ;;
    --workdir) workdir="$2"; shift 2 ;;
    --mode) mode="$2"; shift 2 ;;
    --port) port="$2"; shift 2 ;;
    --python) python="$2"; shift 2 ;;
    --dry-run) dry_run=1; shift ;;
    --) shift; extra=("$@"); break ;;
    *) echo "gpu_cluster.sh: unknown argument '$1'" >&2; exit 2 ;;
  esac
done
for v in config workdir; do
  if [[ -z "${!v}" ]]; then
    echo "gpu_cluster.sh: --${v} is required" >&2; exit 2
  fi
done
for v in SLURM_JOB_NODELIST SLURM_NTASKS; do
  if [[ -z "${!v:-}" ]]; then
    echo "gpu_cluster.sh: \$$v is not set; submit with sbatch (or run inside salloc)" >&2
    exit 2
  fi
done

quote() {
  local out="" a
  for a in "$@"; do
    if [[ "$a" =~ ^[A-Za-z0-9_./:=,@%+-]+$ ]]; then out+="$a "
    else out+="'${a//\'/\'\\\'\'}' "; fi
  done
  printf '%s\n' "${out% }"
}

coordinator=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)
task_cmd="exec $python -m aligncap_jax.main --config $config --workdir $workdir --mode $mode"
task_cmd+=" --coordinator_address=$coordinator:$port --num_processes=$SLURM_NTASKS"
task_cmd+=' --process_id=$SLURM_PROCID'
for a in "${extra[@]+"${extra[@]}"}"; do task_cmd+=" $a"; done
cmd=(srun --ntasks="$SLURM_NTASKS" --gpus-per-task=1 --kill-on-bad-exit=1 bash -c "$task_cmd")

echo "coordinator: $coordinator:$port, processes: $SLURM_NTASKS"
quote "${cmd[@]}"
if [[ $dry_run -eq 1 ]]; then exit 0; fi
"${cmd[@]}"
