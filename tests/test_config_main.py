"""main.py: one-line errors with exit code 2 for bad configs, workdirs and inputs."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "configs"))

import tiny  # noqa: E402

from aligncap_jax import config as config_lib  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "configs", "tiny.py")


def _main(*args, cwd=ROOT):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  proc = subprocess.run([sys.executable, "-m", "aligncap_jax.main", *args], cwd=cwd, env=env,
                        capture_output=True, text=True, timeout=300)
  return proc.returncode, proc.stderr


def _error_line(stderr):
  lines = [x for x in stderr.splitlines() if x.startswith("error: ")]
  assert len(lines) == 1, stderr[-3000:]
  assert "Traceback" not in stderr
  return lines[0]


@pytest.mark.parametrize("args, message", [
    (["--config.train.per_device_batsh_size=2"],
     "error: unknown config field 'train.per_device_batsh_size' in "
     "--config.train.per_device_batsh_size=2 (did you mean 'train.per_device_batch_size'?)"),
    (["--config.optim.learning_rate=-0.1"],
     "error: config field 'optim.learning_rate': must be > 0, got -0.1"),
    (["--config.data.num_views=0"], "error: config field 'data.num_views': j must be >= 1, got 0"),
    (["--config.data.num_views=three"], "error: flag --config.data.num_views=three: "),
])
def test_bad_config_is_one_line_exit_2(args, message, tmp_path):
  code, err = _main("--config", TINY, "--workdir", str(tmp_path), *args)
  assert code == 2
  assert _error_line(err).startswith(message)


def test_missing_config_file_and_flag(tmp_path):
  code, err = _main("--config", "configs/nope.py", "--workdir", str(tmp_path))
  assert code == 2 and _error_line(err) == "error: --config configs/nope.py: file not found"
  code, err = _main("--workdir", str(tmp_path))
  assert code == 2 and "--config is required" in _error_line(err)


def test_modes_needing_a_checkpoint_say_so(tmp_path):
  code, err = _main("--config", TINY, "--mode", "eval", "--workdir", str(tmp_path / "none"))
  assert code == 2
  assert _error_line(err) == (f"error: --mode eval: workdir {tmp_path / 'none'} does not exist; "
                              f"train first with --mode train --workdir {tmp_path / 'none'}")
  code, err = _main("--config", TINY, "--mode", "predict", "--workdir", str(tmp_path))
  assert code == 2 and "needs --image PATH" in _error_line(err)
  code, err = _main("--config", TINY, "--mode", "train")
  assert code == 2 and _error_line(err) == "error: --mode train needs --workdir DIR"


def test_validate_rejects_impossible_values():
  cases = {
      ("optim", "learning_rate", -1.0): "optim.learning_rate",
      ("data", "num_views", 0): "data.num_views",
      ("data", "god_top_k", -1): "data.god_top_k",
      ("train", "per_device_batch_size", 0): "train.per_device_batch_size",
      ("mesh", "data", 0): "mesh.data",
      ("loss", "context_head", -0.5): "loss.context_head",
      ("model", "view_box_centred", True): "model.view_box_centred",   # needs the embedding
      ("loss", "context_head_select", "relation"): "loss.context_head_select",
      ("loss", "context_head_select", "4,99"): "loss.context_head_select",
  }
  for (group, field, value), name in cases.items():
    c = tiny.get_config()
    c[group][field] = value
    with pytest.raises(ValueError, match=f"config field '{name}'"):
      config_lib.validate(c)
  config_lib.validate(tiny.get_config())


def test_issue16_departures_are_on_in_the_synthetic_configs_only():
  """The synthetic config's two context departures (README "Architecture"):
  on in every variant of configs/synthetic.py, off in the base config and in the
  real configs, which keep the paper's path."""
  from aligncap_jax.captioner import config_from_file  # pylint: disable=g-import-not-at-top

  def load(name, arg=None):
    return config_from_file(os.path.join(ROOT, "configs", f"{name}.py") + (f":{arg}" if arg else ""))

  for arg in (None, "hard", "dot", "smoke"):
    c = load("synthetic", arg)
    assert c.model.view_box_embedding and c.loss.context_head > 0, arg
    assert c.loss.context_head_select == "weighted"
    # Object-crop context views: all but `hard`, whose ablation used union views.
    assert (c.data.context_crop, c.model.candidate_pool) == (
        ("union", "target_box") if arg == "hard" else ("object", "whole_view")), arg
    # Session 10: no self-detection, nearest first, 3 context slots (not `hard`).
    assert (c.data.context_drop_iou, c.data.context_order, c.data.num_views) == (
        (0.0, "god", 3) if arg == "hard" else (0.5, "nearest", 4)), arg
    # Session 11: the view-box embedding through a hidden layer (not `hard`).
    assert c.model.view_box_hidden == (0 if arg == "hard" else 64), arg
    # Session 12: that box measured from the view's centre (not `hard`).
    assert c.model.view_box_centred == (arg != "hard"), arg
  for c in (config_lib.base_config(), load("vg_t5xl"), load("refcocog_t5xl")):
    assert not c.model.view_box_embedding and c.loss.context_head == 0
    assert c.data.context_crop == "union" and c.model.candidate_pool == "target_box"
    assert c.data.context_drop_iou == 0.0 and c.data.context_order == "god"
    assert c.model.view_box_hidden == 0 and not c.model.view_box_centred
