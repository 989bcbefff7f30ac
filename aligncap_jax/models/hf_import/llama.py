"""Hugging Face `LlamaForCausalLM` / `Qwen2ForCausalLM` -> `models.decoder_lm.DecoderLM`."""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from aligncap_jax.models import hf_import as reg
from aligncap_jax.models.decoder_lm import DecoderLM, DecoderLMConfig
from aligncap_jax.models.hf_import.common import SafetensorsFolder, assemble, identity
from aligncap_jax.models.hf_import.common import read_config


def abstract_params(config: DecoderLMConfig) -> Any:
  """ShapeDtypeStructs of `DecoderLM(config)`'s params (float32)."""
  shapes = jax.eval_shape(DecoderLM(config).init, jax.random.key(0),
                          jnp.zeros((1, 1, config.hidden_size)), jnp.ones((1, 1), jnp.int32))
  return nn.unbox(shapes["params"])


def mapping(config: DecoderLMConfig, stacked: bool) -> dict:
  """Flax path -> (HF tensor name, transform); '{layer}' names when stacked."""
  h, g = config.num_heads, config.num_kv_heads
  m = {"embed_tokens": ("model.embed_tokens.weight", identity),
       "norm/scale": ("model.norm.weight", identity)}
  if not config.tie_word_embeddings:
    m["lm_head/kernel"] = ("lm_head.weight", reg.linear_t)
  for p, hf in reg.layer_names("model.layers.{layer}", config.num_layers, stacked,
                               "layers"):
    for name, heads in (("q_proj", h), ("k_proj", g), ("v_proj", g)):
      m[f"{p}/{name}/kernel"] = (f"{hf}.self_attn.{name}.weight",
                                 reg.last2_to_in_heads(heads))
      if config.qkv_bias:
        m[f"{p}/{name}/bias"] = (f"{hf}.self_attn.{name}.bias", reg.bias_to_heads(heads))
    m[f"{p}/o_proj/kernel"] = (f"{hf}.self_attn.o_proj.weight", reg.heads_to_out(h))
    if config.o_bias:
      m[f"{p}/o_proj/bias"] = (f"{hf}.self_attn.o_proj.bias", identity)
    for name in ("gate_proj", "up_proj", "down_proj"):
      m[f"{p}/{name}/kernel"] = (f"{hf}.mlp.{name}.weight", reg.linear_t)
      if config.mlp_bias:
        m[f"{p}/{name}/bias"] = (f"{hf}.mlp.{name}.bias", identity)
    m[f"{p}/input_norm/scale"] = (f"{hf}.input_layernorm.weight", identity)
    m[f"{p}/post_attention_norm/scale"] = (f"{hf}.post_attention_layernorm.weight",
                                           identity)
  return m


def load(hf_dir: str, *, abstract: Any = None, shardings: Any = None,
         dtype: Any = None) -> tuple[DecoderLMConfig, dict]:
  """Reads a Llama or Qwen2 folder; see `hf_import.load`."""
  folder = SafetensorsFolder(hf_dir)
  stacked = reg.is_stacked(abstract, "layers")
  config = DecoderLMConfig.from_hf(read_config(hf_dir), scan_layers=stacked)
  if abstract is None:
    abstract = abstract_params(config)
  source = reg.StackingFolder(folder, {"model.layers.": config.num_layers})
  ignore = [r"\.rotary_emb\.inv_freq$"]
  if config.tie_word_embeddings:
    ignore.append(r"^lm_head\.weight$")
  params = assemble(source, mapping(config, stacked), abstract, ignore_unused=ignore,
                    shardings=shardings, dtype=dtype)
  return config, params
