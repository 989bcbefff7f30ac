"""Parity of the vision / Q-Former / CLIP text importers against transformers.

`FAMILIES[name](hf_dir) -> float`: builds the Hugging Face PyTorch module (CPU,
float32, eager attention) from the folder's config and its safetensors (strict
load), loads the same folder with `aligncap_jax.models.hf_import.vision`, runs
identical random inputs through both and returns the max absolute difference
of `last_hidden_state` (and of the pooled output for clip_text).

Inputs: pixels for the vision towers; token ids with an EOS and right padding
for clip_text; random image embeddings with a padding mask for the Q-Former.
For siglip the patch tokens are compared (our tower prepends their mean).
Needs torch + transformers (the `test` extra).
"""
from __future__ import annotations

import numpy as np

from aligncap_jax.models.clip_text import CLIPTextEncoder
from aligncap_jax.models.hf_import import vision as hf_vision
from aligncap_jax.models.hf_import.common import SafetensorsFolder, read_config
from aligncap_jax.models.qformer import QFormer
from aligncap_jax.models.vit import VisionTransformer

_BATCH = 2


def _torch_module(cls_name: str, config_cls_name: str, config: dict, hf_dir: str,
                  prefix: str, skip: tuple[str, ...] = ()):
  """transformers `cls_name` built from `config`, weights = folder tensors under prefix."""
  import torch
  import transformers

  config = {k: v for k, v in config.items() if k not in ("architectures", "model_type")}
  hf_config = getattr(transformers, config_cls_name)(**config)
  hf_config._attn_implementation = "eager"
  model = getattr(transformers, cls_name)(hf_config).eval().float()
  folder = SafetensorsFolder(hf_dir)
  state = {k[len(prefix):]: torch.from_numpy(np.array(folder.get(k)))
           for k in folder.keys() if k.startswith(prefix)
           and not k[len(prefix):].startswith(skip)}
  model.load_state_dict(state, strict=True)
  return model


def _vision_diff(family: str, hf_dir: str) -> float:
  import jax.numpy as jnp
  import torch

  loader = hf_vision.FAMILIES[f"{family}_vision"]
  cfg, params = loader(hf_dir)
  hf = read_config(hf_dir)
  sub = hf["vision_config"] if "vision_config" in hf else hf
  folder = SafetensorsFolder(hf_dir)
  if family == "blip2":
    prefix = "vision_model."
  else:
    prefix = "vision_model." if any(k.startswith("vision_model.") for k in folder.keys()) else ""
  names = {"blip2": ("Blip2VisionModel", "Blip2VisionConfig"),
           "clip": ("CLIPVisionModel", "CLIPVisionConfig"),
           "siglip": ("SiglipVisionModel", "SiglipVisionConfig")}[family]
  model = _torch_module(*names, sub, hf_dir, prefix)
  pixels = np.random.default_rng(0).normal(
      size=(_BATCH, cfg.image_size, cfg.image_size, 3)).astype(np.float32)
  with torch.no_grad():
    ref = model(pixel_values=torch.from_numpy(pixels).permute(0, 3, 1, 2)
                ).last_hidden_state.numpy()
  ours = np.asarray(VisionTransformer(cfg).apply({"params": params}, jnp.asarray(pixels)))
  if family == "siglip":
    ours = ours[:, 1:]
  return float(np.max(np.abs(ours - ref)))


def blip2_vision(hf_dir: str) -> float:
  """max |ours - HF| of BLIP-2's vision last_hidden_state (incl. ln_vision)."""
  return _vision_diff("blip2", hf_dir)


def clip_vision(hf_dir: str) -> float:
  """max |ours - HF| of CLIPVisionModel's last_hidden_state."""
  return _vision_diff("clip", hf_dir)


def siglip_vision(hf_dir: str) -> float:
  """max |ours[:, 1:] - HF| of SiglipVisionModel's last_hidden_state."""
  return _vision_diff("siglip", hf_dir)


def blip2_qformer(hf_dir: str) -> float:
  """max |ours - HF| of the Q-Former's last_hidden_state on random image embeddings."""
  import jax.numpy as jnp
  import torch

  cfg, params = hf_vision.load_blip2_qformer(hf_dir)
  hf = read_config(hf_dir)
  qcfg = dict(hf.get("qformer_config") or {})
  text_parts = ("embeddings.",) if qcfg.get("use_qformer_text_input") else ()
  model = _torch_module("Blip2QFormerModel", "Blip2QFormerConfig", qcfg, hf_dir,
                        "qformer.", skip=text_parts)
  query_tokens = torch.from_numpy(np.array(SafetensorsFolder(hf_dir).get("query_tokens")))
  rng = np.random.default_rng(0)
  length = 9
  enc = rng.normal(size=(_BATCH, length, cfg.encoder_hidden_size)).astype(np.float32)
  mask = np.ones((_BATCH, length), np.int64)
  mask[-1, -3:] = 0
  with torch.no_grad():
    ref = model(query_embeds=query_tokens.expand(_BATCH, -1, -1),
                encoder_hidden_states=torch.from_numpy(enc),
                encoder_attention_mask=torch.from_numpy(mask)).last_hidden_state.numpy()
  ours = np.asarray(QFormer(cfg).apply({"params": params}, jnp.asarray(enc),
                                       jnp.asarray(mask)))
  return float(np.max(np.abs(ours - ref)))


def clip_text(hf_dir: str) -> float:
  """max |ours - HF| over CLIPTextModel's last_hidden_state and pooled output."""
  import jax.numpy as jnp
  import torch

  cfg, params = hf_vision.load_clip_text(hf_dir)
  hf = read_config(hf_dir)
  sub = hf["text_config"] if "text_config" in hf else hf
  folder = SafetensorsFolder(hf_dir)
  prefix = "text_model." if any(k.startswith("text_model.") for k in folder.keys()) else ""
  model = _torch_module("CLIPTextModel", "CLIPTextConfig", sub, hf_dir, prefix)
  rng = np.random.default_rng(0)
  length = min(cfg.max_position_embeddings, 12)
  others = [t for t in range(min(cfg.vocab_size, 1000)) if t != cfg.eos_token_id]
  ids = rng.choice(others, size=(_BATCH, length)).astype(np.int64)
  mask = np.ones((_BATCH, length), np.int64)
  for b in range(_BATCH):
    end = length - 1 - 3 * b
    ids[b, end] = cfg.eos_token_id
    ids[b, end + 1:] = cfg.eos_token_id
    mask[b, end + 1:] = 0
  with torch.no_grad():
    out = model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask))
  last, pooled = CLIPTextEncoder(cfg).apply({"params": params}, jnp.asarray(ids, jnp.int32),
                                            jnp.asarray(mask))
  return float(max(np.max(np.abs(np.asarray(last) - out.last_hidden_state.numpy())),
                   np.max(np.abs(np.asarray(pooled) - out.pooler_output.numpy()))))


FAMILIES = {
    "blip2_vision": blip2_vision,
    "blip2_qformer": blip2_qformer,
    "clip_text": clip_text,
    "clip_vision": clip_vision,
    "siglip_vision": siglip_vision,
}
