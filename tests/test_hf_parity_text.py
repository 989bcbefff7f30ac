"""T5 / Llama / Qwen2 import and decoding against transformers on tiny random checkpoints."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from safetensors.numpy import load_file, save_file

from aligncap_jax.models import hf_import
from aligncap_jax.models.decoder_lm import DecoderLM
from aligncap_jax.models.hf_import.common import WeightsError
from aligncap_jax.models.t5 import T5
from aligncap_jax.tools import hf_parity

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

jax.config.update("jax_default_matmul_precision", "highest")
EOS = 2


def _boost_eos(model, eos: int, scale: float) -> None:
  """Makes EOS likely enough that decoding exercises finished beams."""
  with torch.no_grad():
    head = model.get_output_embeddings().weight
    head[eos] = head[eos] * scale + head.mean(0)


def _t5(path, *, proj: str, tied: bool):
  torch.manual_seed(0)
  cfg = transformers.T5Config(
      vocab_size=64, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_decoder_layers=2,
      num_heads=4, relative_attention_num_buckets=8, relative_attention_max_distance=16,
      feed_forward_proj=proj, tie_word_embeddings=tied, decoder_start_token_id=0,
      pad_token_id=0, eos_token_id=EOS, initializer_factor=2.0)
  model = transformers.T5ForConditionalGeneration(cfg)
  if not tied:
    model.lm_head.weight = torch.nn.Parameter(torch.randn(64, 32) * 0.3)
  _boost_eos(model, EOS, 2.0)
  model.save_pretrained(path, safe_serialization=True)
  return str(path)


def _decoder(path, cls, cfg_cls, *, tied: bool, **extra):
  torch.manual_seed(1)
  cfg = cfg_cls(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tied,
                bos_token_id=1, eos_token_id=EOS, pad_token_id=0, initializer_range=0.3,
                rope_theta=500.0, **extra)
  model = cls(cfg)
  _boost_eos(model, EOS, 1.5)
  model.save_pretrained(path, safe_serialization=True)
  return str(path)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
  root = tmp_path_factory.mktemp("hf")
  return {
      "flan_t5": ("t5", _t5(root / "flan_t5", proj="gated-gelu", tied=False)),
      "t5_relu": ("t5", _t5(root / "t5_relu", proj="relu", tied=True)),
      "llama": ("llama", _decoder(root / "llama", transformers.LlamaForCausalLM,
                                  transformers.LlamaConfig, tied=False)),
      "qwen2_tied": ("llama", _decoder(root / "qwen2_tied", transformers.Qwen2ForCausalLM,
                                       transformers.Qwen2Config, tied=True)),
      "qwen2_untied": ("llama", _decoder(root / "qwen2_untied",
                                         transformers.Qwen2ForCausalLM,
                                         transformers.Qwen2Config, tied=False)),
  }


@pytest.mark.slow
@pytest.mark.parametrize("name", ["flan_t5", "llama", "qwen2_tied"])
def test_verifier_logits_and_decoding(folders, name):
  family, path = folders[name]
  diff, problems = hf_parity.run(family, path, with_generate=True)
  assert diff <= 1e-4
  assert problems == []


@pytest.mark.parametrize("name", ["t5_relu", "qwen2_untied"])
def test_verifier_logits(folders, name):
  family, path = folders[name]
  assert hf_parity.logits_parity(family, path) <= 1e-4


def test_decoding_exercises_eos(folders):
  """The parity above means something only if some captions stop early."""
  family, path = folders["flan_t5"]
  config, params = hf_import.load(family, path)
  model = T5(config)
  ids, mask = hf_parity._inputs(config.vocab_size, 4, 9, 0, left_pad=False)
  embeds = model.apply({"params": params}, jnp.asarray(ids), method=T5.embed)
  from aligncap_jax.models.generate import generate
  tokens, _ = generate(model, params, inputs_embeds=embeds, attention_mask=jnp.asarray(mask),
                       eos_token_id=EOS, pad_token_id=0)
  lengths = (np.asarray(tokens) != 0).sum(1)
  assert (lengths < 20).any()


def test_config_flags(folders):
  cfg, _ = hf_import.load("t5", folders["flan_t5"][1])
  assert (cfg.dense_act_fn, cfg.is_gated_act, cfg.tie_word_embeddings,
          cfg.scale_decoder_outputs) == ("gelu_new", True, False, False)
  cfg, params = hf_import.load("t5", folders["t5_relu"][1])
  assert (cfg.dense_act_fn, cfg.is_gated_act, cfg.tie_word_embeddings,
          cfg.scale_decoder_outputs) == ("relu", False, True, True)
  assert "lm_head" not in params and cfg.num_decoder_layers == 2
  cfg, _ = hf_import.load("llama", folders["qwen2_tied"][1])
  assert (cfg.qkv_bias, cfg.o_bias, cfg.tie_word_embeddings, cfg.rope_theta) == (
      True, False, True, 500.0)
  cfg, _ = hf_import.load("llama", folders["llama"][1])
  assert (cfg.qkv_bias, cfg.tie_word_embeddings) == (False, False)


def test_cli_subprocess(folders):
  env = dict(os.environ, JAX_PLATFORMS="cpu", HF_HUB_OFFLINE="1")
  out = subprocess.run(
      [sys.executable, "-m", "aligncap_jax.tools.hf_parity", "--family", "t5",
       "--hf_dir", folders["t5_relu"][1]],
      capture_output=True, text=True, env=env, timeout=300)
  assert out.returncode == 0, out.stdout + out.stderr
  assert "t5: max abs diff" in out.stdout and "(ok" in out.stdout


@pytest.mark.parametrize("name,key", [("flan_t5", "encoder_layers"),
                                      ("qwen2_untied", "layers")])
def test_scanned_import_matches(folders, name, key):
  family, path = folders[name]
  config, params = hf_import.load(family, path)
  cls = T5 if family == "t5" else DecoderLM
  scan_cfg = type(config)(**{**config.__dict__, "scan_layers": True, "remat": True})
  module = cls(scan_cfg)
  x = jnp.ones((1, 3, 32)) * 0.1
  mask = jnp.ones((1, 3), jnp.int32)
  args = (x, mask, jnp.zeros((1, 2), jnp.int32)) if family == "t5" else (x, mask)
  abstract = nn.unbox(jax.eval_shape(module.init, jax.random.key(0), *args)["params"])
  scan_config, scan_params = hf_import.load(family, path, abstract=abstract)
  assert scan_config.scan_layers and key in scan_params
  want = cls(config).apply({"params": params}, *args)
  got = cls(scan_config).apply({"params": scan_params}, *args)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5)


def test_sharded_checkpoint_loads(folders, tmp_path):
  model = transformers.AutoModelForCausalLM.from_pretrained(folders["llama"][1])
  model.save_pretrained(tmp_path, safe_serialization=True, max_shard_size="20KB")
  assert os.path.exists(tmp_path / "model.safetensors.index.json")
  _, want = hf_import.load("llama", folders["llama"][1])
  _, got = hf_import.load("llama", str(tmp_path))
  jax.tree.map(np.testing.assert_array_equal, got, want)


def _rewrite(src: str, dst, edit) -> str:
  os.makedirs(dst, exist_ok=True)
  tensors = load_file(os.path.join(src, "model.safetensors"))
  edit(tensors)
  save_file(tensors, os.path.join(dst, "model.safetensors"), metadata={"format": "pt"})
  with open(os.path.join(src, "config.json")) as f, open(os.path.join(dst, "config.json"), "w") as g:
    json.dump(json.load(f), g)
  return str(dst)


def test_missing_unexpected_and_misshaped_tensors(folders, tmp_path):
  src = folders["qwen2_untied"][1]
  name = "model.layers.1.self_attn.k_proj.bias"
  missing = _rewrite(src, tmp_path / "missing", lambda t: t.pop(name))
  with pytest.raises(WeightsError, match=name.replace(".", r"\.")):
    hf_import.load("llama", missing)
  extra = _rewrite(src, tmp_path / "extra",
                   lambda t: t.update({"model.layers.0.mystery.weight": np.zeros(3, np.float32)}))
  with pytest.raises(WeightsError, match=r"model\.layers\.0\.mystery\.weight"):
    hf_import.load("llama", extra)
  bad = "model.layers.0.mlp.up_proj.weight"
  misshaped = _rewrite(src, tmp_path / "misshaped",
                       lambda t: t.update({bad: np.zeros((40, 32), np.float32)}))
  with pytest.raises(WeightsError, match=bad.replace(".", r"\.")):
    hf_import.load("llama", misshaped)
  t5_missing = _rewrite(folders["flan_t5"][1], tmp_path / "t5_missing",
                        lambda t: t.pop("decoder.block.1.layer.1.EncDecAttention.v.weight"))
  with pytest.raises(WeightsError, match=r"decoder\.block\.1\.layer\.1\.EncDecAttention"):
    hf_import.load("t5", t5_missing)


def test_unknown_family_lists_known():
  with pytest.raises(ValueError, match="known:.*llama.*t5"):
    hf_import.load("gpt9", "/nonexistent")
