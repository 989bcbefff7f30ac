"""Decoder-only LLM in the Llama / Qwen2 layout (the other frozen-LLM family).

Numerically the Hugging Face `LlamaForCausalLM` / `Qwen2ForCausalLM`: RMS norm,
rotary position embeddings (`rope_theta`, rotate-half form), grouped-query
attention, SiLU-gated MLP, optional q/k/v (Qwen2) or all-projection (Llama
`attention_bias`) biases, tied or untied LM head. Positions follow Hugging Face
generation: `cumsum(attention_mask) - 1` (0 on padding), so a prefix should be
left-padded (`left_pad`). Decoding uses a KV cache with a leading `layers` axis.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from aligncap_jax.models.t5 import RMSNorm, attend, dense, layer_stack, mask_value
from aligncap_jax.models.t5 import run_stack, write_cache

Array = jax.Array
Cache = dict[str, Array]


@dataclasses.dataclass(frozen=True)
class DecoderLMConfig:
  """Sizes of a Llama/Qwen2-layout decoder.

  `qkv_bias` puts biases on the q/k/v projections (Qwen2, or Llama with
  `attention_bias`); `o_bias` on the output projection (Llama `attention_bias`
  only); `mlp_bias` on the MLP projections (Llama `mlp_bias`).
  """
  vocab_size: int = 32000
  hidden_size: int = 4096
  intermediate_size: int = 11008
  num_layers: int = 32
  num_heads: int = 32
  num_kv_heads: int = 32
  head_dim: int = 128
  rope_theta: float = 10000.0
  rms_norm_eps: float = 1e-6
  qkv_bias: bool = False
  o_bias: bool = False
  mlp_bias: bool = False
  tie_word_embeddings: bool = False
  bos_token_id: int = 1
  eos_token_id: int = 2
  pad_token_id: int = 0
  scan_layers: bool = False
  remat: bool = False

  def __post_init__(self):
    if self.num_heads % self.num_kv_heads:
      raise ValueError(f"DecoderLMConfig: num_heads={self.num_heads} is not a multiple "
                       f"of num_kv_heads={self.num_kv_heads}")

  @classmethod
  def tiny(cls, **overrides) -> DecoderLMConfig:
    """A Qwen2-shaped (GQA, qkv bias, tied) model small enough for CPU tests."""
    kw = dict(vocab_size=96, hidden_size=32, intermediate_size=48, num_layers=2,
              num_heads=4, num_kv_heads=2, head_dim=8, qkv_bias=True,
              tie_word_embeddings=True, bos_token_id=1, eos_token_id=2)
    kw.update(overrides)
    return cls(**kw)

  @classmethod
  def from_hf(cls, d: dict, **overrides) -> DecoderLMConfig:
    """From a Hugging Face Llama or Qwen2 `config.json` dict."""
    model_type = d.get("model_type", "llama")
    if model_type not in ("llama", "qwen2"):
      raise ValueError(f"decoder-only config field 'model_type': {model_type!r} is "
                       "not 'llama' or 'qwen2'")
    rope = d.get("rope_parameters") or d.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default":
      raise ValueError(f"decoder-only config field 'rope_parameters.rope_type': "
                       f"{rope_type!r} is not supported (only 'default')")
    if d.get("use_sliding_window"):
      raise ValueError("decoder-only config field 'use_sliding_window': sliding-window "
                       "attention is not supported")
    act = d.get("hidden_act", "silu")
    if act not in ("silu", "swish"):
      raise ValueError(f"decoder-only config field 'hidden_act': {act!r} is not 'silu'")
    heads = d["num_attention_heads"]
    attention_bias = bool(d.get("attention_bias", False))

    def token(name, default):
      v = d.get(name)
      if isinstance(v, list):
        v = v[0]
      return default if v is None else v

    eos = token("eos_token_id", 2)
    kw = dict(
        vocab_size=d["vocab_size"], hidden_size=d["hidden_size"],
        intermediate_size=d["intermediate_size"], num_layers=d["num_hidden_layers"],
        num_heads=heads, num_kv_heads=d.get("num_key_value_heads") or heads,
        head_dim=d.get("head_dim") or d["hidden_size"] // heads,
        rope_theta=float(rope.get("rope_theta", d.get("rope_theta", 10000.0))),
        rms_norm_eps=d.get("rms_norm_eps", 1e-6),
        qkv_bias=model_type == "qwen2" or attention_bias,
        o_bias=model_type == "llama" and attention_bias,
        mlp_bias=model_type == "llama" and bool(d.get("mlp_bias", False)),
        tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
        bos_token_id=token("bos_token_id", 1), eos_token_id=eos,
        pad_token_id=token("pad_token_id", eos))
    kw.update(overrides)
    return cls(**kw)

  @classmethod
  def from_config(cls, cd: Any, *, scan_layers: bool = False,
                  remat: bool = False) -> DecoderLMConfig:
    """From `config.model.llm` (family "llama"); `attention_bias` = Qwen2 q/k/v bias."""
    return cls(
        vocab_size=cd.vocab_size, hidden_size=cd.d_model, intermediate_size=cd.d_ff,
        num_layers=cd.num_layers, num_heads=cd.num_heads,
        num_kv_heads=cd.num_key_value_heads or cd.num_heads, head_dim=cd.d_kv,
        rope_theta=cd.rope_theta, rms_norm_eps=cd.layer_norm_epsilon,
        qkv_bias=cd.attention_bias, tie_word_embeddings=cd.tie_word_embeddings,
        bos_token_id=cd.bos_token_id, eos_token_id=cd.eos_token_id,
        pad_token_id=cd.pad_token_id, scan_layers=scan_layers, remat=remat)


def rope_positions(attention_mask: Array) -> Array:
  """Hugging Face generation positions: cumsum(mask) - 1, 0 on padding. int32[B, L]."""
  m = attention_mask.astype(jnp.int32)
  return jnp.where(m > 0, jnp.cumsum(m, axis=-1) - 1, 0)


def left_pad(x: Array, attention_mask: Array) -> tuple[Array, Array]:
  """Moves each row's padding to the front; the real tokens keep their order.

  A prefix laid out like this reads the same in training and in decoding: its
  last slot holds its last real token (whose logits predict the first new
  token), and `rope_positions` numbers the tokens after it on from the prefix's
  real length, as Hugging Face generation does.

  Args:
    x: float[B, L, D] prefix embeddings.
    attention_mask: int/bool[B, L], any pattern of padding.

  Returns:
    (float[B, L, D], int32[B, L]): both permuted row by row.
  """
  order = jnp.argsort((attention_mask != 0).astype(jnp.int32), axis=1, stable=True)
  return (jnp.take_along_axis(x, order[..., None], axis=1),
          jnp.take_along_axis(attention_mask.astype(jnp.int32), order, axis=1))


def apply_rope(x: Array, positions: Array, theta: float) -> Array:
  """Rotate-half rotary embedding.

  Args:
    x: float[B, T, H, Dh].
    positions: int[B, T].

  Returns:
    float[B, T, H, Dh].
  """
  dh = x.shape[-1]
  inv_freq = 1.0 / (theta ** (jnp.arange(0, dh, 2, dtype=jnp.float32) / dh))
  freqs = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, Dh/2]
  emb = jnp.concatenate([freqs, freqs], axis=-1)[:, :, None, :]
  cos, sin = jnp.cos(emb).astype(x.dtype), jnp.sin(emb).astype(x.dtype)
  x1, x2 = x[..., : dh // 2], x[..., dh // 2:]
  rotated = jnp.concatenate([-x2, x1], axis=-1)
  return x * cos + rotated * sin


class DecoderLayer(nn.Module):
  """Pre-norm GQA self-attention + SiLU-gated MLP.

  `layer_cache` holds this layer's `k`, `v` float[B, S, G, Dh]; the new keys and
  values are written at slot `cache_index`.
  """
  config: DecoderLMConfig
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, positions, bias, layer_cache, cache_index):
    c = self.config
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    h = RMSNorm(c.rms_norm_eps, name="input_norm", **kw)(x)
    q = dense((c.num_heads, c.head_dim), -1, ("embed",), ("heads", "kv"),
              use_bias=c.qkv_bias, name="q_proj", **kw)(h)
    k = dense((c.num_kv_heads, c.head_dim), -1, ("embed",), ("heads", "kv"),
              use_bias=c.qkv_bias, name="k_proj", **kw)(h)
    v = dense((c.num_kv_heads, c.head_dim), -1, ("embed",), ("heads", "kv"),
              use_bias=c.qkv_bias, name="v_proj", **kw)(h)
    q = apply_rope(q, positions, c.rope_theta) * (c.head_dim ** -0.5)
    k = apply_rope(k, positions, c.rope_theta)
    new_cache = None
    if layer_cache is not None:
      k = write_cache(layer_cache["k"], k, cache_index)
      v = write_cache(layer_cache["v"], v, cache_index)
      new_cache = {"k": k, "v": v}
    out = attend(q, k, v, bias)
    x = x + dense(c.hidden_size, (-2, -1), ("heads", "kv"), ("embed",),
                  use_bias=c.o_bias, name="o_proj", **kw)(out)
    h = RMSNorm(c.rms_norm_eps, name="post_attention_norm", **kw)(x)
    gate = dense(c.intermediate_size, -1, ("embed",), ("mlp",), use_bias=c.mlp_bias,
                 name="gate_proj", **kw)(h)
    up = dense(c.intermediate_size, -1, ("embed",), ("mlp",), use_bias=c.mlp_bias,
               name="up_proj", **kw)(h)
    mid = nn.with_logical_constraint(jax.nn.silu(gate) * up, ("batch", "length", "mlp"))
    x = x + dense(c.hidden_size, -1, ("mlp",), ("embed",), use_bias=c.mlp_bias,
                  name="down_proj", **kw)(mid)
    return nn.with_logical_constraint(x, ("batch", "length", "embed")), new_cache


class DecoderLM(nn.Module):
  """Llama/Qwen2 decoder with embedding and LM head.

  Attributes:
    config: sizes.
    dtype: activation / compute dtype.
    param_dtype: parameter dtype.
  """
  config: DecoderLMConfig
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  def setup(self):
    c = self.config
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    self.embed_tokens = self.param(
        "embed_tokens",
        nn.with_logical_partitioning(nn.initializers.normal(0.02), ("vocab", "embed")),
        (c.vocab_size, c.hidden_size), self.param_dtype)
    self.layers = layer_stack(DecoderLayer, c, c.num_layers,
                              (nn.broadcast, nn.broadcast, 0, nn.broadcast), **kw)
    self.norm = RMSNorm(c.rms_norm_eps, **kw)
    if not c.tie_word_embeddings:
      self.lm_head = dense(c.vocab_size, -1, ("embed",), ("vocab",), name="lm_head", **kw)

  def embed(self, input_ids: Array) -> Array:
    """int[B, L] -> float[B, L, D]."""
    x = jnp.take(self.embed_tokens, input_ids, axis=0).astype(self.dtype)
    return nn.with_logical_constraint(x, ("batch", "length", "embed"))

  def init_cache(self, batch_size: int, max_length: int) -> Cache:
    """Zero cache: k, v float[layers, B, max_length, G, Dh]."""
    c = self.config
    shape = (c.num_layers, batch_size, max_length, c.num_kv_heads, c.head_dim)
    return {"k": jnp.zeros(shape, self.dtype), "v": jnp.zeros(shape, self.dtype)}

  def __call__(self, inputs_embeds: Array, attention_mask: Array, *,
               positions: Array | None = None, cache: Cache | None = None,
               cache_index: Array | int = 0):
    """Causal LM logits.

    Args:
      inputs_embeds: float[B, T, D].
      attention_mask: int/bool key mask: [B, T] without a cache, [B, S] over all
        cache slots with one (1 for slots holding real tokens).
      positions: int[B, T] rotary positions (default `rope_positions(mask)`,
        only without a cache).
      cache: None or the dict from `init_cache`; the T inputs go to slots
        cache_index..cache_index+T-1 and attend to every earlier unmasked slot.
      cache_index: int32 scalar.

    Returns:
      logits float[B, T, V] without a cache; (logits, new cache) with one.
    """
    t = inputs_embeds.shape[1]
    if cache is None:
      num_keys, cache_index = t, 0
    else:
      num_keys = cache["k"].shape[2]
    if positions is None:
      if cache is not None:
        raise ValueError("DecoderLM: pass `positions` when decoding with a cache")
      positions = rope_positions(attention_mask)
    x = nn.with_logical_constraint(inputs_embeds.astype(self.dtype),
                                   ("batch", "length", "embed"))
    query_slot = cache_index + jnp.arange(t)
    allowed = (jnp.arange(num_keys)[None, :] <= query_slot[:, None])[None, None]
    allowed = allowed & attention_mask.astype(bool)[:, None, None, :]
    bias = jnp.where(allowed, 0.0, mask_value(jnp.float32))
    x, new_cache = run_stack(self.layers, x, positions, bias,
                             jnp.asarray(cache_index, jnp.int32), cache=cache, cache_arg=2)
    logits = self.head(self.norm(x))
    return logits if cache is None else (logits, new_cache)

  def head(self, x: Array) -> Array:
    """float[B, T, D] -> float[B, T, V]."""
    if self.config.tie_word_embeddings:
      logits = jnp.einsum("btd,vd->btv", x, self.embed_tokens.astype(self.dtype))
    else:
      logits = self.lm_head(x)
    return nn.with_logical_constraint(logits, ("batch", "length", "vocab"))
