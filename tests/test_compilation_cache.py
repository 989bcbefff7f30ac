"""JAX's persistent compilation cache under the workdir (config train.compilation_cache).

A restart with the same config on the same topology (a preempted run resuming)
must load every executable from <workdir>/compilation_cache instead of
compiling: the second start through the real entry point logs a cache hit for
each computation it would compile, the train step included, and writes no new
entry.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
import types

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "configs"))

import tiny  # noqa: E402

from aligncap_jax import main as main_lib  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _train(workdir, *overrides):
  # JAX_LOG_COMPILES: every compile and every persistent-cache hit is logged (WARNING).
  env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_LOG_COMPILES="1")
  env.pop("JAX_COMPILATION_CACHE_DIR", None)   # the suite's shared cache (launch/test.sh)
  cmd = [sys.executable, os.path.join(ROOT, "tests", "fixtures_train.py"),
         "--config", os.path.join(ROOT, "configs", "tiny.py"), "--workdir", str(workdir),
         "--mode", "train", "--config.train.total_steps=1",
         "--config.train.checkpoint_every_steps=1", "--config.train.eval_every_steps=-1",
         *overrides]
  proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  compiled = re.findall(r"Finished XLA compilation of jit\((\S+?)\)", proc.stderr)
  hits = re.findall(r"Persistent compilation cache hit for 'jit_(\S+?)'", proc.stderr)
  return compiled, hits


def test_second_start_loads_every_executable_from_the_workdir_cache(tmp_path):
  cache = tmp_path / main_lib.COMPILATION_CACHE_DIR
  compiled, _ = _train(tmp_path)
  entries = sorted(os.listdir(cache))
  assert entries, "the first start wrote nothing to the compilation cache"
  assert len(compiled) >= 3  # init, tag encoder, train step at least
  compiled, hits = _train(tmp_path)  # restart: resumes at the last step, compiles the step
  assert compiled and sorted(compiled) == sorted(hits), (compiled, hits)
  assert sorted(os.listdir(cache)) == entries


def _fake_jax():
  updates = {}
  return types.SimpleNamespace(config=types.SimpleNamespace(
      update=lambda k, v: updates.__setitem__(k, v))), updates


def test_cache_folder_switch_and_modes(tmp_path, monkeypatch):
  monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR", raising=False)
  config = tiny.get_config()
  jax, updates = _fake_jax()
  path = main_lib._enable_compilation_cache(jax, config, str(tmp_path / "new"), "train")
  assert path == str(tmp_path / "new" / main_lib.COMPILATION_CACHE_DIR)
  assert updates == {"jax_compilation_cache_dir": path,
                     "jax_persistent_cache_min_compile_time_secs": 0.0}
  jax, updates = _fake_jax()
  # eval/predict/serve/export on a missing workdir fail later with their own
  # message; the cache must not create the folder first.
  assert main_lib._enable_compilation_cache(jax, config, str(tmp_path / "none"), "eval") is None
  assert main_lib._enable_compilation_cache(jax, config, str(tmp_path), "eval") is not None
  assert main_lib._enable_compilation_cache(jax, config, None, "aot") is None
  config.train.compilation_cache = False
  jax, updates = _fake_jax()
  assert main_lib._enable_compilation_cache(jax, config, str(tmp_path), "train") is None
  assert not updates


def test_a_cache_folder_the_user_chose_is_kept(tmp_path, monkeypatch):
  monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", str(tmp_path / "shared"))
  jax, updates = _fake_jax()
  path = main_lib._enable_compilation_cache(jax, tiny.get_config(), str(tmp_path / "w"), "train")
  assert path == str(tmp_path / "shared") == updates["jax_compilation_cache_dir"]


def test_compilation_cache_field_is_known():
  from aligncap_jax import config as config_lib
  config = config_lib.base_config()
  assert config.train.compilation_cache is True
  config.train.compilation_cach = False
  with pytest.raises(ValueError, match="train.compilation_cache"):
    config_lib.check_fields(config)
