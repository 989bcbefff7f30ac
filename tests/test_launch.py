"""Dry runs of the launch scripts print exactly the commands they would run."""
from __future__ import annotations

import os
import pathlib
import subprocess

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _run(script, args, env=None):
  return subprocess.run(["bash", str(ROOT / "launch" / script), *args],
                        capture_output=True, text=True, env=env, cwd=ROOT)


def test_tpu_vm_dry_run_prints_create_setup_and_run_on_all_workers():
  res = _run("tpu_vm.sh", ["--name", "ac-v5e", "--zone", "us-west4-a",
                           "--workdir", "gs://bkt/runs/vg", "--config",
                           "configs/vg_t5xl.py:v5e_8", "--create", "--dry-run",
                           "--", "--config.data.data_dir=gs://bkt/tfds"])
  assert res.returncode == 0, res.stderr
  assert res.stdout.splitlines() == [
      "gcloud compute tpus tpu-vm create ac-v5e --zone us-west4-a "
      "--accelerator-type v5litepod-8 --version v2-alpha-tpuv5-lite",
      "git archive --format=tar.gz -o /tmp/aligncap_jax_ac-v5e.tar.gz HEAD",
      "gcloud compute tpus tpu-vm scp /tmp/aligncap_jax_ac-v5e.tar.gz "
      "'ac-v5e:~/aligncap_jax.tar.gz' --zone us-west4-a --worker=all",
      "gcloud compute tpus tpu-vm ssh ac-v5e --zone us-west4-a --worker=all --command "
      "'mkdir -p ~/aligncap_jax && tar -xzf ~/aligncap_jax.tar.gz -C ~/aligncap_jax && "
      "cd ~/aligncap_jax && python3 -m venv .venv && .venv/bin/pip install -q -e .[tpu]'",
      "gcloud compute tpus tpu-vm ssh ac-v5e --zone us-west4-a --worker=all --command "
      "'cd ~/aligncap_jax && ALIGNCAP_DISTRIBUTED=1 .venv/bin/python -m aligncap_jax.main "
      "--config configs/vg_t5xl.py:v5e_8 --workdir gs://bkt/runs/vg --mode train "
      "--config.data.data_dir=gs://bkt/tfds'",
  ]


def test_tpu_vm_skip_setup_runs_only_the_job():
  res = _run("tpu_vm.sh", ["--name", "n", "--zone", "z", "--workdir", "gs://b/w",
                           "--config", "configs/vg_t5xl.py", "--mode", "eval",
                           "--skip-setup", "--dry-run"])
  assert res.returncode == 0, res.stderr
  assert res.stdout.splitlines() == [
      "gcloud compute tpus tpu-vm ssh n --zone z --worker=all --command "
      "'cd ~/aligncap_jax && ALIGNCAP_DISTRIBUTED=1 .venv/bin/python -m aligncap_jax.main "
      "--config configs/vg_t5xl.py --workdir gs://b/w --mode eval'"]


@pytest.mark.parametrize("args,message", [
    (["--zone", "z", "--workdir", "gs://b/w", "--config", "c.py"], "--name is required"),
    (["--name", "n", "--zone", "z", "--workdir", "/local", "--config", "c.py"],
     "must be a GCS path"),
    (["--name", "n", "--bogus"], "unknown argument '--bogus'"),
])
def test_tpu_vm_bad_arguments_are_named(args, message):
  res = _run("tpu_vm.sh", args + ["--dry-run"])
  assert res.returncode == 2
  assert message in res.stderr


def _slurm_env(tmp_path):
  fake = tmp_path / "bin"
  fake.mkdir()
  scontrol = fake / "scontrol"
  # Answers `scontrol show hostnames LIST` like SLURM does: one host per line.
  scontrol.write_text('#!/bin/sh\n[ "$1 $2 $3" = "show hostnames gpu-[3-4]" ] || exit 9\n'
                      'printf "gpu-3\\ngpu-4\\n"\n')
  scontrol.chmod(0o755)
  env = dict(os.environ, PATH=f"{fake}:{os.environ['PATH']}",
             SLURM_JOB_NODELIST="gpu-[3-4]", SLURM_NTASKS="16")
  return env


def test_gpu_cluster_dry_run_one_process_per_gpu_first_node_coordinates(tmp_path):
  res = _run("gpu_cluster.sh", ["--config", "configs/vg_t5xl.py", "--workdir",
                                "/shared/runs/vg", "--dry-run", "--",
                                "--config.train.total_steps=10"],
             env=_slurm_env(tmp_path))
  assert res.returncode == 0, res.stderr
  assert res.stdout.splitlines() == [
      "coordinator: gpu-3:8476, processes: 16",
      "srun --ntasks=16 --gpus-per-task=1 --kill-on-bad-exit=1 bash -c "
      "'exec .venv/bin/python -m aligncap_jax.main --config configs/vg_t5xl.py "
      "--workdir /shared/runs/vg --mode train --coordinator_address=gpu-3:8476 "
      "--num_processes=16 --process_id=$SLURM_PROCID --config.train.total_steps=10'",
  ]


def test_gpu_cluster_outside_slurm_says_how_to_submit(tmp_path):
  env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
  res = _run("gpu_cluster.sh", ["--config", "c.py", "--workdir", "/w", "--dry-run"], env=env)
  assert res.returncode == 2
  assert "SLURM_JOB_NODELIST is not set; submit with sbatch" in res.stderr


def test_scripts_are_strict_bash():
  for name in ("tpu_vm.sh", "gpu_cluster.sh"):
    text = (ROOT / "launch" / name).read_text()
    assert text.startswith("#!/usr/bin/env bash\n")
    assert "\nset -euo pipefail\n" in text


def test_run_local_dry_run_default_and_smoke():
  res = _run("run_local.sh", ["--dry-run"])
  assert res.returncode == 0, res.stderr
  assert res.stdout.splitlines() == [
      "[run_local] .venv/bin/python -m aligncap_jax.main --config configs/synthetic.py "
      "--workdir workdirs/synthetic --mode train",
      "[run_local] .venv/bin/python -m aligncap_jax.main --config configs/synthetic.py "
      "--workdir workdirs/synthetic --mode eval"]
  res = _run("run_local.sh", ["--smoke", "--dry-run", "wd", "--config.seed=3"])
  assert res.returncode == 0, res.stderr
  assert res.stdout.splitlines() == [
      "[run_local] .venv/bin/python -m aligncap_jax.main --config configs/synthetic.py:smoke "
      "--workdir wd --mode train --config.seed=3",
      "[run_local] .venv/bin/python -m aligncap_jax.main --config configs/synthetic.py:smoke "
      "--workdir wd --mode eval --config.seed=3"]
