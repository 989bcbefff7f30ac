"""The paper's "fine-grained contrastive learning module" as a pairwise scorer.

s_ij = Linear(dim -> 1)(L2norm(H(q = u_j, kv = V_i))), where H is `num_layers` x
[cross-attention (query = caption j's running state, keys/values = region i's
tokens) + FFN (GELU)], post-LN as in BERT, no self-attention (DESIGN.md §3).

The key/value projections depend on the region only, so `project_regions` runs
once per region; `score` runs the per-pair part for every (region, caption) pair
of a block at once. `make_score_fn` adapts the module to the `score_fn(params,
rows, cols)` contract of `aligncap_jax.losses.pairwise_sigmoid_loss`, with rows =
the projected pytree, so chunked and ring losses pass the projections, not the
raw tokens.
"""
from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from aligncap_jax.models.vit import DenseGeneral
from aligncap_jax.ops import dot_product_attention, gelu_exact

Dtype = Any


class PairwiseScorer(nn.Module):
  """Cross-attention scorer of (region token set, caption vector) pairs.

  Attributes:
    dim: width of region tokens, caption vectors and the running state.
    num_heads: attention heads (dim must be divisible by it).
    mlp_dim: FFN hidden width.
    num_layers: number of [cross-attention + FFN] layers.
    layer_norm_eps: LayerNorm epsilon (BERT's 1e-12).
    dtype: compute dtype (softmax, LayerNorm statistics and the score are float32).
    param_dtype: parameter dtype.
  """
  dim: int = 256
  num_heads: int = 4
  mlp_dim: int = 1024
  num_layers: int = 2
  layer_norm_eps: float = 1e-12
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @property
  def _stat_dtype(self) -> jnp.dtype:
    """float32 (float64 when computing in float64): LayerNorm, L2 norm, score."""
    return jnp.promote_types(self.dtype, jnp.float32)

  def setup(self):
    if self.dim % self.num_heads:
      raise ValueError(
          f"PairwiseScorer: dim={self.dim} is not divisible by num_heads={self.num_heads}")
    head_dim = self.dim // self.num_heads
    init = nn.initializers.lecun_normal()
    zeros = nn.initializers.zeros_init()
    ones = nn.initializers.ones_init()

    def proj(name, axes_in, feats, axes_out, axis=-1):
      return DenseGeneral(
          feats, axis=axis, dtype=self.dtype, param_dtype=self.param_dtype, name=name,
          kernel_init=nn.with_logical_partitioning(init, axes_in + axes_out),
          bias_init=nn.with_logical_partitioning(zeros, axes_out))

    def norm(name):
      return nn.LayerNorm(
          epsilon=self.layer_norm_eps, dtype=self._stat_dtype, param_dtype=self.param_dtype,
          name=name, scale_init=nn.with_logical_partitioning(ones, ("embed",)),
          bias_init=nn.with_logical_partitioning(zeros, ("embed",)))

    heads = (self.num_heads, head_dim)
    self.query = [proj(f"layer_{l}_query", ("embed",), heads, ("heads", "kv"))
                  for l in range(self.num_layers)]
    self.key = [proj(f"layer_{l}_key", ("embed",), heads, ("heads", "kv"))
                for l in range(self.num_layers)]
    self.value = [proj(f"layer_{l}_value", ("embed",), heads, ("heads", "kv"))
                  for l in range(self.num_layers)]
    self.attn_out = [proj(f"layer_{l}_attn_out", ("heads", "kv"), self.dim, ("embed",),
                          axis=(-2, -1)) for l in range(self.num_layers)]
    self.attn_norm = [norm(f"layer_{l}_attn_norm") for l in range(self.num_layers)]
    self.mlp_in = [proj(f"layer_{l}_mlp_in", ("embed",), self.mlp_dim, ("mlp",))
                   for l in range(self.num_layers)]
    self.mlp_out = [proj(f"layer_{l}_mlp_out", ("mlp",), self.dim, ("embed",))
                    for l in range(self.num_layers)]
    self.mlp_norm = [norm(f"layer_{l}_mlp_norm") for l in range(self.num_layers)]
    self.head = proj("score_head", ("embed",), 1, (None,))

  def project_regions(self, tokens: jax.Array, mask: jax.Array | None = None) -> dict:
    """Per-region part: the keys and values of every layer.

    Args:
      tokens: float[N, L, dim] region tokens V_i.
      mask: optional bool[N, L]; False marks padding tokens.

    Returns:
      {"keys": (float[N, L, heads, dim/heads],) * num_layers, "values": same,
       "mask": bool[N, L]}: a pytree whose leaves all lead with N.
    """
    if tokens.ndim != 3 or tokens.shape[-1] != self.dim:
      raise ValueError(
          f"PairwiseScorer.project_regions: tokens must be [N, L, {self.dim}], got {tokens.shape}")
    if mask is None:
      mask = jnp.ones(tokens.shape[:2], bool)
    elif mask.shape != tokens.shape[:2]:
      raise ValueError(
          f"PairwiseScorer.project_regions: mask must be {tokens.shape[:2]}, got {mask.shape}")
    tokens = nn.with_logical_constraint(tokens, ("batch", "length", "embed"))
    return {"keys": tuple(k(tokens) for k in self.key),
            "values": tuple(v(tokens) for v in self.value),
            "mask": mask.astype(bool)}

  def score(self, rows: dict, captions: jax.Array) -> jax.Array:
    """Per-pair part: scores every region of `rows` against every caption.

    Args:
      rows: the pytree of `project_regions` for N regions.
      captions: float[M, dim] caption vectors u_j.

    Returns:
      float32[N, M] scores s_ij.

    No sharding constraints here: the losses call this inside `lax.scan` and
    `shard_map` blocks, where the caller owns the layout.
    """
    if captions.ndim != 2 or captions.shape[-1] != self.dim:
      raise ValueError(
          f"PairwiseScorer.score: captions must be [M, {self.dim}], got {captions.shape}")
    n = rows["mask"].shape[0]
    m = captions.shape[0]
    mask = rows["mask"][:, None, None, :]                       # [N, 1, 1, L]
    x = jnp.broadcast_to(captions.astype(self.dtype)[None], (n, m, self.dim))
    for l in range(self.num_layers):
      q = self.query[l](x)                                      # [N, M, H, Dh]
      attn = dot_product_attention(q, rows["keys"][l], rows["values"][l], mask)
      x = self.attn_norm[l](x + self.attn_out[l](attn)).astype(self.dtype)
      h = gelu_exact(self.mlp_in[l](x))
      x = self.mlp_norm[l](x + self.mlp_out[l](h)).astype(self.dtype)
    x = x.astype(self._stat_dtype)
    x = x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=-1, keepdims=True), 1e-24))
    return self.head(x.astype(self.dtype))[..., 0].astype(self._stat_dtype)

  def __call__(self, tokens: jax.Array, mask: jax.Array | None,
               captions: jax.Array) -> jax.Array:
    """float[N, L, dim], bool[N, L] | None, float[M, dim] -> float32[N, M]."""
    return self.score(self.project_regions(tokens, mask), captions)


def make_score_fn(module: PairwiseScorer) -> Callable[[Any, dict, jax.Array], jax.Array]:
  """`score_fn(variables, rows, cols) -> float32[r, c]` for the pairwise losses.

  `variables` is the module's variable dict (`{"params": ...}`), `rows` the
  pytree of `project_regions` and `cols` float[c, dim] caption vectors.
  """
  def score_fn(variables: Any, rows: dict, cols: jax.Array) -> jax.Array:
    return module.apply(variables, rows, cols, method=PairwiseScorer.score)
  return score_fn
