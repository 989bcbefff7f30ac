"""HF import of the vision towers, Q-Former and CLIP text: parity, layouts, errors.

Tiny random checkpoints are written with transformers + torch (save_pretrained,
safetensors); weights are redrawn with std 0.2 so that no tower is trivially
near-constant (BLIP-2's vision init std is 1e-10).
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from aligncap_jax.models.clip_text import CLIPTextEncoder
from aligncap_jax.models.hf_import import vision as hf_vision
from aligncap_jax.models.hf_import.common import WeightsError
from aligncap_jax.models.qformer import QFormer
from aligncap_jax.models.vit import VisionTransformer

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from aligncap_jax.tools import parity_vision  # noqa: E402

VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
              num_attention_heads=4, image_size=28, patch_size=14)
TEXT = dict(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, max_position_embeddings=16, eos_token_id=99,
            bos_token_id=98)


def _save(model, path):
  torch.manual_seed(0)
  with torch.no_grad():
    for p in model.parameters():
      p.normal_(0.0, 0.2)
  model.save_pretrained(path, safe_serialization=True)
  return str(path)


@pytest.fixture(scope="session")
def folders(tmp_path_factory):
  root = tmp_path_factory.mktemp("hf_vision")
  tf = transformers
  blip2 = tf.Blip2Config(
      vision_config=dict(VISION),
      qformer_config=dict(hidden_size=32, num_hidden_layers=4, num_attention_heads=4,
                          intermediate_size=64, encoder_hidden_size=32, vocab_size=100),
      text_config=dict(model_type="t5", vocab_size=100, d_model=32, d_kv=8, d_ff=64,
                       num_layers=1, num_decoder_layers=1, num_heads=4),
      num_query_tokens=4)
  return {
      "blip2": _save(tf.Blip2ForConditionalGeneration(blip2), root / "blip2"),
      "clip_text": _save(tf.CLIPTextModel(tf.CLIPTextConfig(**TEXT)), root / "clip_text"),
      "clip_vision": _save(tf.CLIPVisionModel(tf.CLIPVisionConfig(**VISION)),
                           root / "clip_vision"),
      "clip": _save(tf.CLIPModel(tf.CLIPConfig(text_config=TEXT, vision_config=VISION,
                                               projection_dim=16)), root / "clip"),
      "siglip_vision": _save(tf.SiglipVisionModel(tf.SiglipVisionConfig(**VISION)),
                             root / "siglip_vision"),
  }


CASES = [("blip2_vision", "blip2"), ("blip2_qformer", "blip2"), ("clip_text", "clip_text"),
         ("clip_text", "clip"), ("clip_vision", "clip_vision"), ("clip_vision", "clip"),
         ("siglip_vision", "siglip_vision")]


@pytest.mark.parametrize("family,folder", CASES)
def test_parity_with_transformers(folders, family, folder):
  diff = parity_vision.FAMILIES[family](folders[folder])
  assert diff < 1e-4, (family, folder, diff)


def _outputs(family, cfg, params):
  if family.endswith("_vision"):
    x = jax.random.normal(jax.random.key(0), (2, cfg.image_size, cfg.image_size, 3))
    return [VisionTransformer(cfg).apply({"params": params}, x)]
  if family == "blip2_qformer":
    enc = jax.random.normal(jax.random.key(0), (2, 5, cfg.encoder_hidden_size))
    return [QFormer(cfg).apply({"params": params}, enc)]
  ids = jnp.array([[3, 4, 99, 99], [5, 99, 1, 1]], jnp.int32)
  return list(CLIPTextEncoder(cfg).apply({"params": params}, ids))


@pytest.mark.parametrize("family,folder", [c for c in CASES if c[1] != "clip"])
def test_scanned_layout_gives_the_same_numbers(folders, family, folder):
  cfg, params = hf_vision.FAMILIES[family](folders[folder])
  assert "layers_0" in params
  scfg, sparams = hf_vision.FAMILIES[family](
      folders[folder], config=dataclasses.replace(cfg, scan_layers=True))
  assert "layers" in sparams and "layers_0" not in sparams
  lead = jax.tree.leaves(sparams["layers"])[0].shape[0]
  assert lead == (cfg.num_layers // 2 if family == "blip2_qformer" else cfg.num_layers)
  for a, b in zip(_outputs(family, cfg, params), _outputs(family, scfg, sparams)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def _edited_copy(src, dst, edit):
  shutil.copytree(src, dst)
  path = os.path.join(dst, "model.safetensors")
  tensors = load_file(path)
  edit(tensors)
  save_file(tensors, path, metadata={"format": "pt"})
  return str(dst)


def test_missing_tensor_is_named(folders, tmp_path):
  name = "encoder.layers.1.mlp.fc2.bias"
  d = _edited_copy(folders["clip_vision"], tmp_path / "f", lambda t: t.pop(name))
  with pytest.raises(WeightsError, match=f"'{name}' is missing"):
    hf_vision.load_clip_vision(d)


def test_unexpected_tensor_is_named(folders, tmp_path):
  def add(t):
    t["qformer.encoder.layer.0.extra.weight"] = np.zeros((2,), np.float32)
    t["language_model.whatever"] = np.zeros((2,), np.float32)  # not ours: ignored
  d = _edited_copy(folders["blip2"], tmp_path / "f", add)
  with pytest.raises(WeightsError, match=r"unexpected tensors.*qformer\.encoder\.layer\.0"
                                            r"\.extra\.weight'\]"):
    hf_vision.load_blip2_qformer(d)
  hf_vision.load_blip2_vision(d)


def test_shape_mismatch_is_named(folders, tmp_path):
  name = "text_model.encoder.layers.0.self_attn.k_proj.weight"
  d = _edited_copy(folders["clip"], tmp_path / "f",
                   lambda t: t.__setitem__(name, t[name][:, :16].copy()))
  with pytest.raises(WeightsError, match=f"shape mismatch for tensor '{name}'.*"
                                            r"\(32, 16\) vs expected \(32, 32\)"):
    hf_vision.load_clip_text(d)


def test_config_differences_are_named(folders):
  cfg, _ = hf_vision.load_blip2_vision(folders["blip2"])
  with pytest.raises(WeightsError, match="num_hidden_layers: config 3 vs checkpoint 2"):
    hf_vision.load_blip2_vision(folders["blip2"], config=dataclasses.replace(cfg, num_layers=3))
  qcfg, _ = hf_vision.load_blip2_qformer(folders["blip2"])
  with pytest.raises(WeightsError, match="num_query_tokens: config 8 vs checkpoint 4"):
    hf_vision.load_blip2_qformer(folders["blip2"],
                                 config=dataclasses.replace(qcfg, num_query_tokens=8))


def test_dtype_and_shardings(folders):
  cfg, params = hf_vision.load_clip_text(folders["clip_text"], dtype=jnp.bfloat16)
  assert {x.dtype for x in jax.tree.leaves(params)} == {jnp.dtype(jnp.bfloat16)}
  mesh = jax.make_mesh((8,), ("fsdp",), axis_types=(jax.sharding.AxisType.Auto,))
  spec = jax.sharding.PartitionSpec
  shardings = jax.tree.map(
      lambda x: jax.sharding.NamedSharding(
          mesh, spec("fsdp") if x.shape[0] % 8 == 0 else spec()), params)
  _, placed = hf_vision.load_clip_text(folders["clip_text"], shardings=shardings)
  emb = placed["token_embedding"]["embedding"]
  assert emb.sharding.spec == spec()  # 100 rows: replicated
  kernel = placed["layers_0"]["mlp"]["fc1"]["kernel"]
  assert kernel.sharding.spec == spec("fsdp") and len(kernel.addressable_shards) == 8
  _, plain = hf_vision.load_clip_text(folders["clip_text"])
  np.testing.assert_array_equal(np.asarray(kernel), np.asarray(plain["layers_0"]["mlp"]["fc1"]
                                                               ["kernel"]))


def test_family_registry_and_config(folders):
  assert set(hf_vision.FAMILIES) == set(parity_vision.FAMILIES) == {
      "blip2_vision", "blip2_qformer", "clip_text", "clip_vision", "siglip_vision"}
  with open(os.path.join(folders["blip2"], "config.json")) as f:
    assert json.load(f)["num_query_tokens"] == 4
  cfg, params = hf_vision.load_siglip_vision(folders["siglip_vision"])
  assert cfg.family == "siglip" and cfg.hidden_act == "gelu_pytorch_tanh"
  assert params["pos_embed"].shape == (4, 32) and "cls_token" not in params
