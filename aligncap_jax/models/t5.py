"""T5 / Flan-T5 encoder-decoder (the frozen LLM of DESIGN.md section 3).

Numerically the Hugging Face `T5ForConditionalGeneration` (transformers 5.x):
RMS layer norm without mean subtraction, relative position buckets shared by all
layers of a stack, unscaled dot-product attention, plain or gated feed-forward,
and the `d_model ** -0.5` rescale of the decoder output when the checkpoint asks
for it. Decoding uses an explicit self-attention KV cache, heads before
positions (`[B, H, S, Dk]`, what the attention matmuls read without a
transpose), one array per layer (stacked on a leading `layers` axis with
`scan_layers`); cross-attention keys and values are computed once and kept in
the cache.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any

import flax.linen as nn
from flax import traverse_util
import jax
import jax.numpy as jnp
import numpy as np

from aligncap_jax.models.vit import DenseGeneral
from aligncap_jax.ops import activations as ops_activations

Array = jax.Array
Cache = dict[str, Array]

_ACTIVATIONS = {
    "relu": jax.nn.relu,
    "gelu": ops_activations.gelu_exact,
    "gelu_new": functools.partial(jax.nn.gelu, approximate=True),
    "gelu_pytorch_tanh": functools.partial(jax.nn.gelu, approximate=True),
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
}


def activation(name: str):
  """The Hugging Face `ACT2FN[name]` as a jax function."""
  if name not in _ACTIVATIONS:
    raise ValueError(f"unknown activation '{name}'; known: {sorted(_ACTIVATIONS)}")
  return _ACTIVATIONS[name]


def mask_value(dtype) -> float:
  return float(jnp.finfo(dtype).min)


@dataclasses.dataclass(frozen=True)
class T5Config:
  """Sizes of a T5 model; field names follow Hugging Face `T5Config`.

  `tie_word_embeddings` says whether the LM head reuses the shared embedding (no
  `lm_head` parameter); `scale_decoder_outputs` whether the decoder output is
  multiplied by `d_model ** -0.5` before the head (transformers 5 decouples the
  two; original T5 does both, T5 v1.1 / Flan-T5 neither).
  """
  vocab_size: int = 32128
  d_model: int = 512
  d_kv: int = 64
  d_ff: int = 2048
  num_layers: int = 6
  num_decoder_layers: int = 6
  num_heads: int = 8
  relative_attention_num_buckets: int = 32
  relative_attention_max_distance: int = 128
  dense_act_fn: str = "relu"
  is_gated_act: bool = False
  layer_norm_epsilon: float = 1e-6
  tie_word_embeddings: bool = True
  scale_decoder_outputs: bool = True
  pad_token_id: int = 0
  eos_token_id: int = 1
  decoder_start_token_id: int = 0
  scan_layers: bool = False
  remat: bool = False

  def __post_init__(self):
    activation(self.dense_act_fn)

  @classmethod
  def tiny(cls, **overrides) -> T5Config:
    """A Flan-T5-shaped (gated-gelu, untied) model small enough for CPU tests."""
    kw = dict(vocab_size=96, d_model=32, d_kv=8, d_ff=48, num_layers=2,
              num_decoder_layers=2, num_heads=4, relative_attention_num_buckets=8,
              relative_attention_max_distance=16, dense_act_fn="gelu_new",
              is_gated_act=True, tie_word_embeddings=False,
              scale_decoder_outputs=False)
    kw.update(overrides)
    return cls(**kw)

  @classmethod
  def from_hf(cls, d: dict, **overrides) -> T5Config:
    """From a Hugging Face T5 `config.json` dict, resolved as transformers 5 does.

    `feed_forward_proj` decides the activation ("gated-gelu" is `gelu_new`); a
    saved `dense_act_fn` is ignored, exactly as in `T5Config.__post_init__`.
    """
    proj = d.get("feed_forward_proj", "relu")
    parts = proj.split("-")
    if (len(parts) > 1 and parts[0] != "gated") or len(parts) > 2:
      raise ValueError(f"T5 config field 'feed_forward_proj': {proj!r} is not "
                       "'ACT' or 'gated-ACT'")
    act = "gelu_new" if proj == "gated-gelu" else parts[-1]
    tie = d.get("tie_word_embeddings", True)
    scale = d.get("scale_decoder_outputs", tie is not False)
    num_layers = d.get("num_layers", 6)
    kw = dict(
        vocab_size=d["vocab_size"], d_model=d["d_model"], d_kv=d["d_kv"],
        d_ff=d["d_ff"], num_layers=num_layers,
        num_decoder_layers=d.get("num_decoder_layers") or num_layers,
        num_heads=d["num_heads"],
        relative_attention_num_buckets=d.get("relative_attention_num_buckets", 32),
        relative_attention_max_distance=d.get("relative_attention_max_distance", 128),
        dense_act_fn=act, is_gated_act=parts[0] == "gated",
        layer_norm_epsilon=d.get("layer_norm_epsilon", 1e-6),
        tie_word_embeddings=bool(tie), scale_decoder_outputs=bool(scale),
        pad_token_id=d.get("pad_token_id", 0), eos_token_id=d.get("eos_token_id", 1),
        decoder_start_token_id=d.get("decoder_start_token_id", 0))
    kw.update(overrides)
    return cls(**kw)

  @classmethod
  def from_config(cls, cd: Any, *, scan_layers: bool = False,
                  remat: bool = False) -> T5Config:
    """From `config.model.llm` (ml_collections), the field names of config.py."""
    return cls(
        vocab_size=cd.vocab_size, d_model=cd.d_model, d_kv=cd.d_kv, d_ff=cd.d_ff,
        num_layers=cd.num_layers, num_decoder_layers=cd.num_decoder_layers,
        num_heads=cd.num_heads,
        relative_attention_num_buckets=cd.relative_attention_num_buckets,
        relative_attention_max_distance=cd.relative_attention_max_distance,
        dense_act_fn=cd.dense_act_fn, is_gated_act=cd.is_gated_act,
        layer_norm_epsilon=cd.layer_norm_epsilon,
        tie_word_embeddings=cd.tie_word_embeddings,
        scale_decoder_outputs=cd.tie_word_embeddings,
        pad_token_id=cd.pad_token_id, eos_token_id=cd.eos_token_id,
        decoder_start_token_id=cd.decoder_start_token_id,
        scan_layers=scan_layers, remat=remat)


def relative_position_buckets(relative_position: np.ndarray, *, bidirectional: bool,
                              num_buckets: int, max_distance: int) -> np.ndarray:
  """T5's bucket of each relative position (memory - query), as in Mesh TF.

  Args:
    relative_position: int[...] key position minus query position.

  Returns:
    int32[...] buckets in [0, num_buckets).
  """
  rel = np.asarray(relative_position, np.int64)
  buckets = np.zeros_like(rel)
  if bidirectional:
    num_buckets //= 2
    buckets += (rel > 0).astype(np.int64) * num_buckets
    rel = np.abs(rel)
  else:
    rel = -np.minimum(rel, 0)
  max_exact = num_buckets // 2
  large = max_exact + (
      np.log(np.maximum(rel, 1).astype(np.float32) / np.float32(max_exact))
      / np.float32(np.log(max_distance / max_exact))
      * np.float32(num_buckets - max_exact)).astype(np.int64)
  large = np.minimum(large, num_buckets - 1)
  buckets += np.where(rel < max_exact, rel, large)
  return buckets.astype(np.int32)


class RMSNorm(nn.Module):
  """x / rms(x) * scale, statistics in float32 (T5LayerNorm / LlamaRMSNorm).

  Attributes:
    eps: added to the mean square.
  """
  eps: float
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, ("embed",)),
                       (x.shape[-1],), self.param_dtype)
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return (scale.astype(self.dtype) * y.astype(self.dtype)).astype(self.dtype)


def dense(features, axis, in_axes_names, out_axes_names, *, use_bias=False, dtype,
          param_dtype, name, std=0.02):
  """A DenseGeneral whose kernel carries logical axis names."""
  return DenseGeneral(
      features=features, axis=axis, use_bias=use_bias, dtype=dtype,
      param_dtype=param_dtype, name=name,
      kernel_init=nn.with_logical_partitioning(
          nn.initializers.normal(std), in_axes_names + out_axes_names),
      bias_init=nn.with_logical_partitioning(nn.initializers.zeros, out_axes_names))


def attend(q: Array, k: Array, v: Array, bias: Array, *, heads_major: bool = False) -> Array:
  """Softmax attention with an additive bias; GQA when k has fewer heads.

  Args:
    q: float[B, T, H, Dk] queries (already scaled if the model scales).
    k: float[B, S, G, Dk] keys, G divides H; float[B, G, S, Dk] when heads_major.
    v: float[B, S, G, Dk] values; float[B, G, S, Dk] when heads_major.
    bias: float[B or 1, H or 1, T, S] added to the logits (masks included).
    heads_major: k and v hold heads before positions (the T5 decode cache), the
      layout the batched matmuls read without a transpose.

  Returns:
    float[B, T, H, Dk].
  """
  b, t, h, dk = q.shape
  g = k.shape[1 if heads_major else 2]
  kv = "bgsd" if heads_major else "bsgd"
  qg = q.reshape(b, t, g, h // g, dk)
  logits = jnp.einsum(f"btgrd,{kv}->bgrts", qg, k).astype(jnp.float32)
  logits = logits.reshape(b, h, t, -1) + bias
  weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
  out = jnp.einsum(f"bgrts,{kv}->btgrd", weights.reshape(b, g, h // g, t, -1), v)
  return out.reshape(b, t, h, dk)


def write_cache(cache: Array, new: Array, index: Array) -> Array:
  """Writes new float[B, T, G, Dk] into cache float[B, S, G, Dk] at slot `index`."""
  return jax.lax.dynamic_update_slice(cache, new.astype(cache.dtype), (0, index, 0, 0))


def _heads_major(x: Array) -> Array:
  """float[B, S, H, Dk] -> float[B, H, S, Dk]."""
  return jnp.swapaxes(x, 1, 2)


class T5Attention(nn.Module):
  """Multi-head attention without score scaling; biases are passed in."""
  config: T5Config
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  def setup(self):
    c = self.config
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    hk = (c.num_heads, c.d_kv)
    self.q = dense(hk, -1, ("embed",), ("heads", "kv"), name="q", **kw)
    self.k = dense(hk, -1, ("embed",), ("heads", "kv"), name="k", **kw)
    self.v = dense(hk, -1, ("embed",), ("heads", "kv"), name="v", **kw)
    self.o = dense(c.d_model, (-2, -1), ("heads", "kv"), ("embed",), name="o", **kw)

  def kv(self, x: Array) -> tuple[Array, Array]:
    return self.k(x), self.v(x)

  def __call__(self, x: Array, k: Array, v: Array, bias: Array,
               heads_major: bool = False) -> Array:
    return self.o(attend(self.q(x), k, v, bias, heads_major=heads_major))


class T5FeedForward(nn.Module):
  """wo(act(wi(x))) or wo(act(wi_0(x)) * wi_1(x)) when gated."""
  config: T5Config
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    c = self.config
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    act = activation(c.dense_act_fn)
    if c.is_gated_act:
      h = act(dense(c.d_ff, -1, ("embed",), ("mlp",), name="wi_0", **kw)(x))
      h = h * dense(c.d_ff, -1, ("embed",), ("mlp",), name="wi_1", **kw)(x)
    else:
      h = act(dense(c.d_ff, -1, ("embed",), ("mlp",), name="wi", **kw)(x))
    h = nn.with_logical_constraint(h, ("batch", "length", "mlp"))
    return dense(c.d_model, -1, ("mlp",), ("embed",), name="wo", **kw)(h)


class T5EncoderLayer(nn.Module):
  """Pre-norm self-attention + feed-forward block."""
  config: T5Config
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, bias: Array) -> tuple[Array, None]:
    c = self.config
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    attn = T5Attention(c, name="self_attn", **kw)
    h = RMSNorm(c.layer_norm_epsilon, name="self_attn_norm", **kw)(x)
    k, v = attn.kv(h)
    x = x + attn(h, k, v, bias)
    h = RMSNorm(c.layer_norm_epsilon, name="mlp_norm", **kw)(x)
    x = x + T5FeedForward(c, name="mlp", **kw)(h)
    return nn.with_logical_constraint(x, ("batch", "length", "embed")), None


class T5DecoderLayer(nn.Module):
  """Self-attention (cached) + cross-attention + feed-forward block.

  `layer_cache` holds this layer's `k`, `v` float[B, H, S, Dk] (self-attention,
  written at `cache_index`) and, once computed, `cross_k`, `cross_v`
  float[B, H, S_enc, Dk]; when absent they are computed from `encoded`. The
  cache keeps heads before positions so that no step transposes it.
  """
  config: T5Config
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, self_bias, encoded, cross_bias, layer_cache, cache_index):
    c = self.config
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    self_attn = T5Attention(c, name="self_attn", **kw)
    cross_attn = T5Attention(c, name="cross_attn", **kw)
    cached = layer_cache is not None
    h = RMSNorm(c.layer_norm_epsilon, name="self_attn_norm", **kw)(x)
    k, v = self_attn.kv(h)
    new_cache = None
    if cached:
      k, v = (jax.lax.dynamic_update_slice(layer_cache[n], _heads_major(a).astype(
          layer_cache[n].dtype), (0, 0, cache_index, 0)) for n, a in (("k", k), ("v", v)))
      new_cache = {"k": k, "v": v}
    x = x + self_attn(h, k, v, self_bias, heads_major=cached)
    h = RMSNorm(c.layer_norm_epsilon, name="cross_attn_norm", **kw)(x)
    if cached and "cross_k" in layer_cache:
      ck, cv = layer_cache["cross_k"], layer_cache["cross_v"]
    else:
      ck, cv = cross_attn.kv(encoded)
      if cached:
        ck, cv = _heads_major(ck), _heads_major(cv)
    if cached:
      new_cache.update(cross_k=ck, cross_v=cv)
    x = x + cross_attn(h, ck, cv, cross_bias, heads_major=cached)
    h = RMSNorm(c.layer_norm_epsilon, name="mlp_norm", **kw)(x)
    x = x + T5FeedForward(c, name="mlp", **kw)(h)
    return nn.with_logical_constraint(x, ("batch", "length", "embed")), new_cache


def layer_stack(layer_cls, config, n: int, in_axes: tuple, dtype, param_dtype):
  """One scanned module (params stacked on `layers`) or a list of n modules."""
  cls = nn.remat(layer_cls, prevent_cse=not config.scan_layers) if config.remat else layer_cls
  if config.scan_layers:
    scanned = nn.scan(cls, variable_axes={"params": 0}, split_rngs={"params": True},
                      in_axes=in_axes, length=n,
                      metadata_params={nn.PARTITION_NAME: "layers"})
    return scanned(config, dtype=dtype, param_dtype=param_dtype)
  return [cls(config, dtype=dtype, param_dtype=param_dtype) for _ in range(n)]


def run_stack(stack, x: Array, *args, cache: Cache | None = None, cache_arg: int = -1,
              stacked_cache: bool = True):
  """Runs a layer stack; `cache` goes to each layer at position cache_arg.

  A scanned stack takes and returns the cache with a leading `layers` axis. An
  unscanned one does too when `stacked_cache`; otherwise each cache entry is a
  tuple with one array per layer, in and out, so that a decode step updates
  each layer's buffers in place instead of slicing and restacking them all.
  """
  def with_cache(layer_cache):
    a = list(args)
    if cache_arg >= 0:
      a.insert(cache_arg, layer_cache)
    return a

  if not isinstance(stack, (list, tuple)):
    return stack(x, *with_cache(cache))
  outs = []
  for i, layer in enumerate(stack):
    layer_cache = None if cache is None else {n: a[i] for n, a in cache.items()}
    x, out = layer(x, *with_cache(layer_cache))
    outs.append(out)
  if outs[0] is None:
    return x, None
  join = jnp.stack if stacked_cache else tuple
  return x, jax.tree.map(lambda *a: join(a), *outs)


class T5(nn.Module):
  """T5 encoder-decoder with the shared embedding and the LM head.

  Attributes:
    config: sizes.
    dtype: activation / compute dtype.
    param_dtype: parameter dtype.
  """
  config: T5Config
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  def setup(self):
    c = self.config
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    self.shared = self.param(
        "shared", nn.with_logical_partitioning(nn.initializers.normal(1.0), ("vocab", "embed")),
        (c.vocab_size, c.d_model), self.param_dtype)
    bias_init = nn.with_logical_partitioning(nn.initializers.normal(0.02), (None, "heads"))
    self.encoder_position_bias = self.param(
        "encoder_position_bias", bias_init,
        (c.relative_attention_num_buckets, c.num_heads), self.param_dtype)
    self.decoder_position_bias = self.param(
        "decoder_position_bias", bias_init,
        (c.relative_attention_num_buckets, c.num_heads), self.param_dtype)
    self.encoder_layers = layer_stack(T5EncoderLayer, c, c.num_layers, (nn.broadcast,), **kw)
    self.encoder_norm = RMSNorm(c.layer_norm_epsilon, **kw)
    self.decoder_layers = layer_stack(
        T5DecoderLayer, c, c.num_decoder_layers,
        (nn.broadcast, nn.broadcast, nn.broadcast, 0, nn.broadcast), **kw)
    self.decoder_norm = RMSNorm(c.layer_norm_epsilon, **kw)
    if not c.tie_word_embeddings:
      self.lm_head = dense(c.vocab_size, -1, ("embed",), ("vocab",), name="lm_head", **kw)

  def embed(self, input_ids: Array) -> Array:
    """int[B, L] -> float[B, L, D] (the shared input embedding)."""
    x = jnp.take(self.shared, input_ids, axis=0).astype(self.dtype)
    return nn.with_logical_constraint(x, ("batch", "length", "embed"))

  def _position_bias(self, table: Array, query_pos: Array, num_keys: int,
                     max_rel: int, bidirectional: bool) -> Array:
    """float[1, H, T, S] bias of queries at query_pos int[T] over keys 0..S-1."""
    c = self.config
    rel = np.arange(-max_rel, max_rel + 1)
    buckets = jnp.asarray(relative_position_buckets(
        rel, bidirectional=bidirectional, num_buckets=c.relative_attention_num_buckets,
        max_distance=c.relative_attention_max_distance))
    rel_pos = jnp.arange(num_keys)[None, :] - query_pos[:, None]
    values = jnp.take(table, buckets[rel_pos + max_rel], axis=0)  # [T, S, H]
    return jnp.transpose(values, (2, 0, 1))[None].astype(jnp.float32)

  def encode(self, inputs_embeds: Array, attention_mask: Array) -> Array:
    """Encoder stack.

    Args:
      inputs_embeds: float[B, L, D].
      attention_mask: int/bool[B, L], 1 for real tokens.

    Returns:
      float[B, L, D] final-normed encoder states.
    """
    length = inputs_embeds.shape[1]
    x = nn.with_logical_constraint(inputs_embeds.astype(self.dtype),
                                   ("batch", "length", "embed"))
    bias = self._position_bias(self.encoder_position_bias, jnp.arange(length), length,
                               length, bidirectional=True)
    bias = bias + padding_bias(attention_mask)
    x, _ = run_stack(self.encoder_layers, x, bias)
    return self.encoder_norm(x)

  def init_cache(self, batch_size: int, max_length: int) -> Cache:
    """Zero self-attention cache: k, v float[layers, B, H, max_length, Dk] with
    scan_layers, else a tuple of `layers` arrays float[B, H, max_length, Dk]
    each (`decode` adds `cross_k`, `cross_v` with S_enc for max_length)."""
    c = self.config
    shape = (batch_size, c.num_heads, max_length, c.d_kv)
    if c.scan_layers:
      zeros = jnp.zeros((c.num_decoder_layers,) + shape, self.dtype)
    else:
      zeros = tuple(jnp.zeros(shape, self.dtype) for _ in range(c.num_decoder_layers))
    return {"k": zeros, "v": zeros}

  def decode(self, decoder_input_ids: Array, encoder_hidden: Array | None,
             encoder_mask: Array, *, decoder_attention_mask: Array | None = None,
             cache: Cache | None = None, cache_index: Array | int = 0):
    """Decoder stack and LM head.

    Args:
      decoder_input_ids: int[B, T].
      encoder_hidden: float[B, S, D] (may be None once the cache holds the
        cross-attention keys/values).
      encoder_mask: int/bool[B, S].
      decoder_attention_mask: optional int/bool[B, T] (teacher forcing only).
      cache: None (teacher forcing) or the dict from `init_cache` (then the
        tokens sit at slots cache_index..cache_index+T-1).
      cache_index: int32 scalar, the slot of the first token.

    Returns:
      logits float[B, T, V] without a cache; (logits, new cache) with one.
    """
    t = decoder_input_ids.shape[1]
    x = self.embed(decoder_input_ids)
    if cache is None:
      num_keys, cache_index = t, 0
    else:
      num_keys = jax.tree.leaves(cache["k"])[0].shape[-2]
    query_pos = cache_index + jnp.arange(t)
    bias = self._position_bias(self.decoder_position_bias, query_pos, num_keys,
                               num_keys, bidirectional=False)
    allowed = (jnp.arange(num_keys)[None, :] <= query_pos[:, None])[None, None]
    if decoder_attention_mask is not None:
      allowed = allowed & decoder_attention_mask.astype(bool)[:, None, None, :]
    bias = bias + jnp.where(allowed, 0.0, mask_value(jnp.float32))
    cross_bias = padding_bias(encoder_mask)
    x, new_cache = run_stack(self.decoder_layers, x, bias, encoder_hidden, cross_bias,
                             jnp.asarray(cache_index, jnp.int32), cache=cache, cache_arg=3,
                             stacked_cache=False)
    logits = self.head(self.decoder_norm(x))
    return logits if cache is None else (logits, new_cache)

  def head(self, x: Array) -> Array:
    """float[B, T, D] decoder states -> float[B, T, V] logits."""
    c = self.config
    if c.scale_decoder_outputs:
      x = x * (c.d_model ** -0.5)
    if c.tie_word_embeddings:
      logits = jnp.einsum("btd,vd->btv", x, self.shared.astype(self.dtype))
    else:
      logits = self.lm_head(x)
    return nn.with_logical_constraint(logits, ("batch", "length", "vocab"))

  def __call__(self, inputs_embeds: Array, attention_mask: Array,
               decoder_input_ids: Array, decoder_attention_mask: Array | None = None
               ) -> Array:
    """Teacher-forced logits float[B, T, V]."""
    encoded = self.encode(inputs_embeds, attention_mask)
    return self.decode(decoder_input_ids, encoded, attention_mask,
                       decoder_attention_mask=decoder_attention_mask)


def padding_bias(mask: Array) -> Array:
  """int/bool[B, S] key mask -> float[B, 1, 1, S] additive bias."""
  return jnp.where(mask.astype(bool), 0.0, mask_value(jnp.float32))[:, None, None, :]


def stack_layers(params: dict, prefixes: tuple[str, ...]) -> dict:
  """Unscanned params (`name_0/...`, `name_1/...`) -> the scan_layers layout.

  Args:
    params: a param dict of a model built with scan_layers=False.
    prefixes: the stack names, e.g. ("encoder_layers", "decoder_layers").

  Returns:
    the same params with each stack's leaves stacked on a leading `layers` axis
    under `name/...`.
  """
  flat = traverse_util.flatten_dict(params)
  out, groups = {}, {}
  for key, value in flat.items():
    head = key[0].rsplit("_", 1)
    if head[0] in prefixes and head[-1].isdigit():
      groups.setdefault((head[0],) + key[1:], {})[int(head[1])] = value
    else:
      out[key] = value
  for key, layers in groups.items():
    out[key] = jnp.stack([layers[i] for i in sorted(layers)])
  return traverse_util.unflatten_dict(out)
