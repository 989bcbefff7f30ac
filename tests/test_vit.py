"""Vision towers: token layout per family, scan/remat equivalence, axes, real sizes."""
from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from aligncap_jax.config import base_config
from aligncap_jax.models.vit import (VisionConfig, VisionTransformer,
                                     dot_product_attention)
from tolerance import assert_reorder_close  # noqa: E402

LOGICAL = {"batch", "length", "embed", "mlp", "heads", "kv", "vocab", "layers", "tags",
           "views", None}


def _pixels(cfg, b=2, seed=0):
  return jax.random.normal(jax.random.key(seed), (b, cfg.image_size, cfg.image_size, 3))


def stack_layers(params, num_layers, name="layers"):
  """Unscanned params ({name}_i) -> the scanned layout ({name} with a leading axis)."""
  out = {k: v for k, v in params.items() if not k.startswith(f"{name}_")}
  out[name] = jax.tree.map(lambda *xs: jnp.stack(xs),
                           *[params[f"{name}_{i}"] for i in range(num_layers)])
  return out


@pytest.mark.parametrize("family", ["blip2", "clip", "siglip"])
def test_token_layout(family):
  cfg = VisionConfig.tiny(family)
  model = VisionTransformer(cfg)
  x = _pixels(cfg)
  params = nn.unbox(model.init(jax.random.key(1), x))["params"]
  y = model.apply({"params": params}, x)
  assert y.shape == (2, 1 + cfg.grid_size ** 2, cfg.hidden_size) == (2, cfg.num_tokens, 32)
  assert ("cls_token" in params) == (family != "siglip")
  assert ("pre_norm" in params) == (family == "clip")
  assert ("post_norm" in params) == (family != "clip")
  assert ("bias" in params["patch_embed"]) == (family != "clip")
  if family == "siglip":
    assert_reorder_close(y[:, 0], y[:, 1:].mean(axis=1), depth=1)
  if family == "blip2":
    # ln_vision is part of the tower: each token is layer-normalised (scale 1, bias 0 at init).
    np.testing.assert_allclose(y.mean(-1), 0.0, atol=1e-5)
    np.testing.assert_allclose(y.std(-1), 1.0, atol=1e-3)


def test_patch_embedding_is_a_per_patch_linear_map():
  cfg = VisionConfig.tiny("siglip", num_layers=1)
  model = VisionTransformer(cfg)
  x = _pixels(cfg, b=1)
  params = nn.unbox(model.init(jax.random.key(0), x))["params"]
  conv = nn.Conv(cfg.hidden_size, (14, 14), strides=(14, 14), padding="VALID")
  got = conv.apply({"params": params["patch_embed"]}, x).reshape(1, 4, -1)
  kernel = np.asarray(params["patch_embed"]["kernel"]).reshape(-1, cfg.hidden_size)
  patches = np.asarray(x).reshape(1, 2, 14, 2, 14, 3).transpose(0, 1, 3, 2, 4, 5)
  want = patches.reshape(1, 4, -1) @ kernel + np.asarray(params["patch_embed"]["bias"])
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", ["blip2", "clip", "siglip"])
def test_scan_and_remat_match_unscanned(family):
  cfg = VisionConfig.tiny(family, num_layers=3)
  x = _pixels(cfg)
  params = nn.unbox(VisionTransformer(cfg).init(jax.random.key(2), x))["params"]
  want = VisionTransformer(cfg).apply({"params": params}, x)
  scanned = stack_layers(params, 3)
  for scan, remat in ((True, False), (True, True)):
    c = dataclasses.replace(cfg, scan_layers=scan, remat=remat)
    got = VisionTransformer(c).apply({"params": scanned}, x)
    assert_reorder_close(got, want, depth=cfg.num_layers)
  got = VisionTransformer(dataclasses.replace(cfg, remat=True)).apply({"params": params}, x)
  assert_reorder_close(got, want, depth=cfg.num_layers)


def test_scanned_remat_gradients_match_unscanned():
  cfg = VisionConfig.tiny("blip2")
  x = _pixels(cfg)
  w = jax.random.normal(jax.random.key(3), (cfg.num_tokens, cfg.hidden_size))
  params = nn.unbox(VisionTransformer(cfg).init(jax.random.key(2), x))["params"]
  c = dataclasses.replace(cfg, scan_layers=True, remat=True)
  g_plain = jax.grad(lambda p: (VisionTransformer(cfg).apply({"params": p}, x) * w).sum())(
      params)
  g_scan = jax.grad(lambda p: (VisionTransformer(c).apply({"params": p}, x) * w).sum())(
      stack_layers(params, 2))
  np.testing.assert_allclose(g_scan["layers"]["mlp"]["fc1"]["kernel"][1],
                             g_plain["layers_1"]["mlp"]["fc1"]["kernel"], rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(g_scan["cls_token"], g_plain["cls_token"], rtol=1e-4, atol=1e-5)


def test_scanned_init_layout_and_logical_axes():
  cfg = VisionConfig.tiny("blip2", num_layers=3, scan_layers=True)
  boxed = jax.eval_shape(lambda: VisionTransformer(cfg).init(jax.random.key(0), _pixels(cfg)))
  leaves = jax.tree.leaves(boxed["params"], is_leaf=lambda v: isinstance(v, nn.Partitioned))
  assert leaves and all(isinstance(v, nn.Partitioned) for v in leaves)
  for v in leaves:
    assert set(v.names) <= LOGICAL, v.names
    assert len(v.names) == len(v.value.shape)
  qkv = boxed["params"]["layers"]["attn"]["qkv"]["kernel"]
  assert qkv.names == ("layers", "embed", None, "heads", "kv")
  assert qkv.value.shape == (3, 32, 3, 4, 8)


def test_wrong_image_size_is_an_error_naming_sizes():
  cfg = VisionConfig.tiny("clip")
  model = VisionTransformer(cfg)
  params = nn.unbox(model.init(jax.random.key(0), _pixels(cfg)))["params"]
  with pytest.raises(ValueError, match="42x42.*28x28"):
    model.apply({"params": params}, jnp.zeros((1, 42, 42, 3)))


def test_bad_configs_are_errors():
  with pytest.raises(ValueError, match="family"):
    VisionConfig(family="dino")
  with pytest.raises(ValueError, match="patch_size"):
    VisionConfig.tiny("clip", image_size=30)
  with pytest.raises(ValueError, match="hidden_act"):
    VisionConfig.tiny("clip", hidden_act="swishy")


def test_from_config_reads_base_config_and_rejects_unknown_fields():
  c = base_config()
  cfg = VisionConfig.from_config(c.model.vision, scan_layers=True)
  assert (cfg.hidden_size, cfg.num_layers, cfg.num_tokens, cfg.scan_layers) == (1408, 39, 257, True)
  cd = c.model.vision
  cd.unlock()
  cd.hidden_sise = 3
  with pytest.raises(ValueError, match="model.vision.hidden_sise"):
    VisionConfig.from_config(cd)


def test_bf16_tower_tracks_float32():
  cfg = VisionConfig.tiny("blip2")
  x = _pixels(cfg)
  params = nn.unbox(VisionTransformer(cfg).init(jax.random.key(0), x))["params"]
  want = VisionTransformer(cfg).apply({"params": params}, x)
  p16 = jax.tree.map(lambda a: a.astype(jnp.bfloat16), params)
  got = VisionTransformer(cfg, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16).apply(
      {"params": p16}, x)
  assert got.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(got, np.float32), want, atol=0.1)


def test_attention_matches_a_plain_loop():
  rng = np.random.default_rng(0)
  q, k, v = (rng.normal(size=(1, s, 2, 4)).astype(np.float32) for s in (3, 5, 5))
  mask = np.array([1, 1, 0, 1, 0], bool)
  got = np.asarray(dot_product_attention(q, k, v, mask[None, None, None, :]))
  for h in range(2):
    for i in range(3):
      logits = np.array([q[0, i, h] @ k[0, j, h] / 2.0 if mask[j] else -np.inf
                         for j in range(5)])
      p = np.exp(logits - logits.max())
      p /= p.sum()
      np.testing.assert_allclose(got[0, i, h], p @ v[0, :, h], rtol=1e-5, atol=1e-6)


def _torch_count(module_fn):
  torch = pytest.importorskip("torch")
  with torch.device("meta"):
    model = module_fn()
  return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("family,hf", [
    ("blip2", "Blip2VisionModel:Blip2VisionConfig"),
    ("clip", "CLIPVisionModel:CLIPVisionConfig"),
    ("siglip", "SiglipVisionModel:SiglipVisionConfig"),
])
def test_real_size_parameter_count_matches_transformers(family, hf):
  transformers = pytest.importorskip("transformers")
  model_name, config_name = hf.split(":")
  hf_cfg = getattr(transformers, config_name)(
      **({"patch_size": 14, "hidden_size": 1024, "intermediate_size": 4096,
          "num_hidden_layers": 24, "num_attention_heads": 16} if family == "clip" else {}),
      **({"vision_use_head": False} if family == "siglip" else {}))
  want = _torch_count(lambda: getattr(transformers, model_name)(hf_cfg))
  cfg = VisionConfig.from_hf(hf_cfg.to_dict(), family, scan_layers=True)
  shapes = jax.eval_shape(lambda: VisionTransformer(cfg).init(
      jax.random.key(0), jnp.zeros((1, cfg.image_size, cfg.image_size, 3))))
  got = sum(x.size for x in jax.tree.leaves(nn.unbox(shapes)))
  if family == "clip":  # HF CLIP keeps a post_layernorm that the token output never uses
    want -= 2 * cfg.hidden_size
  assert got == want
  if family == "blip2":
    assert got == 985_952_256  # EVA ViT-g/14 of BLIP-2, incl. ln_vision
