"""AlignCap: the whole model, per region (DESIGN.md sections 3 and 4).

views ─ ViT (frozen) ─ RoI-align (target box in every view) ─ cross-view block
─ view fusion ─ Q-Former sampler ─┬─ tagging head ─────────────── L_tag (ASL)
                                  ├─ conditioned tag features ─── L_cond (pairwise sigmoid)
                                  └─ language projection ─ [latents ; tag prompt] ─┬─ L_multi
                                                                                   └─ LLM ─ L_cap
"""
from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from aligncap_jax import losses as losses_lib
from aligncap_jax import ops
from aligncap_jax.models import clip_text as clip_text_lib
from aligncap_jax.models import cross_view as cross_view_lib
from aligncap_jax.models import decoder_lm as decoder_lm_lib
from aligncap_jax.models import generate as generate_lib
from aligncap_jax.models import layers
from aligncap_jax.models import pairwise_scorer as scorer_lib
from aligncap_jax.models import prompt as prompt_lib
from aligncap_jax.models import qformer as qformer_lib
from aligncap_jax.models import t5 as t5_lib
from aligncap_jax.models import tagging as tagging_lib
from aligncap_jax.models import vit as vit_lib

Dtype = Any

# Per-family image normalisation (the towers' own preprocessors).
PIXEL_STATS = {
    "blip2": ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)),
    "clip": ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)),
    "siglip": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
}


def _tower_config(cls, cd, model_cfg, **extra):
  cfg = cls.from_config(cd, **extra) if extra else cls.from_config(cd)
  names = {f.name for f in dataclasses.fields(cfg)}
  upd = {k: bool(model_cfg[k]) for k in ("scan_layers", "remat") if k in names}
  return dataclasses.replace(cfg, **upd)


def llm_module(config) -> nn.Module:
  """The (unbound) LLM module of a config, as the model builds it."""
  m = config.model
  dt = jnp.dtype(m.frozen_dtype)
  if m.llm.family == "t5":
    return t5_lib.T5(_tower_config(t5_lib.T5Config, m.llm, m), dtype=dt, param_dtype=dt)
  return decoder_lm_lib.DecoderLM(_tower_config(decoder_lm_lib.DecoderLMConfig, m.llm, m),
                                  dtype=dt, param_dtype=dt)


class AlignCap(nn.Module):
  """AlignCap over a batch of regions (the batch contract of DESIGN.md section 10).

  Attributes:
    config: the full (frozen) config; `model`, `loss` and `data` are read.
    num_tags: size V of the tag vocabulary the data was built with.
  """
  config: ml_collections.FrozenConfigDict
  num_tags: int

  def setup(self):
    m = self.config.model
    dt, pdt = jnp.dtype(m.dtype), jnp.float32
    fdt = jnp.dtype(m.frozen_dtype)
    self.vision = vit_lib.VisionTransformer(
        _tower_config(vit_lib.VisionConfig, m.vision, m), dtype=fdt, param_dtype=fdt)
    if m.target_box_prompt:
      # Departure (DESIGN.md section 10): a learned vector added to the ViT's patch
      # embeddings in proportion to how much of each patch the target box covers,
      # in every view, so a context view says which object is the target and where.
      # Zero at init: a frozen pretrained tower starts out unchanged.
      self.target_embedding = self.param(
          "target_embedding", nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)),
          (m.vision.hidden_size,), pdt)
    if m.view_box_embedding and m.view_box_hidden > 0:
      self.view_box_hidden = layers.dense(m.view_box_hidden, (None, "mlp"), "view_box_hidden",
                                          dt, pdt)
    if m.view_box_embedding:
      self.view_box_proj = nn.Dense(
          m.vision.hidden_size, dtype=dt, param_dtype=pdt, name="view_box_proj",
          kernel_init=nn.with_logical_partitioning(nn.initializers.zeros, (None, "embed")),
          bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)))
    if m.context_tokens > 0:
      self.context_target_embedding = self.param(
          "context_target_embedding",
          nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)),
          (m.vision.hidden_size,), pdt)
    self.qformer = qformer_lib.QFormer(
        _tower_config(qformer_lib.QFormerConfig, m.qformer, m), dtype=dt, param_dtype=pdt)
    self.clip_text = clip_text_lib.CLIPTextEncoder(
        _tower_config(clip_text_lib.CLIPTextConfig, m.clip_text, m), dtype=fdt, param_dtype=fdt)
    self.llm = llm_module(self.config)
    cv = m.cross_view
    self.cross_view = cross_view_lib.CrossViewBlock(
        cv.num_heads, cv.mlp_ratio, cv.dropout, cv.value_from, dt, pdt)
    self.view_fusion = cross_view_lib.ViewFusion(dt, pdt)
    d_model = m.llm.d_model
    self.language_projection = layers.dense(d_model, ("mlp", "embed"), "language_projection",
                                            dt, pdt)
    tg, sc = m.tagging, m.scorer
    self.tagging = tagging_lib.TaggingHead(tg.dim, tg.num_heads, tg.mlp_dim, tg.num_layers, dt, pdt)
    # L_cond: image-conditioned tag features vs CLIP caption features.
    self.cond_region = tagging_lib.ConditionedTagFeatures(sc.dim, sc.num_heads, dt, pdt)
    self.cond_caption_proj = layers.dense(sc.dim, ("embed", "mlp"), "cond_caption_proj", dt, pdt)
    # L_multi: LLM encoder input vs LLM embeddings of the caption.
    self.multi_region_proj = layers.dense(sc.dim, ("embed", "mlp"), "multi_region_proj", dt, pdt)
    self.multi_caption_proj = layers.dense(sc.dim, ("embed", "mlp"), "multi_caption_proj", dt, pdt)
    if m.similarity == "cross_attention":
      kw = dict(dim=sc.dim, num_heads=sc.num_heads, mlp_dim=sc.mlp_dim,
                num_layers=sc.num_layers, dtype=dt, param_dtype=pdt)
      self.cond_scorer = scorer_lib.PairwiseScorer(**kw)
      self.multi_scorer = scorer_lib.PairwiseScorer(**kw)
    lc = self.config.loss
    const = lambda v: (lambda *_: jnp.asarray(v, jnp.float32))
    self.cond_log_t = self.param("cond_log_t", const(lc.init_log_t))
    self.cond_b = self.param("cond_b", const(lc.init_b))
    self.multi_log_t = self.param("multi_log_t", const(lc.init_log_t))
    self.multi_b = self.param("multi_b", const(lc.init_b))
    if lc.context_head > 0:
      # Departure (loss.context_head, issue 16): one linear map from the mean latent
      # to every caption position's vocabulary logits.
      self.context_head = layers.dense(
          self.config.data.max_caption_tokens * m.llm.vocab_size, ("embed", "vocab"),
          "context_head", dt, pdt)
    self.prompt_vector = self.param(
        "prompt_vector", nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)),
        (d_model,), pdt)

  # ------------------------------------------------------------------ pieces
  def view_tokens(self, batch, deterministic: bool = True):
    """Each view's tokens before the cross-view block: float[B, j, L, C].

    L = 1 + r * r (+ c * c with `model.context_tokens = c`): the class token, the
    RoI-aligned target box, and the optional whole-view context tokens.
    """
    m = self.config.model
    views = batch["views"]
    b, j, s = views.shape[0], views.shape[1], views.shape[2]
    mean, std = PIXEL_STATS[m.vision.family]
    x = views.astype(jnp.float32) / 255.0
    x = (x - jnp.asarray(mean)) / jnp.asarray(std)
    x = x.reshape((b * j, s, s, 3))
    x = nn.with_logical_constraint(x, ("batch", None, None, None))
    patch = m.vision.patch_size
    g = s // patch
    patch_bias = None
    if m.target_box_prompt:
      cover = ops.box_coverage(batch["view_boxes"].reshape((b * j, 4)), g, float(patch))
      patch_bias = cover[..., None] * self.target_embedding.astype(jnp.float32)
    tokens = self.vision(x.astype(jnp.dtype(m.frozen_dtype)), deterministic=deterministic,
                         patch_bias=patch_bias)
    tokens = tokens.astype(jnp.dtype(m.dtype))
    cls, grid = tokens[:, :1], tokens[:, 1:].reshape((b * j, g, g, tokens.shape[-1]))
    boxes = batch["view_boxes"].astype(jnp.float32)
    if m.candidate_pool == "whole_view" and j > 1:
      # Departure (option): each context view pooled over the whole view, so the
      # neighbour's area survives RoI-align; the target box is pooled in view 0.
      whole = jnp.broadcast_to(jnp.asarray([0.0, 0.0, s, s], jnp.float32), (b, j - 1, 4))
      boxes = jnp.concatenate([boxes[:, :1], whole], axis=1)
    boxes = boxes.reshape((b * j, 1, 4))
    pooled = ops.roi_align(grid, boxes, m.roi_output_size, 1.0 / patch,
                           sampling_ratio=m.roi_sampling_ratio, aligned=m.roi_aligned)
    r = m.roi_output_size
    pooled = pooled.reshape((b * j, r * r, tokens.shape[-1]))
    parts = [cls, pooled]
    if m.context_tokens > 0:
      # The whole view, coarsely, so what lies around the target reaches the
      # sampler; each cell marked by how much of it the target box covers.
      k = m.context_tokens
      whole = jnp.broadcast_to(jnp.asarray([0.0, 0.0, s, s], jnp.float32), (b * j, 1, 4))
      ctx = ops.roi_align(grid, whole, k, 1.0 / patch, sampling_ratio=m.roi_sampling_ratio,
                          aligned=m.roi_aligned).reshape((b * j, k * k, tokens.shape[-1]))
      cover = ops.box_coverage(batch["view_boxes"].reshape((b * j, 4)).astype(jnp.float32),
                               k, s / k)
      ctx = ctx + cover[..., None].astype(ctx.dtype) * self.context_target_embedding.astype(
          ctx.dtype)
      parts.append(ctx)
    per_view = jnp.concatenate(parts, axis=1)
    length, c = per_view.shape[1], per_view.shape[2]
    per_view = per_view.reshape((b, j, length, c))
    if m.view_box_embedding:
      geometry = ops.box_geometry(batch["view_boxes"].astype(jnp.float32), float(s),
                                  centred=m.view_box_centred)
      if m.view_box_hidden > 0:
        geometry = nn.gelu(self.view_box_hidden(geometry), approximate=False)
      per_view = per_view + self.view_box_proj(geometry)[:, :, None]
    return per_view

  def _region_latents(self, batch, deterministic: bool):
    """views -> Q-Former latents float[B, Q, H]."""
    per_view = self.view_tokens(batch, deterministic)
    b, j, length, c = per_view.shape
    target = per_view[:, 0]
    if j > 1:
      cand = per_view[:, 1:].reshape((b * (j - 1), length, c))
      tgt = jnp.repeat(target, j - 1, axis=0)
      aligned = self.cross_view(cand, tgt, deterministic=deterministic)
      per_view = jnp.concatenate([target[:, None], aligned.reshape((b, j - 1, length, c))], 1)
    fused = self.view_fusion(per_view)
    fused = nn.with_logical_constraint(fused, ("batch", "length", "embed"))
    return self.qformer(fused, deterministic=deterministic)

  def _encoder_input(self, latents, prompt_tokens, prompt_mask):
    """[projected latents ; tag prompt embeddings + prompt vector] and its mask."""
    proj = self.language_projection(latents)
    emb = self.llm.embed(prompt_tokens).astype(proj.dtype)
    emb = emb + self.prompt_vector.astype(proj.dtype)
    emb = emb * prompt_mask[..., None].astype(emb.dtype)
    x = jnp.concatenate([proj, emb], axis=1)
    mask = jnp.concatenate([jnp.ones(proj.shape[:2], jnp.int32),
                            prompt_mask.astype(jnp.int32)], axis=1)
    return x, mask

  def _caption_logits(self, enc_in, enc_mask, cap, cap_mask):
    """Teacher-forced LLM logits float[B, T, V]: logits[:, t] predicts cap[:, t].

    Decoder-only: the prefix is left-padded first (`decoder_lm.left_pad`), as
    `generate` gets it, so the first caption token is predicted from the last
    real prefix token and every caption token has the position it has in
    decoding (cumsum of the mask).
    """
    m = self.config.model
    fdt = jnp.dtype(m.frozen_dtype)
    if m.llm.family == "t5":
      start = jnp.full((cap.shape[0], 1), m.llm.decoder_start_token_id, cap.dtype)
      dec_in = jnp.concatenate([start, cap[:, :-1]], axis=1)
      return self.llm(enc_in.astype(fdt), enc_mask, dec_in)
    prefix, prefix_mask = decoder_lm_lib.left_pad(enc_in.astype(fdt), enc_mask)
    full = jnp.concatenate([prefix, self.llm.embed(cap).astype(fdt)], axis=1)
    full_mask = jnp.concatenate([prefix_mask, cap_mask.astype(jnp.int32)], axis=1)
    return self.llm(full, full_mask)[:, prefix.shape[1] - 1:-1]

  def caption_logits(self, batch):
    """The logits L_cap scores (no dropout), from the batch's own prompt: float[B, T, V]."""
    latents = self._region_latents(batch, True)
    enc_in, enc_mask = self._encoder_input(latents, batch["prompt_tokens"], batch["prompt_mask"])
    return self._caption_logits(enc_in, enc_mask, batch["caption_tokens"],
                                batch["caption_mask"])

  def encode_tags(self, tag_clip_tokens, tag_clip_mask):
    """The frozen CLIP text encoder's pooled output for every tag: float32[V, Dclip]."""
    _, pooled = self.clip_text(tag_clip_tokens, tag_clip_mask)
    return jax.lax.stop_gradient(pooled.astype(jnp.float32))

  def _pairwise(self, scorer, rows, row_mask, cols, log_t, b, valid):
    """Pairwise sigmoid loss over the global batch in the configured form; padding
    regions (valid == 0) take part in no pair."""
    m = self.config.model
    if m.similarity == "dot":
      w = row_mask[..., None].astype(rows.dtype)
      pooled = jnp.sum(rows * w, 1) / jnp.maximum(jnp.sum(w, 1), 1.0)
      x = pooled / (jnp.linalg.norm(pooled, axis=-1, keepdims=True) + 1e-6)
      y = cols / (jnp.linalg.norm(cols, axis=-1, keepdims=True) + 1e-6)
      score_fn, score_params = None, None
    else:
      if self.is_initializing():
        scorer(rows, row_mask, cols)  # creates the scorer's parameters
      score_params = {"params": nn.meta.unbox(scorer.variables["params"])}
      pure = scorer.clone(parent=None)
      x = pure.apply(score_params, rows, row_mask,
                     method=scorer_lib.PairwiseScorer.project_regions)
      y = cols
      score_fn = scorer_lib.make_score_fn(pure)
    x = jax.tree.map(
        lambda a: a.astype(jnp.float32) if jnp.issubdtype(a.dtype, jnp.floating) else a, x)
    y = y.astype(jnp.float32)
    if m.pairwise_form == "ring":
      mesh = jax.sharding.get_abstract_mesh()
      axes = tuple(a for a in ("data", "fsdp") if a in mesh.axis_names)
      if not axes:
        raise ValueError("pairwise_form='ring' needs a mesh with a 'data' or 'fsdp' axis; "
                         "run under jax.set_mesh(mesh)")
      return losses_lib.sharded_pairwise_sigmoid_loss(
          x, y, log_t, b, mesh=mesh, axis_names=axes, score_fn=score_fn,
          score_params=score_params, valid=valid)
    block = m.pairwise_block_size if m.pairwise_form == "chunked" else None
    return losses_lib.pairwise_sigmoid_loss(x, y, log_t, b, block_size=block,
                                            score_fn=score_fn, score_params=score_params,
                                            valid=valid)

  def _context_head_loss(self, latents, cap_logits, cap, cap_mask, valid):
    """loss.context_head's term: per-token cross-entropy of the direct head, each
    token weighted by (1 - p)^focus with p the captioner's stop-gradient
    probability of it (`context_head_select="weighted"`), or only the token with
    the largest such weight ("hardest"), or only the listed caption positions
    ("4": a diagnostic that knows the synthetic grammar, where position 4 is the
    relation word); summed over the caption, mean over valid regions."""
    t, v = cap.shape[1], self.config.model.llm.vocab_size
    z = jnp.mean(latents, axis=1)
    head = self.context_head(z).astype(jnp.float32).reshape((z.shape[0], t, v))
    logp = jax.nn.log_softmax(head, axis=-1)
    nll = -jnp.take_along_axis(logp, cap[..., None].astype(jnp.int32), axis=-1)[..., 0]
    cap_logp = jax.nn.log_softmax(jax.lax.stop_gradient(cap_logits).astype(jnp.float32), -1)
    p = jnp.exp(jnp.take_along_axis(cap_logp, cap[..., None].astype(jnp.int32), -1)[..., 0])
    lc = self.config.loss
    w = context_head_weights(p, cap_mask, lc.context_head_focus, lc.context_head_select)
    return jnp.sum(nll * w) / jnp.maximum(jnp.sum(valid), 1.0)

  # ------------------------------------------------------------------ training
  def __call__(self, batch, tag_embeddings, *, train: bool = False):
    """All four losses of Eq. 1. Returns (loss, metrics dict of float32 scalars)."""
    lc = self.config.loss
    deterministic = not train
    valid = batch["valid"].astype(jnp.float32)
    latents = self._region_latents(batch, deterministic)
    tag_logits, adapted_tags = self.tagging(latents, tag_embeddings)
    loss_tag = losses_lib.asymmetric_loss(
        tag_logits, batch["tag_labels"], gamma_neg=lc.asl_gamma_neg,
        gamma_pos=lc.asl_gamma_pos, clip=lc.asl_clip, mask=valid)

    enc_in, enc_mask = self._encoder_input(latents, batch["prompt_tokens"], batch["prompt_mask"])
    cap, cap_mask = batch["caption_tokens"], batch["caption_mask"] * batch["valid"][:, None]
    logits = self._caption_logits(enc_in, enc_mask, cap, batch["caption_mask"])
    loss_cap, _ = losses_lib.caption_cross_entropy(logits, cap, cap_mask)

    # L_cond: image-conditioned tag features vs CLIP features of the caption.
    cond_rows = self.cond_region(latents, adapted_tags)
    _, clip_pooled = self.clip_text(batch["clip_tokens"], batch["clip_mask"])
    cond_cols = self.cond_caption_proj(jax.lax.stop_gradient(clip_pooled).astype(cond_rows.dtype))
    loss_cond = self._pairwise(getattr(self, "cond_scorer", None), cond_rows,
                               jnp.ones(cond_rows.shape[:2], bool), cond_cols,
                               self.cond_log_t, self.cond_b, batch["valid"])

    # L_multi: LLM encoder input vs mean LLM input embedding of the caption.
    multi_rows = self.multi_region_proj(enc_in)
    cap_emb = jax.lax.stop_gradient(self.llm.embed(cap)).astype(jnp.float32)
    w = batch["caption_mask"][..., None].astype(jnp.float32)
    cap_mean = jnp.sum(cap_emb * w, 1) / jnp.maximum(jnp.sum(w, 1), 1.0)
    multi_cols = self.multi_caption_proj(cap_mean.astype(multi_rows.dtype))
    loss_multi = self._pairwise(getattr(self, "multi_scorer", None), multi_rows,
                                enc_mask.astype(bool), multi_cols,
                                self.multi_log_t, self.multi_b, batch["valid"])

    loss = (lc.alpha * loss_tag + lc.beta * loss_cap + lc.gamma * loss_cond
            + lc.lambda_ * loss_multi)
    metrics = {"loss": loss, "loss_cap": loss_cap, "loss_tag": loss_tag,
               "loss_cond": loss_cond, "loss_multi": loss_multi}
    if lc.context_head > 0:
      loss_ctx = self._context_head_loss(latents, logits, cap, cap_mask, valid)
      loss = loss + lc.context_head * loss_ctx
      metrics.update(loss=loss, loss_context=loss_ctx)
    return loss, {k: v.astype(jnp.float32) for k, v in metrics.items()}

  # ------------------------------------------------------------------ decoding
  def generate(self, batch, tag_embeddings, tag_table, *, num_beams: int = 2,
               max_new_tokens: int = 20, min_length: int = 1, length_penalty: float = 0.0,
               repetition_penalty: float = 1.5, contrastive_alpha: float = 0.0):
    """Captions for a batch: predicted tags -> on-device prompt -> beam search.

    Decoder-only LLMs get the prefix left-padded, as `_caption_logits` reads it
    in training, and the repetition penalty on every generated id.
    `contrastive_alpha` a > 0: visual contrastive decoding (Leng et al., CVPR
    2024; `decode.contrastive_alpha`), next-token logits `(1 + a) * logits(views)
    - a * logits(distorted)`, where the distorted input has every candidate view
    replaced by the target view (view 0: the region without its context) and the
    same prompt.

    Returns:
      dict(tokens int32[B, max_new_tokens], scores float32[B], tag_probs float32[B, V],
      prompt_tokens / prompt_mask int32[B, max_prompt_tokens]: the prompt decoded from).
    """
    m = self.config.model
    latents = self._region_latents(batch, True)
    tag_logits, _ = self.tagging(latents, tag_embeddings)
    probs = jax.nn.sigmoid(tag_logits)
    prompt, pmask = prompt_lib.build_prompt_on_device(
        probs > m.tag_threshold, tag_table["tokens"], tag_table["lens"],
        tag_table["comma_id"], tag_table["bar_id"], tag_table["eos_id"],
        self.config.data.max_prompt_tokens)
    enc_in, enc_mask = self._encoder_input(latents, prompt, pmask)
    enc_in = enc_in.astype(jnp.dtype(m.frozen_dtype))
    contrast = None
    if contrastive_alpha > 0:
      j = batch["views"].shape[1]
      distorted = {**batch, "views": jnp.repeat(batch["views"][:, :1], j, axis=1),
                   "view_boxes": jnp.repeat(batch["view_boxes"][:, :1], j, axis=1)}
      contrast, _ = self._encoder_input(self._region_latents(distorted, True), prompt, pmask)
      contrast = contrast.astype(enc_in.dtype)
    if m.llm.family != "t5":
      if contrast is not None:
        contrast, _ = decoder_lm_lib.left_pad(contrast, enc_mask)
      enc_in, enc_mask = decoder_lm_lib.left_pad(enc_in, enc_mask)
    llm = self.llm.clone(parent=None)
    llm_params = self.llm.variables["params"]
    tokens, scores = generate_lib.generate(
        llm, llm_params, inputs_embeds=enc_in,
        attention_mask=enc_mask, num_beams=num_beams, max_new_tokens=max_new_tokens,
        min_length=min_length, length_penalty=length_penalty,
        repetition_penalty=repetition_penalty, eos_token_id=m.llm.eos_token_id,
        pad_token_id=m.llm.pad_token_id,
        decoder_start_token_id=m.llm.decoder_start_token_id if m.llm.family == "t5" else None,
        penalty_skips_padding=False, contrastive_alpha=float(contrastive_alpha),
        contrast_inputs_embeds=contrast)
    return {"tokens": tokens, "scores": scores, "tag_probs": probs, "prompt_tokens": prompt,
            "prompt_mask": pmask}


def context_head_weights(p, mask, focus: float, select: str):
  """Per-token weights float32[B, T] of loss.context_head's cross-entropy.

  Args:
    p: float[B, T] the captioner's (stop-gradient) probability of each token.
    mask: 0/1[B, T] caption tokens that count.
    focus: exponent of (1 - p).
    select: "weighted" ((1 - p)^focus), "hardest" (1 at each row's token of
      largest (1 - p)^focus, else 0) or comma-separated positions (1 there).
  """
  m = mask.astype(jnp.float32)
  w = (1.0 - p.astype(jnp.float32)) ** focus * m
  if select == "weighted":
    return w
  if select == "hardest":
    return jax.nn.one_hot(jnp.argmax(w, axis=1), w.shape[1]) * m
  keep = np.zeros((w.shape[1],), np.float32)
  keep[[int(x) for x in select.split(",")]] = 1.0
  return jnp.asarray(keep)[None] * m


def build_model(config, num_tags: int) -> AlignCap:
  """The AlignCap module for a config and a tag vocabulary of size num_tags."""
  if num_tags < 1:
    raise ValueError(f"the tag vocabulary is empty (num_tags={num_tags})")
  frozen = (config if isinstance(config, ml_collections.FrozenConfigDict)
            else ml_collections.FrozenConfigDict(config))
  return AlignCap(frozen, int(num_tags))


def dummy_batch(config, batch_size: int, num_tags: int) -> dict[str, np.ndarray]:
  """Zeros with the exact shapes and dtypes of the batch contract."""
  d = config.data
  b, j, s = batch_size, d.num_views, d.view_size
  box = np.tile(np.asarray([0, 0, s, s], np.float32), (b, j, 1))
  return {
      "views": np.zeros((b, j, s, s, 3), np.uint8),
      "view_boxes": box,
      "caption_tokens": np.zeros((b, d.max_caption_tokens), np.int32),
      "caption_mask": np.ones((b, d.max_caption_tokens), np.int32),
      "clip_tokens": np.zeros((b, d.clip_max_tokens), np.int32),
      "clip_mask": np.ones((b, d.clip_max_tokens), np.int32),
      "tag_labels": np.zeros((b, num_tags), np.float32),
      "prompt_tokens": np.zeros((b, d.max_prompt_tokens), np.int32),
      "prompt_mask": np.ones((b, d.max_prompt_tokens), np.int32),
      "region_id": np.arange(b, dtype=np.int32),
      "image_id": np.arange(b, dtype=np.int32),
      "valid": np.ones((b,), np.int32),
  }


def dummy_tag_inputs(config, num_tags: int, tag_len: int = 4):
  """(tag_clip_tokens int32[V, 77], tag_clip_mask int32[V, 77], tag_table) of zeros."""
  d = config.data
  table = {"tokens": np.zeros((num_tags, tag_len), np.int32),
           "lens": np.ones((num_tags,), np.int32),
           "comma_id": np.asarray(3, np.int32), "bar_id": np.asarray(4, np.int32),
           "eos_id": np.asarray(config.model.llm.eos_token_id, np.int32)}
  return (np.zeros((num_tags, d.clip_max_tokens), np.int32),
          np.ones((num_tags, d.clip_max_tokens), np.int32), table)
