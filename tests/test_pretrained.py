"""load_pretrained: BLIP-2 + CLIP text checkpoints into the assembled AlignCap params.

A tiny random `Blip2ForConditionalGeneration` (Flan-T5-shaped language model:
gated-gelu, untied head) and a tiny `CLIPTextModel` are written with
transformers + torch; a tiny AlignCap config matches their sizes. Every loaded
tower is run inside AlignCap and compared with the transformers module.
"""
from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util
from safetensors.numpy import load_file, save_file

from aligncap_jax import sharding as shd
from aligncap_jax.models import aligncap
from aligncap_jax.models.hf_import.common import WeightsError
from aligncap_jax.models.pretrained import load_pretrained

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

NUM_TAGS = 8
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _save(model, path) -> str:
  torch.manual_seed(0)
  with torch.no_grad():
    for p in model.parameters():
      p.normal_(0.0, 0.2)   # BLIP-2's vision init (std 1e-10) would be near-constant
  model.save_pretrained(path, safe_serialization=True)
  return str(path)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
  root = tmp_path_factory.mktemp("pretrained")
  tf = transformers
  blip2 = tf.Blip2Config(
      vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, image_size=32, patch_size=8),
      qformer_config=dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                          intermediate_size=64, encoder_hidden_size=32, vocab_size=128,
                          max_position_embeddings=32, cross_attention_frequency=2),
      text_config=dict(model_type="t5", vocab_size=256, d_model=32, d_kv=8, d_ff=64,
                       num_layers=1, num_decoder_layers=1, num_heads=4,
                       relative_attention_num_buckets=8, relative_attention_max_distance=16,
                       feed_forward_proj="gated-gelu", tie_word_embeddings=False),
      num_query_tokens=4)
  clip = tf.CLIPTextConfig(vocab_size=512, hidden_size=32, intermediate_size=64,
                           num_hidden_layers=1, num_attention_heads=2,
                           max_position_embeddings=77, eos_token_id=1, bos_token_id=0,
                           pad_token_id=0, projection_dim=32)
  model = tf.Blip2ForConditionalGeneration(blip2)
  # transformers 5 ties T5 heads in the config; Flan-T5 checkpoints carry their own.
  model.language_model.lm_head.weight = torch.nn.Parameter(torch.empty(256, 32))
  return {"blip2": _save(model, root / "blip2"),
          "clip_text": _save(tf.CLIPTextModel(clip), root / "clip_text"),
          "root": root}


def _config(folders, scan: bool, frozen_dtype: str = "float32"):
  spec = importlib.util.spec_from_file_location("tiny", os.path.join(ROOT, "configs/tiny.py"))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  c = mod.get_config()
  c.model.llm.dense_act_fn = "gelu_new"   # what transformers saves for gated-gelu
  c.model.scan_layers = scan
  c.model.frozen_dtype = frozen_dtype
  c.init.blip2 = folders["blip2"]
  c.init.clip_text = folders["clip_text"]
  return c


def _init(config):
  model = aligncap.build_model(config, NUM_TAGS)
  batch = jax.tree.map(jnp.asarray, aligncap.dummy_batch(config, 1, NUM_TAGS))
  tag_emb = jnp.zeros((NUM_TAGS, config.model.clip_text.hidden_size), jnp.float32)

  def init(rng):
    k_params, k_drop = jax.random.split(rng)
    return model.init({"params": k_params, "dropout": k_drop}, batch, tag_emb)["params"]

  return model, init


@pytest.fixture(scope="module", params=[False, True], ids=["unscanned", "scanned"])
def loaded(request, folders):
  config = _config(folders, request.param)
  model, init = _init(config)
  abstract = nn.unbox(jax.eval_shape(init, jax.random.key(0)))
  return config, model, load_pretrained(config, abstract)


def _tower(model, params, name, *args):
  return np.asarray(model.apply({"params": params}, *args,
                                method=lambda m, *a: getattr(m, name)(*a)))


def _close(ours, ref, tol=1e-4):
  ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
  assert ours.shape == ref.shape
  err = np.max(np.abs(ours - ref)) / max(1.0, np.max(np.abs(ref)))
  assert err <= tol, err


@pytest.fixture(scope="module")
def hf_models(folders):
  blip2 = transformers.Blip2ForConditionalGeneration.from_pretrained(
      folders["blip2"], attn_implementation="eager").eval()
  clip = transformers.CLIPTextModel.from_pretrained(
      folders["clip_text"], attn_implementation="eager").eval()
  return blip2, clip


def test_towers_match_transformers(loaded, hf_models):
  config, model, params = loaded
  blip2, clip = hf_models
  rng = np.random.default_rng(0)
  with torch.no_grad():
    pixels = rng.normal(size=(2, 32, 32, 3)).astype(np.float32)
    ref = blip2.vision_model(torch.from_numpy(pixels).permute(0, 3, 1, 2)).last_hidden_state
    _close(_tower(model, params, "vision", jnp.asarray(pixels)), ref.numpy())

    enc = rng.normal(size=(2, 17, 32)).astype(np.float32)
    mask = np.ones((2, 17), np.int32)
    mask[1, -5:] = 0
    ref = blip2.qformer(query_embeds=blip2.query_tokens.expand(2, -1, -1),
                        encoder_hidden_states=torch.from_numpy(enc),
                        encoder_attention_mask=torch.from_numpy(mask).long()).last_hidden_state
    _close(_tower(model, params, "qformer", jnp.asarray(enc), jnp.asarray(mask)), ref.numpy())

    latents = rng.normal(size=(2, 4, 32)).astype(np.float32)
    ref = blip2.language_projection(torch.from_numpy(latents))
    _close(_tower(model, params, "language_projection", jnp.asarray(latents)), ref.numpy())

    emb = rng.normal(size=(2, 6, 32)).astype(np.float32)
    emb_mask = np.ones((2, 6), np.int32)
    emb_mask[0, -2:] = 0
    dec = rng.integers(0, 256, size=(2, 5)).astype(np.int32)
    ref = blip2.language_model(inputs_embeds=torch.from_numpy(emb),
                               attention_mask=torch.from_numpy(emb_mask).long(),
                               decoder_input_ids=torch.from_numpy(dec).long()).logits
    _close(_tower(model, params, "llm", jnp.asarray(emb), jnp.asarray(emb_mask),
                  jnp.asarray(dec)), ref.numpy())

    ids = rng.integers(2, 512, size=(2, 10)).astype(np.int32)
    ids_mask = np.ones((2, 10), np.int32)
    ids[0, 9] = ids[1, 6] = 1
    ids[1, 7:], ids_mask[1, 7:] = 0, 0
    ref = clip(input_ids=torch.from_numpy(ids).long(),
               attention_mask=torch.from_numpy(ids_mask).long()).pooler_output
    pooled = model.apply({"params": params}, jnp.asarray(ids), jnp.asarray(ids_mask),
                         method=lambda m, i, k: m.clip_text(i, k)[1])
    _close(pooled, ref.numpy())


def test_scanned_layout_holds_the_same_numbers(folders):
  out = {}
  for scan in (False, True):
    config = _config(folders, scan)
    _, init = _init(config)
    abstract = nn.unbox(jax.eval_shape(init, jax.random.key(0)))
    out[scan] = load_pretrained(config, abstract)
  flat = {k: {"/".join(p): v for p, v in traverse_util.flatten_dict(t).items()}
          for k, t in out.items()}
  pairs = [("vision/layers/", "vision/layers_{}/", 2, 1),
           ("clip_text/layers/", "clip_text/layers_{}/", 1, 1),
           ("llm/encoder_layers/", "llm/encoder_layers_{}/", 1, 1),
           ("qformer/layers/layer_0/", "qformer/layers_{}/", 1, 2),
           ("qformer/layers/layer_1/", "qformer/layers_{}/", 1, 2)]
  checked = 0
  for scanned, unscanned, n, step in pairs:
    offset = int(scanned.endswith("layer_1/"))
    for path, leaf in flat[True].items():
      if path.startswith(scanned):
        rest = path[len(scanned):]
        ref = np.stack([flat[False][unscanned.format(i * step + offset) + rest]
                        for i in range(n)])
        np.testing.assert_array_equal(np.asarray(leaf), np.asarray(ref))
        checked += 1
  assert checked > 40
  for path in ("qformer/query_tokens", "language_projection/kernel", "llm/shared",
               "vision/pos_embed", "clip_text/token_embedding/embedding"):
    np.testing.assert_array_equal(flat[True][path], flat[False][path])


def test_abstract_params_with_shardings_and_bf16(folders):
  config = _config(folders, True, frozen_dtype="bfloat16")
  config.init.clip_text = None
  _, init = _init(config)
  mesh = jax.make_mesh((1, 8, 1), ("data", "fsdp", "tensor"),
                       axis_types=(jax.sharding.AxisType.Auto,) * 3)
  rules = shd.logical_rules(config)
  with nn.logical_axis_rules(rules):
    boxed = jax.eval_shape(init, jax.random.key(0))
  shardings = shd.logical_shardings(boxed, mesh, rules)
  abstract = nn.unbox(boxed)
  params = load_pretrained(config, abstract, shardings=shardings)
  f32_config = _config(folders, True)
  f32_config.init.clip_text = None
  f32_params = load_pretrained(
      f32_config, nn.unbox(jax.eval_shape(_init(f32_config)[1], jax.random.key(0))))
  assert params["clip_text"] is abstract["clip_text"]
  for tower in ("vision", "qformer", "language_projection", "llm"):
    got = traverse_util.flatten_dict(params[tower])
    want_sh = traverse_util.flatten_dict(shardings[tower])
    ref = traverse_util.flatten_dict(f32_params[tower])
    for path, leaf in got.items():
      assert leaf.sharding == want_sh[path], (tower, path)
      assert leaf.dtype == (jnp.float32 if tower in ("qformer", "language_projection")
                            else jnp.bfloat16), (tower, path)
      np.testing.assert_array_equal(np.asarray(leaf),
                                    np.asarray(ref[path]).astype(leaf.dtype))
  assert any(len(s.spec) and s.spec[0] == "fsdp"
             for s in jax.tree.leaves(shardings["llm"])), "nothing was sharded"


def test_none_fields_keep_init_and_log(folders, caplog):
  config = _config(folders, False)
  config.init.blip2 = None
  _, init = _init(config)
  params = nn.unbox(jax.eval_shape(init, jax.random.key(0)))
  params["clip_text"] = jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), params["clip_text"])
  old_clip = jax.tree.leaves(params["clip_text"])
  with caplog.at_level(logging.INFO):
    out = load_pretrained(config, params, donate=True)
  for tower in ("vision", "qformer", "language_projection", "llm", "tagging"):
    assert out[tower] is params[tower]
  assert all(leaf.is_deleted() for leaf in old_clip)
  tensors = load_file(os.path.join(folders["clip_text"], "model.safetensors"))
  emb = [v for k, v in tensors.items() if k.endswith("embeddings.token_embedding.weight")]
  np.testing.assert_array_equal(out["clip_text"]["token_embedding"]["embedding"], emb[0])
  assert (f"clip_text from {folders['clip_text']}; kept as initialised: vision, qformer, "
          "language_projection, llm") in caplog.text


def test_config_fields_that_differ_are_all_named(folders):
  config = _config(folders, False)
  config.model.vision.hidden_size = 64
  config.model.llm.d_ff = 128
  config.model.clip_text.eos_token_id = 2
  with pytest.raises(WeightsError) as e:
    load_pretrained(config, {})
  msg = str(e.value)
  for field in ("model.vision.hidden_size: config 64 vs checkpoint 32",
                "model.llm.d_ff: config 128 vs checkpoint 64",
                "model.clip_text.eos_token_id: config 2 vs checkpoint 1"):
    assert field in msg, msg
  assert "model.qformer" not in msg


def test_missing_folder_config_and_tensor(folders):
  config = _config(folders, False)
  missing = str(folders["root"] / "nowhere")
  config.init.clip_text = missing
  with pytest.raises(WeightsError, match=f"config.init.clip_text: '{missing}' is not"):
    load_pretrained(config, {})

  no_config = folders["root"] / "no_config"
  no_config.mkdir()
  config.init.clip_text = str(no_config)
  with pytest.raises(WeightsError, match="no config.json"):
    load_pretrained(config, {})

  broken = folders["root"] / "blip2_broken"
  shutil.copytree(folders["blip2"], broken)
  tensors = load_file(os.path.join(broken, "model.safetensors"))
  del tensors["language_projection.weight"]
  del tensors["language_model.decoder.block.0.layer.2.DenseReluDense.wo.weight"]
  save_file(tensors, os.path.join(broken, "model.safetensors"))
  config = _config(folders, False)
  config.init.blip2 = str(broken)
  config.init.clip_text = None
  _, init = _init(config)
  abstract = nn.unbox(jax.eval_shape(init, jax.random.key(0)))
  with pytest.raises(WeightsError, match="'language_projection.weight' is missing"):
    load_pretrained(config, abstract)
  tensors["language_projection.weight"] = np.zeros((32, 32), np.float32)
  save_file(tensors, os.path.join(broken, "model.safetensors"))
  with pytest.raises(WeightsError,
                     match=r"'language_model\.decoder\.block\.0\.layer\.2\.DenseReluDense"):
    load_pretrained(config, abstract)


def test_llm_from_its_own_folder_equals_blip2s_language_model(folders, hf_models, loaded):
  blip2_config, _, from_blip2 = loaded
  path = str(folders["root"] / f"flan_t5_{blip2_config.model.scan_layers}")
  hf_models[0].language_model.save_pretrained(path, safe_serialization=True)
  config = _config(folders, blip2_config.model.scan_layers)
  config.init.update(blip2=None, clip_text=None, llm=path)
  _, init = _init(config)
  abstract = nn.unbox(jax.eval_shape(init, jax.random.key(0)))
  params = load_pretrained(config, abstract)
  assert params["vision"] is abstract["vision"]
  jax.tree.map(np.testing.assert_array_equal, params["llm"], from_blip2["llm"])


def test_dense_act_fn_is_checked_against_the_saved_value(folders):
  """BLIP-2 stores dense_act_fn='gelu' next to feed_forward_proj='gated-gelu' (which
  transformers would run as gelu_new): the config must say what the file says."""
  folder = folders["root"] / "blip2_gelu"
  shutil.copytree(folders["blip2"], folder)
  with open(folder / "config.json") as f:
    hf = json.load(f)
  hf["text_config"]["dense_act_fn"] = "gelu"
  with open(folder / "config.json", "w") as f:
    json.dump(hf, f)
  config = _config(folders, False)
  config.init.update(blip2=str(folder), clip_text=None)
  with pytest.raises(WeightsError,
                     match="model.llm.dense_act_fn: config 'gelu_new' vs checkpoint 'gelu'"):
    load_pretrained(config, {})
  config.model.llm.dense_act_fn = "gelu"
  with pytest.raises(WeightsError, match="params has no subtree"):
    load_pretrained(config, {})   # the folder matched; only the params are missing
