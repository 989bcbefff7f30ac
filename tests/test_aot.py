"""`--mode aot`: the train and decode steps compiled from shapes alone."""
from __future__ import annotations

import importlib.util
import math
import pathlib
import re
import sys

import jax
import numpy as np
import pytest

import aligncap_jax.models
from aligncap_jax import aot
from aligncap_jax import config as config_lib
from aligncap_jax import sharding
from aligncap_jax import train_state

ROOT = pathlib.Path(__file__).resolve().parents[1]
HAS_LIBTPU = importlib.util.find_spec("libtpu") is not None
needs_libtpu = pytest.mark.skipif(
    not HAS_LIBTPU, reason="needs the TPU compiler: pip install '.[tpu]' "
    "(or pip install 'jax[tpu]==0.10.2')")


def _config(name: str, arg: str | None = None):
  spec = importlib.util.spec_from_file_location(name, ROOT / "configs" / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


@pytest.fixture
def fake_model(monkeypatch):
  """The trainer's stand-in AlignCap (tests/fixtures_train.py) for this test only."""
  sys.path.insert(0, str(ROOT / "tests"))
  import fixtures_train
  import types
  mod = types.ModuleType("aligncap_jax.models.aligncap")
  mod.__dict__.update(vars(fixtures_train.FakeModelLib))
  monkeypatch.setitem(sys.modules, "aligncap_jax.models.aligncap", mod)
  monkeypatch.setattr(aligncap_jax.models, "aligncap", mod, raising=False)
  return mod


def _shard_bytes(tree) -> int:
  return sum(math.prod(x.sharding.shard_shape(x.shape)) * np.dtype(x.dtype).itemsize
             for x in jax.tree.leaves(tree))


def test_cpu8_table_and_peak_line(fake_model, capsys):
  config = _config("vg_t5xl", "smoke")
  config.mesh.update(data=2, fsdp=-1, tensor=1)
  config.train.per_device_batch_size = 3
  config_lib.validate(config)
  out = aot.run(config, "cpu:8", num_tags=12)
  text = capsys.readouterr().out
  lines = text.strip().splitlines()
  assert "target: cpu x 8" in lines
  assert "mesh: data=2, fsdp=4, tensor=1" in lines
  assert re.fullmatch(r"per-device peak: \d+\.\d\d GiB", lines[-1])
  for step, batch in (("train", 3 * 8), ("decode", config.train.eval_batch_size * 8)):
    m = out[step]["memory"]
    assert out[step]["batch"] == batch
    assert m["peak"] == m["argument"] + m["output"] - m["alias"] + m["temporary"]
    assert any(l.split()[:2] == [step, str(batch)] for l in lines), text
  assert out["peak_gib"] == max(out[s]["memory"]["peak"] for s in ("train", "decode")) / 2**30

  # The donated train state is aliased in full: its per-device bytes, by hand.
  model = fake_model.build_model(config, 12)
  mesh = sharding.make_mesh(config, jax.devices()[:8])
  factory = train_state.StateFactory(config, model, mesh, 12, steps=1)
  state_bytes = _shard_bytes(factory.abstract_state)
  assert out["train"]["memory"]["alias"] == state_bytes
  assert out["train"]["memory"]["argument"] >= state_bytes


def test_too_few_cpu_devices_names_the_env_var():
  with pytest.raises(ValueError, match=re.escape(
      "XLA_FLAGS='--xla_force_host_platform_device_count=64 "
      "--xla_cpu_enable_concurrency_optimized_scheduler=false'")):
    aot.target_devices("cpu:64")


def test_unknown_topology_is_named():
  with pytest.raises(ValueError, match="'tpu-v5'.*v5e:2x4"):
    aot.target_devices("tpu-v5")


@pytest.mark.slow
def test_smoke_real_model_cpu8(capsys):
  config = _config("vg_t5xl", "smoke")
  out = aot.run(config, "cpu:8")
  lines = capsys.readouterr().out.strip().splitlines()
  assert lines[-1] == f"per-device peak: {out['peak_gib']:.2f} GiB"
  assert 0 < out["train"]["memory"]["peak"] < 2**30


@pytest.mark.slow
@pytest.mark.tpu
@needs_libtpu
def test_v5e_ring_collectives_and_no_full_logits_gather(capsys):
  config = _config("vg_t5xl", "smoke")
  config.model.pairwise_form = "ring"
  config.mesh.update(data=-1, fsdp=1, tensor=1)
  config.train.per_device_batch_size = 3          # N = 24 regions, logits 24 x 24
  config_lib.validate(config)
  res = aot.compile_steps(config, "v5e:2x4", steps=("train",))
  assert res["target"] == {"device_kind": "TPU v5 lite", "count": 8,
                           "mesh": {"data": 8, "fsdp": 1, "tensor": 1}}
  hlo = res["train"]["compiled"].as_text()
  assert "collective-permute" in hlo
  gathers = [l for l in hlo.splitlines() if re.search(r"= \S+ all-gather", l)]
  full = [l for l in gathers if re.search(r"\[24,24(,|\])", l.split("all-gather")[0])]
  assert not full, full
  assert 0 < res["train"]["memory"]["peak"] < 15 * 2**30


@pytest.mark.slow
@pytest.mark.tpu
@needs_libtpu
def test_per_chip_memory_does_not_grow_from_8_to_256_chips():
  """Same per-chip batch on v5e:2x4 and v5e:16x16 (the v5e_256 mesh, ring form):
  every batch-sized intermediate is split 256 ways, so per-chip bytes stay flat.

  Regression: beam search once reordered its KV cache with a flat `take` over
  all rows, which the partitioner served by all-gathering the global cache (16x
  the temporaries at 256 chips; 132.69 GiB per chip for vg_t5xl:v5e_256).
  """
  temps = {}
  for topo, fsdp in (("v5e:2x4", 8), ("v5e:16x16", 16)):
    config = _config("vg_t5xl", "smoke")
    config.model.pairwise_form = "ring"
    config.mesh.update(data=-1, fsdp=fsdp, tensor=1)
    config.train.per_device_batch_size = 8
    config.train.eval_batch_size = 8
    config.data.tag_vocab_size = 512
    config_lib.validate(config)
    res = aot.compile_steps(config, topo)
    assert res["target"]["count"] == {"v5e:2x4": 8, "v5e:16x16": 256}[topo]
    temps[topo] = {s: res[s]["memory"]["temporary"] for s in ("train", "decode")}
  for step in ("train", "decode"):
    assert temps["v5e:16x16"][step] <= 1.1 * temps["v5e:2x4"][step], (step, temps)


@needs_libtpu
def test_tpu_compiler_settings_reach_libtpu_and_are_restored():
  """The config's compiler settings are options libtpu knows (a misspelt one fails
  the compile) and the effort levels apply only inside `compiler_effort`."""
  config = config_lib.base_config()
  config.train.tpu_windowed_einsum = False
  config.train.xla_exec_time_effort = -1.0
  config.train.xla_optimization_level = "O1"
  options = sharding.tpu_compiler_options(config)
  assert options == sharding.TPU_WINDOWED_EINSUM_OFF
  devices = aot.target_devices("v5e:2x4")
  mesh = jax.sharding.Mesh(np.asarray(devices).reshape(8), ("fsdp",))
  spec = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("fsdp", None))
  x = jax.ShapeDtypeStruct((256, 512), np.float32, sharding=spec)
  w = jax.ShapeDtypeStruct((512, 512), np.float32, sharding=spec)
  lowered = jax.jit(lambda x, w: x @ w).lower(x, w)
  with sharding.compiler_effort(config):
    assert jax.config.jax_exec_time_optimization_effort == -1.0
    assert str(jax.config.jax_optimization_level).endswith("O1")
    lowered.compile(compiler_options=options)
  assert jax.config.jax_exec_time_optimization_effort == 0.0
  with pytest.raises(Exception, match="xla_tpu_enable_windowed_einsum_for_all_gatherr"):
    lowered.compile(compiler_options={"xla_tpu_enable_windowed_einsum_for_all_gatherr": False})


def test_apply_compiler_settings_sets_flags_for_the_process(monkeypatch):
  config = config_lib.base_config()
  monkeypatch.setenv("LIBTPU_INIT_ARGS", "--xla_keep=1")
  assert sharding.apply_compiler_settings(config) == []  # defaults: nothing set
  config.train.tpu_windowed_einsum = False
  config.train.xla_exec_time_effort = -0.5
  old = jax.config.jax_exec_time_optimization_effort
  try:
    done = sharding.apply_compiler_settings(config)
    assert jax.config.jax_exec_time_optimization_effort == -0.5
  finally:
    jax.config.update("jax_exec_time_optimization_effort", old)
  import os  # pylint: disable=g-import-not-at-top
  assert os.environ["LIBTPU_INIT_ARGS"].split() == [
      "--xla_keep=1", "--xla_tpu_enable_windowed_einsum_for_all_gather=false",
      "--xla_tpu_enable_windowed_einsum_for_reduce_scatter=false"]
  assert done[0] == "jax_exec_time_optimization_effort=-0.5"
  config.train.xla_exec_time_effort = 2.0
  with pytest.raises(ValueError, match="train.xla_exec_time_effort"):
    config_lib.validate(config)
