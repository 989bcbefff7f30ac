"""Hugging Face export: safetensors sharding, config round trip, and a trained
tiny model that re-imports to identical captions on the test split."""
from __future__ import annotations

import importlib.util
import json
import os
import pathlib

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from aligncap_jax import config as config_lib
from aligncap_jax import hf_export
from aligncap_jax.hf_export import safetensors_io
from aligncap_jax.models.hf_import import common

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _config(name: str, arg: str | None = None):
  spec = importlib.util.spec_from_file_location(name, ROOT / "configs" / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


def _params():
  rng = np.random.default_rng(0)
  return {"vision": {"layer_0": {"kernel": rng.normal(size=(6, 5)).astype(ml_dtypes.bfloat16),
                                 "bias": rng.normal(size=(5,)).astype(np.float32)}},
          "qformer": {"query_tokens": rng.normal(size=(1, 4, 8)).astype(np.float32),
                      "dense": {"kernel": rng.normal(size=(8, 8)).astype(np.float32)}},
          "prompt_vector": rng.normal(size=(8,)).astype(np.float32)}


def _assert_same_tree(a, b):
  fa, fb = safetensors_io.flat_names(a), safetensors_io.flat_names(b)
  assert sorted(fa) == sorted(fb)
  for k in fa:
    x, y = np.asarray(fa[k]), np.asarray(fb[k])
    assert x.dtype == y.dtype, k
    np.testing.assert_array_equal(x.astype(np.float32), y.astype(np.float32), err_msg=k)


def test_single_file_round_trip_keeps_dtypes(tmp_path):
  files = safetensors_io.save_params(_params(), str(tmp_path))
  assert files == ["model.safetensors"]
  _assert_same_tree(safetensors_io.load_params(str(tmp_path)), _params())


def test_sharded_above_limit_with_hf_index(tmp_path):
  params = _params()
  files = safetensors_io.save_params(params, str(tmp_path), max_shard_bytes=300)
  shards = [f for f in files if f.endswith(".safetensors")]
  n = len(shards)
  assert n >= 2 and files[-1] == "model.safetensors.index.json"
  assert shards == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
  index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
  sizes = {k: np.asarray(v).nbytes for k, v in safetensors_io.flat_names(params).items()}
  assert index["metadata"]["total_size"] == sum(sizes.values())
  assert sorted(index["weight_map"]) == sorted(sizes)
  assert not (tmp_path / "model.safetensors").exists()
  # The importer shared with the public checkpoints reads the sharded folder too.
  folder = common.SafetensorsFolder(str(tmp_path))
  np.testing.assert_array_equal(folder.get("prompt_vector"), params["prompt_vector"])
  _assert_same_tree(safetensors_io.load_params(str(tmp_path)), params)


def test_load_checks_names_and_shapes_against_the_model(tmp_path):
  params = _params()
  safetensors_io.save_params(params, str(tmp_path))
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
  out = safetensors_io.load_params(str(tmp_path), abstract)
  assert isinstance(out["prompt_vector"], jax.Array)
  _assert_same_tree(jax.tree.map(np.asarray, out), params)
  wrong = dict(abstract, prompt_vector=jax.ShapeDtypeStruct((9,), jnp.float32))
  with pytest.raises(common.WeightsError, match="'prompt_vector'.*\\(8,\\).*\\(9,\\)"):
    safetensors_io.load_params(str(tmp_path), wrong)
  extra = dict(abstract, cond_b=jax.ShapeDtypeStruct((), jnp.float32))
  with pytest.raises(common.WeightsError, match="cond_b"):
    safetensors_io.load_params(str(tmp_path), extra)


def test_config_json_round_trip(tmp_path):
  config = _config("vg_t5xl")
  doc = {"architectures": ["AlignCap"], "model_type": "aligncap", "num_tags": 7,
         "aligncap_config": config.to_dict()}
  (tmp_path / "config.json").write_text(json.dumps(doc))
  back, raw = hf_export.read_config(str(tmp_path))
  assert raw["num_tags"] == 7
  assert back.init.hf == str(tmp_path) and back.init.blip2 is None
  assert back.data.llm_tokenizer == str(tmp_path / "tokenizer.json")
  for field in ("model", "loss", "optim", "train", "decode", "mesh", "trainable"):
    assert json.dumps(back[field].to_dict() if hasattr(back[field], "to_dict") else back[field],
                      sort_keys=True) == json.dumps(
        config[field].to_dict() if hasattr(config[field], "to_dict") else config[field],
        sort_keys=True), field
  doc["aligncap_config"]["model"]["not_a_field"] = 1
  (tmp_path / "config.json").write_text(json.dumps(doc))
  with pytest.raises(ValueError, match="unknown config field 'model.not_a_field'"):
    hf_export.read_config(str(tmp_path))


def test_not_an_export_is_named(tmp_path):
  with pytest.raises(FileNotFoundError, match="not an AlignCap export"):
    hf_export.read_config(str(tmp_path))
  (tmp_path / "config.json").write_text(json.dumps({"architectures": ["T5Model"]}))
  with pytest.raises(ValueError, match="not an AlignCap export"):
    hf_export.read_config(str(tmp_path))


def test_push_without_huggingface_hub_says_how_to_install(tmp_path, monkeypatch):
  import builtins
  real_import = builtins.__import__

  def fake_import(name, *args, **kwargs):
    if name == "huggingface_hub":
      raise ImportError("no module")
    return real_import(name, *args, **kwargs)

  monkeypatch.setattr(builtins, "__import__", fake_import)
  with pytest.raises(ImportError, match="pip install"):
    hf_export.push(str(tmp_path), "user/aligncap")


@pytest.mark.slow
def test_export_then_load_gives_identical_captions(tmp_path):
  from aligncap_jax import checkpoint
  from aligncap_jax import evaluate
  from aligncap_jax import sharding
  from aligncap_jax import train
  from aligncap_jax import train_state
  from aligncap_jax.data import pipeline
  from aligncap_jax.models import aligncap

  config = _config("vg_t5xl", "smoke")
  config.data.data_dir = str(tmp_path / "tfds")
  config.train.eval_max_examples = 4
  config_lib.validate(config)
  pipeline.prepare(config)
  workdir = str(tmp_path / "run")
  # Ends with an eval of the final state (the last checkpoint) on the test split,
  # which writes its captions to eval/predictions.json.
  train.train_and_evaluate(config, workdir)

  out = hf_export.export(config, workdir)
  assert out == os.path.join(workdir, "export", "hf")
  for name in ("model.safetensors", "config.json", "tokenizer.json", "tag_vocab.txt",
               "README.md", "clip_tokenizer/tokenizer.json"):
    assert os.path.isfile(os.path.join(out, name)), name
  card = pathlib.Path(out, "README.md").read_text()
  for section in ("## Architecture", "## Training data", "## Evaluation", "## Intended use",
                  "## Limitations"):
    assert section in card

  # The trained parameters straight from the checkpoint.
  assets = pipeline.load_assets(config)
  model = aligncap.build_model(config, len(assets.tag_vocab))
  mesh = sharding.make_mesh(config)
  factory = train_state.StateFactory(config, model, mesh, len(assets.tag_vocab), steps=1)
  ckpt = checkpoint.Checkpointer(workdir, async_save=False, read_only=True)
  state = ckpt.restore(checkpoint.latest_step_or_fail(workdir, "test"), factory.abstract_state)
  ckpt.close()

  # Loaded onto the training state's shardings, so the decode below is the eval's
  # own program (one compile, shared with the trainer's eval through the cache).
  config2, params2, assets2 = hf_export.load(out, factory.state_shardings.params)
  assert assets2.tag_vocab == assets.tag_vocab
  _assert_same_tree(jax.device_get(params2), jax.device_get(state.params))

  # The captions of the test split: the trainer's eval of the checkpointed state,
  # and the same beam search run from the export folder alone (its config, model,
  # tokenizers and tag tables).
  with open(os.path.join(workdir, "eval", "predictions.json")) as f:
    want = [p["caption"] for p in json.load(f)]
  model2 = aligncap.build_model(config2, len(assets2.tag_vocab))
  mesh2 = sharding.make_mesh(config2)
  tag_emb2 = evaluate.make_encode_tags(config2, model2, aligncap, mesh2)(
      params2, assets2.tag_clip_tokens, assets2.tag_clip_mask)
  got = [d["caption"] for d in
         evaluate.Evaluator(config2, model2, assets2, mesh2).decode(params2, tag_emb2)]
  assert len(want) == 4 and got == want
