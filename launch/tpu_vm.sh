#!/usr/bin/env bash
# Runs aligncap_jax on every worker of a Cloud TPU VM slice.
#
#   bash launch/tpu_vm.sh --name NAME --zone ZONE --workdir gs://BUCKET/runs/vg \
#       --config configs/vg_t5xl.py:v5e_8 [--create --accelerator v5litepod-8] \
#       [--version v2-alpha-tpuv5-lite] [--mode train] [--skip-setup] [--dry-run] \
#       [-- extra main.py flags, e.g. --config.data.data_dir=gs://BUCKET/tfds]
#
# Steps (each printed before it runs; --dry-run prints them all and exits 0):
#   1. create the slice (only with --create);
#   2. setup: pack the current checkout (git archive HEAD), copy it to every worker,
#      and install it with the TPU extra into ~/aligncap_jax/.venv;
#   3. run `ALIGNCAP_DISTRIBUTED=1 python -m aligncap_jax.main` on every worker at once
#      (jax.distributed.initialize() finds the slice's workers by itself).
# The workdir must be a GCS path (gs://...): every worker writes its checkpoint
# shards there through orbax, and eval/export read it back.
set -euo pipefail
cd "$(dirname "$0")/.."

name="" zone="" workdir="" config="" accelerator="v5litepod-8"
version="v2-alpha-tpuv5-lite" mode="train" create=0 setup=1 dry_run=0
extra=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --name) name="$2"; shift 2 ;;
    --zone) zone="$2"; shift 2 ;;
    --workdir) workdir="$2"; shift 2 ;;
    --config) config="$2"; shift 2 ;;
    --accelerator) accelerator="$2"; shift 2 ;;
    --version) version="$2"; shift 2 ;;
    --mode) mode="$2"; shift 2 ;;
    --create) create=1; shift ;;
    --skip-setup) setup=0; shift ;;
    --dry-run) dry_run=1; shift ;;
    --) shift; extra=("$@"); break ;;
    *) echo "tpu_vm.sh: unknown argument '$1'" >&2; exit 2 ;;
  esac
done
for v in name zone workdir config; do
  if [[ -z "${!v}" ]]; then
    echo "tpu_vm.sh: --${v} is required" >&2; exit 2
  fi
done
if [[ "$workdir" != gs://* ]]; then
  echo "tpu_vm.sh: --workdir must be a GCS path (gs://...), got '$workdir'" >&2; exit 2
fi

# Prints a command with shell quoting only where needed, then runs it (not in --dry-run).
quote() {
  local out="" a
  for a in "$@"; do
    if [[ "$a" =~ ^[A-Za-z0-9_./:=,@%+-]+$ ]]; then out+="$a "
    else out+="'${a//\'/\'\\\'\'}' "; fi
  done
  printf '%s\n' "${out% }"
}
run() {
  quote "$@"
  if [[ $dry_run -eq 0 ]]; then "$@"; fi
}

remote_dir="~/aligncap_jax"
tarball="/tmp/aligncap_jax_${name}.tar.gz"
main_cmd="cd $remote_dir && ALIGNCAP_DISTRIBUTED=1 .venv/bin/python -m aligncap_jax.main --config $config --workdir $workdir --mode $mode"
for a in "${extra[@]+"${extra[@]}"}"; do main_cmd+=" $a"; done

if [[ $create -eq 1 ]]; then
  run gcloud compute tpus tpu-vm create "$name" --zone "$zone" \
      --accelerator-type "$accelerator" --version "$version"
fi
if [[ $setup -eq 1 ]]; then
  run git archive --format=tar.gz -o "$tarball" HEAD
  run gcloud compute tpus tpu-vm scp "$tarball" "$name:~/aligncap_jax.tar.gz" \
      --zone "$zone" --worker=all
  run gcloud compute tpus tpu-vm ssh "$name" --zone "$zone" --worker=all --command \
      "mkdir -p $remote_dir && tar -xzf ~/aligncap_jax.tar.gz -C $remote_dir && cd $remote_dir && python3 -m venv .venv && .venv/bin/pip install -q -e .[tpu]"
fi
run gcloud compute tpus tpu-vm ssh "$name" --zone "$zone" --worker=all --command "$main_cmd"
