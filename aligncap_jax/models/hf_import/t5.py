"""Hugging Face `T5ForConditionalGeneration` (T5, T5 v1.1, Flan-T5) -> `models.t5.T5`.

Tensor names, transposes and head reshapes are mapped explicitly. The LM head is
untied when the folder holds an `lm_head.weight` that differs from
`shared.weight` (Flan-T5), as transformers 5 decides at load time.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from aligncap_jax.models import hf_import as reg
from aligncap_jax.models.hf_import.common import SafetensorsFolder, assemble, identity
from aligncap_jax.models.hf_import.common import read_config
from aligncap_jax.models.t5 import T5, T5Config


def config_from_folder(hf_dir: str, folder: SafetensorsFolder | None = None,
                       **overrides) -> T5Config:
  """T5Config for a folder, with the head tying that its tensors imply."""
  folder = folder or SafetensorsFolder(hf_dir)
  d = read_config(hf_dir)
  config = T5Config.from_hf(d, **overrides)
  untied = "lm_head.weight" in folder and (
      not config.tie_word_embeddings
      or not np.array_equal(folder.get("lm_head.weight"), folder.get("shared.weight")))
  return dataclasses.replace(config, tie_word_embeddings=not untied)


def abstract_params(config: T5Config) -> Any:
  """ShapeDtypeStructs of `T5(config)`'s params (float32)."""
  model = T5(config)
  shapes = jax.eval_shape(
      model.init, jax.random.key(0), jnp.zeros((1, 1, config.d_model)),
      jnp.ones((1, 1), jnp.int32), jnp.zeros((1, 1), jnp.int32))
  return nn.unbox(shapes["params"])


def mapping(config: T5Config, stacked: bool) -> dict:
  """Flax path -> (HF tensor name, transform); '{layer}' names when stacked."""
  h = config.num_heads
  m = {"shared": ("shared.weight", identity),
       "encoder_position_bias": (
           "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight",
           identity),
       "decoder_position_bias": (
           "decoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight",
           identity),
       "encoder_norm/scale": ("encoder.final_layer_norm.weight", identity),
       "decoder_norm/scale": ("decoder.final_layer_norm.weight", identity)}
  if not config.tie_word_embeddings:
    m["lm_head/kernel"] = ("lm_head.weight", reg.linear_t)
  wis = ("wi_0", "wi_1") if config.is_gated_act else ("wi",)

  def attention(flax, hf):
    return {f"{flax}/q/kernel": (f"{hf}.q.weight", reg.last2_to_in_heads(h)),
            f"{flax}/k/kernel": (f"{hf}.k.weight", reg.last2_to_in_heads(h)),
            f"{flax}/v/kernel": (f"{hf}.v.weight", reg.last2_to_in_heads(h)),
            f"{flax}/o/kernel": (f"{hf}.o.weight", reg.heads_to_out(h))}

  def ff(flax, hf):
    out = {f"{flax}/{w}/kernel": (f"{hf}.DenseReluDense.{w}.weight", reg.linear_t)
           for w in wis}
    out[f"{flax}/wo/kernel"] = (f"{hf}.DenseReluDense.wo.weight", reg.linear_t)
    return out

  for p, hf in reg.layer_names("encoder.block.{layer}", config.num_layers, stacked,
                               "encoder_layers"):
    m.update(attention(f"{p}/self_attn", f"{hf}.layer.0.SelfAttention"))
    m[f"{p}/self_attn_norm/scale"] = (f"{hf}.layer.0.layer_norm.weight", identity)
    m.update(ff(f"{p}/mlp", f"{hf}.layer.1"))
    m[f"{p}/mlp_norm/scale"] = (f"{hf}.layer.1.layer_norm.weight", identity)
  for p, hf in reg.layer_names("decoder.block.{layer}", config.num_decoder_layers,
                               stacked, "decoder_layers"):
    m.update(attention(f"{p}/self_attn", f"{hf}.layer.0.SelfAttention"))
    m[f"{p}/self_attn_norm/scale"] = (f"{hf}.layer.0.layer_norm.weight", identity)
    m.update(attention(f"{p}/cross_attn", f"{hf}.layer.1.EncDecAttention"))
    m[f"{p}/cross_attn_norm/scale"] = (f"{hf}.layer.1.layer_norm.weight", identity)
    m.update(ff(f"{p}/mlp", f"{hf}.layer.2"))
    m[f"{p}/mlp_norm/scale"] = (f"{hf}.layer.2.layer_norm.weight", identity)
  return m


def load(hf_dir: str, *, abstract: Any = None, shardings: Any = None,
         dtype: Any = None) -> tuple[T5Config, dict]:
  """Reads a T5 folder; see `hf_import.load`."""
  folder = SafetensorsFolder(hf_dir)
  stacked = reg.is_stacked(abstract, "encoder_layers")
  config = config_from_folder(hf_dir, folder, scan_layers=stacked)
  if abstract is None:
    abstract = abstract_params(config)
  source = reg.StackingFolder(folder, {"encoder.block.": config.num_layers,
                                       "decoder.block.": config.num_decoder_layers})
  ignore = [r"^(encoder|decoder)\.embed_tokens\.weight$"]
  if config.tie_word_embeddings:
    ignore.append(r"^lm_head\.weight$")
  params = assemble(source, mapping(config, stacked), abstract, ignore_unused=ignore,
                    shardings=shardings, dtype=dtype)
  return config, params
