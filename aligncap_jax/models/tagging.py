"""Tagging head and the latent feature refinement's region side (DESIGN.md section 3).

The tag vocabulary is embedded once by the frozen CLIP text encoder (pooled
output) and passed in as `tag_embeddings` float[V, Dclip]; a Linear adapter maps
it to the head width. Tags never attend to each other (no self-attention).
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from aligncap_jax.models import layers

Dtype = Any


class TaggingHead(nn.Module):
  """Tag queries cross-attend to the region latents; one logit per tag.

  Attributes:
    dim: head width (256 in the reference).
    num_heads: attention heads (4).
    mlp_dim: FFN width (1024).
    num_layers: [cross-attention + FFN] layers (2).
  """
  dim: int = 256
  num_heads: int = 4
  mlp_dim: int = 1024
  num_layers: int = 2
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  def setup(self):
    self.tag_adapter = layers.dense(self.dim, ("embed", "mlp"), "tag_adapter",
                                    self.dtype, self.param_dtype)
    self.latent_proj = layers.dense(self.dim, ("embed", "mlp"), "latent_proj",
                                    self.dtype, self.param_dtype)
    self.blocks = [layers.CrossAttentionLayer(self.num_heads, self.mlp_dim, self.dtype,
                                              self.param_dtype, name=f"layer{i}")
                   for i in range(self.num_layers)]
    self.classifier = layers.dense(1, ("mlp", None), "classifier", self.dtype, self.param_dtype)

  def adapt_tags(self, tag_embeddings):
    """float[V, Dclip] -> float[V, dim]: the adapted (refined) tag features."""
    return self.tag_adapter(tag_embeddings)

  def __call__(self, latents, tag_embeddings):
    """Args: latents float[B, Q, H]; tag_embeddings float[V, Dclip].

    Returns:
      (logits float[B, V], adapted tags float[V, dim]).
    """
    tags = self.adapt_tags(tag_embeddings)
    mem = self.latent_proj(latents)
    x = jnp.broadcast_to(tags[None], (latents.shape[0],) + tags.shape)
    x = nn.with_logical_constraint(x, ("batch", "tags", "mlp"))
    for block in self.blocks:
      x = block(x, mem)
    return self.classifier(x)[..., 0].astype(jnp.float32), tags


class ConditionedTagFeatures(nn.Module):
  """Image-conditioned tagging features V_i (L_cond's region side).

  Region latents projected to `dim` query the adapted tag embeddings:
  cross-attention(q = latents, k = v = tags) -> float[B, Q, dim].
  """
  dim: int = 256
  num_heads: int = 4
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, latents, adapted_tags):
    q = layers.dense(self.dim, ("embed", "mlp"), "latent_proj", self.dtype,
                     self.param_dtype)(latents)
    kv = jnp.broadcast_to(adapted_tags[None], (latents.shape[0],) + adapted_tags.shape)
    a = layers.Attention(self.num_heads, self.dtype, self.param_dtype, name="attn")(q, kv, kv)
    return layers.layer_norm("norm", self.dtype, self.param_dtype)(q + a)
