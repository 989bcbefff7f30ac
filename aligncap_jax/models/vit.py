"""Frozen image encoders: BLIP-2's EVA ViT-g, CLIP ViT and SigLIP ViT.

One pre-LN Vision Transformer covers the three Hugging Face families; they differ
only in the embedding (class token or not, patch bias or not) and in where the
layer norms sit:

* `blip2`: class token, patch conv with bias, fused qkv projection without a key
  bias; the output is `post_layernorm(encoder(x))`, i.e. BLIP-2's frozen
  `ln_vision` is part of the tower.
* `clip`: class token, patch conv without bias, `pre_layrnorm` before the
  encoder; the output is the encoder output (HF `last_hidden_state`, which has
  no `post_layernorm` on the tokens).
* `siglip`: no class token, patch conv with bias, `post_layernorm` at the end;
  the mean of the patch tokens is prepended in place of a class token
  (DESIGN.md section 10), so every family returns `1 + (S / patch)^2` tokens.

The transformer layer, attention and MLP defined here are shared with the CLIP
text encoder (`clip_text.py`).
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from aligncap_jax.ops import activations as ops_activations

Dtype = Any

FAMILIES = ("blip2", "clip", "siglip")


def _quick_gelu(x: jax.Array) -> jax.Array:
  return x * jax.nn.sigmoid(1.702 * x)


_ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "gelu": ops_activations.gelu_exact,
    "gelu_new": functools.partial(jax.nn.gelu, approximate=True),
    "gelu_pytorch_tanh": functools.partial(jax.nn.gelu, approximate=True),
    "quick_gelu": _quick_gelu,
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
}


def activation(name: str) -> Callable[[jax.Array], jax.Array]:
  """The Hugging Face activation `name` (`ACT2FN` semantics) as a jnp function."""
  if name not in _ACTIVATIONS:
    raise ValueError(f"unknown hidden_act {name!r}; known: {sorted(_ACTIVATIONS)}")
  return _ACTIVATIONS[name]


def layer_norm(eps: float, dtype: Dtype, param_dtype: Dtype, name: str) -> nn.LayerNorm:
  """LayerNorm with torch's two-pass variance and logical axes on its params."""
  return nn.LayerNorm(
      epsilon=eps, dtype=dtype, param_dtype=param_dtype, use_fast_variance=False,
      scale_init=nn.with_logical_partitioning(nn.initializers.ones, ("embed",)),
      bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)),
      name=name)


def _flat_then_reshape(init: Callable, num_in: int) -> Callable:
  """`init` drawn at DenseGeneral's flattened (fan_in, fan_out) shape, reshaped to full rank.

  Keeps flax's `nn.DenseGeneral` initial values (same key, same flat draw) while a
  logical box receives the full-rank value, so its constraint is applied at the
  kernel's true rank.
  """

  def wrapped(rng, shape, dtype=jnp.float32):
    flat = (math.prod(shape[:num_in]), math.prod(shape[num_in:]))
    value = init(rng, flat, dtype)
    if isinstance(value, nn.meta.AxisMetadata):
      return value.replace_boxed(jnp.reshape(value.value, shape))
    return jnp.reshape(value, shape)

  return wrapped


class DenseGeneral(nn.Module):
  """`nn.DenseGeneral` (no batch dims) whose logically boxed params work under a mesh.

  flax's DenseGeneral initialises a flattened rank-2 kernel and unboxes it before
  reshaping, so under `jax.set_mesh` the box's full-rank logical constraint hits
  a rank-2 value ("only valid for values of rank at least 4"). Here the kernel
  `float[*in_dims, *features]` and bias `float[*features]` are created at full
  rank (same initial values as flax's) and contracted with `lax.dot_general`.

  Attributes:
    features: output feature dims (an int or a tuple).
    axis: input axes contracted (an int or a tuple), in kernel order.
    use_bias: add a bias `float[*features]`.
    kernel_init: initializer called with the flattened (fan_in, fan_out) shape
      (optionally wrapped by `nn.with_logical_partitioning` with full-rank names).
    bias_init: initializer called with the flattened (prod(features),) shape.
  """
  features: int | tuple[int, ...]
  axis: int | tuple[int, ...] = -1
  use_bias: bool = True
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  kernel_init: Callable = nn.initializers.lecun_normal()
  bias_init: Callable = nn.initializers.zeros_init()
  precision: Any = None

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """float[..., *in_dims] -> float[..., *features] (in_dims at `axis`)."""
    features = (self.features,) if isinstance(self.features, int) else tuple(self.features)
    axis = (self.axis,) if isinstance(self.axis, int) else tuple(self.axis)
    axis = tuple(a % x.ndim for a in axis)
    in_dims = tuple(x.shape[a] for a in axis)
    kernel = self.param("kernel", _flat_then_reshape(self.kernel_init, len(in_dims)),
                        in_dims + features, self.param_dtype)
    bias = None
    if self.use_bias:
      bias = self.param("bias", _flat_then_reshape(self.bias_init, 0), features,
                        self.param_dtype)
    x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
    contract = tuple(range(len(in_dims)))
    y = jax.lax.dot_general(x, kernel, ((axis, contract), ((), ())), precision=self.precision)
    if bias is not None:
      y = y + jnp.reshape(bias, (1,) * (y.ndim - len(features)) + features)
    return y


def dense(features: int | tuple[int, ...], axes: tuple[str | None, ...], *,
          dtype: Dtype, param_dtype: Dtype, name: str, use_bias: bool = True,
          axis: int | tuple[int, ...] = -1) -> DenseGeneral:
  """DenseGeneral with logical axes: `axes` names the kernel dims (inputs then outputs)."""
  n_out = 1 if isinstance(features, int) else len(features)
  return DenseGeneral(
      features=features, axis=axis, use_bias=use_bias, dtype=dtype,
      param_dtype=param_dtype,
      kernel_init=nn.with_logical_partitioning(
          nn.initializers.lecun_normal(), axes),
      bias_init=nn.with_logical_partitioning(nn.initializers.zeros, axes[-n_out:]),
      name=name)


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array,
                          mask: jax.Array | None = None, *, dropout_rate: float = 0.0,
                          dropout_rng: jax.Array | None = None) -> jax.Array:
  """Scaled dot-product attention, softmax in float32.

  Args:
    q: float[B, Lq, H, D].
    k: float[B, Lk, H, D].
    v: float[B, Lk, H, D].
    mask: optional bool, broadcastable to [B, H, Lq, Lk]; False = not attended.
    dropout_rate: dropout on the attention probabilities (needs dropout_rng).
    dropout_rng: PRNG key; None = no dropout.

  Returns:
    float[B, Lq, H, D] in q's dtype.
  """
  scale = q.shape[-1] ** -0.5
  # Heads-major operands ([B, H, Lq, D] @ [B, H, D, Lk], then @ [B, H, Lk, D]):
  # XLA's CPU matmuls read these without a transposed copy inside the dot; the
  # einsum over [B, L, H, D] ran 3x slower at ViT-B/16 shapes (issue 20).
  qh = jnp.swapaxes(q, 1, 2)
  kh = jnp.transpose(k, (0, 2, 3, 1))
  vh = jnp.swapaxes(v, 1, 2)
  logits = jnp.matmul(qh, kh, preferred_element_type=jnp.float32) * scale
  if mask is not None:
    logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
  if dropout_rate > 0.0 and dropout_rng is not None:
    probs = jax.nn.softmax(logits, axis=-1)
    keep = jax.random.bernoulli(dropout_rng, 1.0 - dropout_rate, probs.shape)
    probs = jnp.where(keep, probs / (1.0 - dropout_rate), 0.0)
    out = jnp.matmul(probs.astype(v.dtype), vh)
  else:
    # Softmax normalised after the value product: divides [Lq, D], not [Lq, Lk].
    e = jnp.exp(logits - jax.lax.stop_gradient(jnp.max(logits, axis=-1, keepdims=True)))
    out = (jnp.matmul(e.astype(v.dtype), vh, preferred_element_type=jnp.float32)
           / jnp.sum(e, axis=-1, keepdims=True)).astype(v.dtype)
  return jnp.swapaxes(out, 1, 2)


class SelfAttention(nn.Module):
  """Multi-head self-attention with a fused qkv kernel `float[C, 3, H, D]`."""
  num_heads: int
  qkv_bias: bool = True
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    """x: float[B, L, C]; mask: bool broadcastable to [B, H, L, L] -> float[B, L, C]."""
    c = x.shape[-1]
    if c % self.num_heads:
      raise ValueError(f"hidden size {c} is not divisible by num_heads {self.num_heads}")
    head_dim = c // self.num_heads
    qkv = dense((3, self.num_heads, head_dim), ("embed", None, "heads", "kv"),
                use_bias=self.qkv_bias, dtype=self.dtype,
                param_dtype=self.param_dtype, name="qkv")(x)
    qkv = nn.with_logical_constraint(qkv, ("batch", "length", None, "heads", "kv"))
    out = dot_product_attention(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], mask)
    return dense(c, ("heads", "kv", "embed"), axis=(-2, -1), dtype=self.dtype,
                 param_dtype=self.param_dtype, name="out")(out)


class Mlp(nn.Module):
  """fc1 -> activation -> fc2."""
  mlp_dim: int
  hidden_act: str
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """float[B, L, C] -> float[B, L, C]."""
    h = dense(self.mlp_dim, ("embed", "mlp"), dtype=self.dtype,
              param_dtype=self.param_dtype, name="fc1")(x)
    h = nn.with_logical_constraint(activation(self.hidden_act)(h),
                                   ("batch", "length", "mlp"))
    return dense(x.shape[-1], ("mlp", "embed"), dtype=self.dtype,
                 param_dtype=self.param_dtype, name="fc2")(h)


class EncoderLayer(nn.Module):
  """Pre-LN transformer layer (CLIP / SigLIP / BLIP-2 vision and CLIP text).

  `x + attn(ln1(x))`, then `x + mlp(ln2(x))`. Returns `(x, None)` so that it can
  be scanned.
  """
  num_heads: int
  mlp_dim: int
  layer_norm_eps: float
  hidden_act: str
  qkv_bias: bool = True
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, mask: jax.Array | None = None):
    """x: float[B, L, C]; mask: bool broadcastable to [B, H, L, L] -> (float[B, L, C], None)."""
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    h = layer_norm(self.layer_norm_eps, name="ln1", **kw)(x)
    x = x + SelfAttention(self.num_heads, self.qkv_bias, name="attn", **kw)(h, mask)
    h = layer_norm(self.layer_norm_eps, name="ln2", **kw)(x)
    x = x + Mlp(self.mlp_dim, self.hidden_act, name="mlp", **kw)(h)
    return nn.with_logical_constraint(x, ("batch", "length", "embed")), None


def apply_layers(layer_cls: type[nn.Module], layer_kwargs: dict, num_layers: int,
                 x: jax.Array, *broadcast_args: Any, scan_layers: bool,
                 remat: bool, name: str = "layers") -> jax.Array:
  """Runs `num_layers` copies of `layer_cls` on x inside the calling compact method.

  Unscanned, the layers are submodules `{name}_0 ... {name}_{n-1}`; scanned, one
  submodule `{name}` whose params carry a leading `layers` axis of size n. Both
  compute the same numbers. `layer_cls(**layer_kwargs)(x, *broadcast_args)` must
  return `(x, None)`.
  """
  cls = nn.remat(layer_cls, prevent_cse=not scan_layers) if remat else layer_cls
  if scan_layers:
    stack = nn.scan(
        cls, variable_axes={"params": 0}, split_rngs={"params": True, "dropout": True},
        in_axes=(nn.broadcast,) * len(broadcast_args), length=num_layers,
        metadata_params={nn.PARTITION_NAME: "layers"})
    x, _ = stack(**layer_kwargs, name=name)(x, *broadcast_args)
    return x
  for i in range(num_layers):
    x, _ = cls(**layer_kwargs, name=f"{name}_{i}")(x, *broadcast_args)
  return x


@dataclasses.dataclass(frozen=True)
class VisionConfig:
  """Sizes of a ViT tower (field names follow `config.model.vision`)."""
  family: str = "blip2"
  image_size: int = 224
  patch_size: int = 14
  hidden_size: int = 1408
  num_layers: int = 39
  num_heads: int = 16
  mlp_dim: int = 6144
  layer_norm_eps: float = 1e-6
  hidden_act: str = "gelu"
  qkv_bias: bool = True
  scan_layers: bool = False
  remat: bool = False

  def __post_init__(self):
    if self.family not in FAMILIES:
      raise ValueError(f"VisionConfig.family must be one of {FAMILIES}, got {self.family!r}")
    if self.image_size % self.patch_size:
      raise ValueError(f"VisionConfig.image_size {self.image_size} is not a multiple of "
                       f"patch_size {self.patch_size}")
    if self.hidden_size % self.num_heads:
      raise ValueError(f"VisionConfig.hidden_size {self.hidden_size} is not divisible by "
                       f"num_heads {self.num_heads}")
    activation(self.hidden_act)

  @property
  def grid_size(self) -> int:
    return self.image_size // self.patch_size

  @property
  def num_tokens(self) -> int:
    """1 + P: class token (or patch mean for siglip) + patches."""
    return 1 + self.grid_size ** 2

  @classmethod
  def tiny(cls, family: str = "blip2", **overrides) -> VisionConfig:
    """A 2-layer, 32-wide tower on 28 px images (2 x 2 patches of 14)."""
    kw = dict(family=family, image_size=28, patch_size=14, hidden_size=32,
              num_layers=2, num_heads=4, mlp_dim=64,
              layer_norm_eps={"blip2": 1e-6, "clip": 1e-5, "siglip": 1e-6}[family],
              hidden_act={"blip2": "gelu", "clip": "quick_gelu",
                          "siglip": "gelu_pytorch_tanh"}[family])
    kw.update(overrides)
    return cls(**kw)

  @classmethod
  def from_hf(cls, hf: dict, family: str, **overrides) -> VisionConfig:
    """From a HF vision config dict (`Blip2VisionConfig`, `CLIPVisionConfig`,
    `SiglipVisionConfig`); missing keys take transformers' defaults."""
    defaults = {
        "blip2": dict(hidden_size=1408, intermediate_size=6144, num_hidden_layers=39,
                      num_attention_heads=16, image_size=224, patch_size=14,
                      hidden_act="gelu", layer_norm_eps=1e-6, qkv_bias=True),
        "clip": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                     num_attention_heads=12, image_size=224, patch_size=32,
                     hidden_act="quick_gelu", layer_norm_eps=1e-5),
        "siglip": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                       num_attention_heads=12, image_size=224, patch_size=16,
                       hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6),
    }
    if family not in defaults:
      raise ValueError(f"unknown vision family {family!r}; known: {FAMILIES}")
    d = {**defaults[family], **hf}
    if d.get("num_channels", 3) != 3:
      raise ValueError(f"vision config num_channels={d['num_channels']}; only 3 is supported")
    kw = dict(family=family, image_size=d["image_size"], patch_size=d["patch_size"],
              hidden_size=d["hidden_size"], num_layers=d["num_hidden_layers"],
              num_heads=d["num_attention_heads"], mlp_dim=d["intermediate_size"],
              layer_norm_eps=d["layer_norm_eps"], hidden_act=d["hidden_act"],
              qkv_bias=bool(d.get("qkv_bias", True)))
    kw.update(overrides)
    return cls(**kw)

  def to_hf(self) -> dict:
    """The HF config fields this config fixes (for checking a checkpoint folder)."""
    d = dict(hidden_size=self.hidden_size, intermediate_size=self.mlp_dim,
             num_hidden_layers=self.num_layers, num_attention_heads=self.num_heads,
             image_size=self.image_size, patch_size=self.patch_size,
             hidden_act=self.hidden_act, layer_norm_eps=self.layer_norm_eps)
    if self.family == "blip2":
      d["qkv_bias"] = self.qkv_bias
    return d

  @classmethod
  def from_config(cls, cd, **overrides) -> VisionConfig:
    """From `config.model.vision` (a ConfigDict); `overrides` set the rest
    (e.g. `scan_layers=config.model.scan_layers, remat=config.model.remat`)."""
    return cls(**fields_from_config(cls, cd, "model.vision"), **overrides)


def fields_from_config(cls, cd, where: str) -> dict:
  """The items of ConfigDict `cd` as kwargs of dataclass `cls`; an unknown field is
  a ValueError naming `where.field`."""
  known = {f.name for f in dataclasses.fields(cls)}
  items = dict(cd.items())
  unknown = sorted(set(items) - known)
  if unknown:
    raise ValueError(f"config fields {[f'{where}.{k}' for k in unknown]} are not "
                     f"{cls.__name__} fields ({sorted(known)})")
  return items


def _logical(init, axes):
  return nn.with_logical_partitioning(init, axes)


class VisionTransformer(nn.Module):
  """A frozen ViT tower; see the module docstring for the three families."""
  config: VisionConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, pixel_values: jax.Array, deterministic: bool = True,
               patch_bias: jax.Array | None = None) -> jax.Array:
    """Encodes images.

    Args:
      pixel_values: float[B, S, S, 3], NHWC, already normalised; S must be the
        native `config.image_size`.
      deterministic: unused (the towers have no dropout); kept for a uniform API.
      patch_bias: optional float[B, (S / patch)^2, C] added to the patch
        embeddings (row-major grid) before the class token and the position
        embeddings: how a caller marks image areas (AlignCap's target-box prompt).

    Returns:
      float[B, 1 + (S / patch)^2, C]: HF `last_hidden_state` (blip2 includes
      `ln_vision`; siglip has the patch mean prepended).
    """
    del deterministic
    cfg = self.config
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    if pixel_values.ndim != 4 or pixel_values.shape[-1] != 3:
      raise ValueError(f"pixel_values must be [B, S, S, 3] (NHWC), got {pixel_values.shape}")
    b, h, w, _ = pixel_values.shape
    if (h, w) != (cfg.image_size, cfg.image_size):
      raise ValueError(f"image size {h}x{w} differs from the tower's native "
                       f"{cfg.image_size}x{cfg.image_size} (position embeddings are not "
                       "interpolated)")
    x = nn.Conv(
        cfg.hidden_size, (cfg.patch_size, cfg.patch_size),
        strides=(cfg.patch_size, cfg.patch_size), padding="VALID",
        use_bias=cfg.family != "clip",
        kernel_init=_logical(nn.initializers.lecun_normal(), (None, None, None, "embed")),
        bias_init=_logical(nn.initializers.zeros, ("embed",)),
        name="patch_embed", **kw)(pixel_values.astype(self.dtype))
    x = x.reshape(b, -1, cfg.hidden_size)
    if patch_bias is not None:
      if patch_bias.shape != x.shape:
        raise ValueError(f"patch_bias must be {x.shape}, got {patch_bias.shape}")
      x = x + patch_bias.astype(self.dtype)
    num_pos = x.shape[1] + (cfg.family != "siglip")
    if cfg.family != "siglip":
      cls_token = self.param("cls_token", _logical(nn.initializers.normal(0.02), ("embed",)),
                             (cfg.hidden_size,), self.param_dtype)
      cls_token = jnp.broadcast_to(cls_token.astype(self.dtype), (b, 1, cfg.hidden_size))
      x = jnp.concatenate([cls_token, x], axis=1)
    pos = self.param("pos_embed", _logical(nn.initializers.normal(0.02), (None, "embed")),
                     (num_pos, cfg.hidden_size), self.param_dtype)
    x = x + pos.astype(self.dtype)[None]
    x = nn.with_logical_constraint(x, ("batch", "length", "embed"))
    if cfg.family == "clip":
      x = layer_norm(cfg.layer_norm_eps, name="pre_norm", **kw)(x)
    layer_kwargs = dict(num_heads=cfg.num_heads, mlp_dim=cfg.mlp_dim,
                        layer_norm_eps=cfg.layer_norm_eps, hidden_act=cfg.hidden_act,
                        qkv_bias=cfg.qkv_bias, **kw)
    x = apply_layers(EncoderLayer, layer_kwargs, cfg.num_layers, x,
                     scan_layers=cfg.scan_layers, remat=cfg.remat)
    if cfg.family != "clip":
      x = layer_norm(cfg.layer_norm_eps, name="post_norm", **kw)(x)
    if cfg.family == "siglip":
      x = jnp.concatenate([x.mean(axis=1, keepdims=True), x], axis=1)
    return nn.with_logical_constraint(x, ("batch", "length", "embed"))
