"""Batched, jitted greedy and beam-search decoding with a KV cache.

Token-for-token the Hugging Face `generate` (transformers 5.x) with
`do_sample=False`, `early_stopping=False`, one EOS id, and the logits processors
that the arguments switch on (repetition penalty, min length):

* beam search keeps the top `2 * num_beams` continuations of all beams, sends
  the best `num_beams` that did not just stop on to the next step, and merges
  the ones among the first `num_beams` that stopped (EOS or max length) into the
  finished set with score `sum_logprobs / gen_len ** length_penalty`; it stops
  once no batch item can improve (HF's `early_stopping=False` heuristic) or all
  continuations stopped. The repetition penalty acts on the log-probabilities.
* greedy takes the arg-max of the processed logits and pads finished rows.

Encoder-decoder (T5): the decoder starts from `decoder_start_token_id`, which
counts towards `min_length` and the repetition penalty, exactly as in HF.
Decoder-only (`DecoderLM`) with a prefix of embeddings: only generated ids count,
and HF's repetition penalty also skips the first `n_pad` generated ids of a row
whose prefix has `n_pad` leading padding positions (its `prompt_ignore_length`
applied to ids that hold no prompt; `penalty_skips_padding=False` penalises
every generated id instead); HF lowers `min_length` by the prefix length
(`max(min_length - L, 0)`). We do the same. The prefix should be left-padded
(`decoder_lm.left_pad`): as in HF, the first new token is predicted from the
last slot and gets position `positions[:, -1] + 1`.

Visual contrastive decoding (Leng et al., CVPR 2024; `contrastive_alpha` a > 0):
every step's next-token logits are `(1 + a) * logits(x) - a * logits(x')`, x the
encoder input (prefix) and x' a distorted one of the same shape and mask, before
the processors and the softmax. Both run as one doubled batch, item i's rows
next to item i's distorted rows (so a batch-sharded item keeps both on its
device); they share the tokens and the beam reordering. a = 0 is the plain path.

Everything has static shapes; the loop is a `lax.while_loop` that exits when
every batch item is done.
"""
from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from aligncap_jax.models.decoder_lm import DecoderLM, rope_positions
from aligncap_jax.models.t5 import T5

Array = jax.Array
_NEG = -1.0e9


class _Stepper(NamedTuple):
  """Model-specific pieces: prefill -> (logits, state); step -> (logits, state);
  reorder(state, src) -> state with each beam's cache taken from beam src."""
  prompt_len: int
  prefill: Any
  step: Any
  reorder: Any


def _repeat(x: Array, n: int, axis: int = 0) -> Array:
  return jnp.repeat(x, n, axis=axis) if n > 1 else x


def _t5_stepper(model: T5, params, inputs_embeds, attention_mask, copies: int,
                max_new_tokens: int, start_id: int) -> _Stepper:
  variables = {"params": params}

  def prefill():
    # The first step is the same for every copy of an item (same start token,
    # same encoder states): run it once per item, then repeat its logits and
    # cache (cross-attention keys/values included) for the copies.
    enc = model.apply(variables, inputs_embeds, attention_mask, method=T5.encode)
    bsz = enc.shape[0]
    cache = model.init_cache(bsz, 1 + max_new_tokens)
    ids = jnp.full((bsz, 1), start_id, jnp.int32)
    logits, cache = model.apply(variables, ids, enc, attention_mask, cache=cache,
                                cache_index=0, method=T5.decode)
    cache = jax.tree.map(lambda a: _repeat(a, copies, axis=a.ndim - 4), cache)
    return _repeat(logits[:, -1], copies), {"cache": cache,
                                            "mask": _repeat(attention_mask, copies)}

  def step(state, tokens, cur_len):
    logits, cache = model.apply(variables, tokens[:, None], None, state["mask"],
                                cache=state["cache"], cache_index=cur_len - 1,
                                method=T5.decode)
    return logits[:, -1], {"cache": cache, "mask": state["mask"]}

  return _Stepper(1, prefill, step, _reorder)


def _decoder_lm_stepper(model: DecoderLM, params, inputs_embeds, attention_mask,
                        copies: int, max_new_tokens: int) -> _Stepper:
  variables = {"params": params}
  bsz, plen = attention_mask.shape

  def prefill():
    mask = jnp.concatenate(
        [attention_mask.astype(jnp.int32), jnp.zeros((bsz, max_new_tokens), jnp.int32)], 1)
    positions = rope_positions(attention_mask)
    cache = model.init_cache(bsz, plen + max_new_tokens)
    logits, cache = model.apply(variables, inputs_embeds, mask, positions=positions,
                                cache=cache, cache_index=0)
    state = {"cache": cache, "mask": mask, "last_pos": positions[:, -1]}
    state = jax.tree.map(lambda a: _repeat(a, copies, axis=0), state)
    state["cache"] = jax.tree.map(lambda a: _repeat(a, copies, axis=1), cache)
    return _repeat(logits[:, -1], copies), state

  def step(state, tokens, cur_len):
    slot = plen + cur_len - 1
    mask = jax.lax.dynamic_update_slice(
        state["mask"], jnp.ones((state["mask"].shape[0], 1), jnp.int32), (0, slot))
    x = model.apply(variables, tokens[:, None], method=DecoderLM.embed)
    positions = (state["last_pos"] + cur_len)[:, None]
    logits, cache = model.apply(variables, x, mask, positions=positions,
                                cache=state["cache"], cache_index=slot)
    return logits[:, -1], {"cache": cache, "mask": mask, "last_pos": state["last_pos"]}

  return _Stepper(0, prefill, step, _reorder)


def _contrastive_stepper(stepper: _Stepper, copies: int, alpha: float) -> _Stepper:
  """Visual contrastive decoding over a stepper of the doubled batch.

  `stepper` decodes 2B items, item 2i the input of item i and item 2i + 1 its
  distorted input, each in `copies` rows (beams); the result decodes B items with
  logits `(1 + alpha) * logits(2i) - alpha * logits(2i + 1)` in float32.
  """

  def combine(logits):
    x = logits.astype(jnp.float32).reshape(-1, 2, copies, logits.shape[-1])
    return ((1.0 + alpha) * x[:, 0] - alpha * x[:, 1]).reshape(-1, logits.shape[-1])

  def double(x):  # [B * copies, ...] -> [2B * copies, ...], both halves of an item alike
    x = x.reshape((-1, 1, copies) + x.shape[1:])
    return jnp.broadcast_to(x, (x.shape[0], 2) + x.shape[2:]).reshape((-1,) + x.shape[3:])

  def prefill():
    logits, state = stepper.prefill()
    return combine(logits), state

  def step(state, tokens, cur_len):
    logits, state = stepper.step(state, double(tokens), cur_len)
    return combine(logits), state

  def reorder(state, src):
    return stepper.reorder(state, double(src.reshape(-1)).reshape(-1, src.shape[1]))

  return _Stepper(stepper.prompt_len, prefill, step, reorder)


def _seen_mask(seq: Array, cur_len: Array, start: Array, vocab: int) -> Array:
  """bool[N, V]: ids in seq int[N, L] at positions start[N] <= p < cur_len."""
  pos = jnp.arange(seq.shape[1])[None, :]
  valid = (pos < cur_len) & (pos >= start[:, None])
  # vmap: a scatter with the row as a batch dimension, which the SPMD partitioner
  # keeps on each row's device (explicit row indices would make it gather all rows).
  return jax.vmap(lambda ids, ok: jnp.zeros((vocab,), bool).at[ids].max(ok))(seq, valid)


def _process(scores: Array, seq: Array, cur_len: Array, ignore: Array, *,
             repetition_penalty: float, min_length: int, eos_token_id: int) -> Array:
  """HF RepetitionPenalty then MinLength processors on float32[N, V] scores.

  `ignore` int[N]: the penalty skips ids before this position (HF's
  `prompt_ignore_length`, the left-padding length of the attention mask).
  """
  if repetition_penalty != 1.0:
    seen = _seen_mask(seq, cur_len, ignore, scores.shape[-1])
    penalised = jnp.where(scores < 0, scores * repetition_penalty,
                          scores / repetition_penalty)
    scores = jnp.where(seen, penalised, scores)
  if min_length > 0:
    block = (cur_len < min_length) & (jnp.arange(scores.shape[-1]) == eos_token_id)
    scores = jnp.where(block, -jnp.inf, scores)
  return scores


def _reorder(state: dict, src: Array) -> dict:
  """Takes the self-attention cache rows of the surviving beams.

  The cache's `k`/`v` hold arrays whose batch axis (the 4th from last: T5's
  per-layer [bsz * nb, H, S, Dk] or stacked [layers, bsz * nb, ...], DecoderLM's
  [layers, bsz * nb, S, G, Dk]) has row b * nb + j = beam j of item b; `src`
  int[bsz, nb] is the beam of the same item each new beam continues. New beam j
  is a select over the item's nb old beams (elementwise, fused, no gather); it
  never mixes items, so a batch-sharded cache stays on each item's device
  (a flat `take` over all rows would make the partitioner all-gather the cache
  of the whole global batch on every device).
  """
  bsz, nb = src.shape

  def take(x):
    axis = x.ndim - 4
    x = x.reshape(x.shape[:axis] + (bsz, nb) + x.shape[axis + 1:])
    pick = src.reshape((1,) * axis + (bsz, nb) + (1,) * (x.ndim - axis - 2))
    out = jax.lax.slice_in_dim(x, 0, 1, axis=axis + 1)
    for j in range(1, nb):
      out = jnp.where(pick == j, jax.lax.slice_in_dim(x, j, j + 1, axis=axis + 1), out)
    return out.reshape(x.shape[:axis] + (bsz * nb,) + x.shape[axis + 2:])

  cache = dict(state["cache"])
  for name in ("k", "v"):
    cache[name] = jax.tree.map(take, cache[name])
  return {**state, "cache": cache}


def _greedy(stepper: _Stepper, bsz: int, max_new_tokens: int, start_id, ignore, *,
            repetition_penalty, min_length, eos_token_id, pad_token_id):
  plen = stepper.prompt_len
  total = plen + max_new_tokens
  logits, state = stepper.prefill()
  seq = jnp.full((bsz, total), pad_token_id, jnp.int32)
  if plen:
    seq = seq.at[:, 0].set(start_id)

  def body(carry):
    cur_len, seq, unfinished, logits, state, sum_lp, count = carry
    scores = _process(logits.astype(jnp.float32), seq, cur_len, ignore,
                      repetition_penalty=repetition_penalty, min_length=min_length,
                      eos_token_id=eos_token_id)
    tok = jnp.argmax(scores, axis=-1).astype(jnp.int32)
    lp = jnp.take_along_axis(jax.nn.log_softmax(scores, axis=-1), tok[:, None], 1)[:, 0]
    sum_lp = sum_lp + jnp.where(unfinished, lp, 0.0)
    count = count + unfinished.astype(jnp.int32)
    tok = jnp.where(unfinished, tok, pad_token_id)
    seq = jax.lax.dynamic_update_slice(seq, tok[:, None], (0, cur_len))
    unfinished = unfinished & ~((tok == eos_token_id) | (cur_len + 1 >= total))
    logits, state = jax.lax.cond(
        jnp.any(unfinished), lambda: stepper.step(state, tok, cur_len + 1),
        lambda: (logits, state))
    return cur_len + 1, seq, unfinished, logits, state, sum_lp, count

  carry = (jnp.int32(plen), seq, jnp.ones((bsz,), bool), logits, state,
           jnp.zeros((bsz,), jnp.float32), jnp.zeros((bsz,), jnp.int32))
  carry = jax.lax.while_loop(lambda c: jnp.any(c[2]), body, carry)
  _, seq, _, _, _, sum_lp, count = carry
  return seq[:, plen:], jnp.exp(sum_lp / jnp.maximum(count, 1))


def _beam(stepper: _Stepper, bsz: int, nb: int, max_new_tokens: int, start_id, ignore, *,
          repetition_penalty, min_length, length_penalty, eos_token_id, pad_token_id):
  plen = stepper.prompt_len
  total = plen + max_new_tokens
  k = 2 * nb
  logits, state = stepper.prefill()
  seq = jnp.full((bsz, nb, total), pad_token_id, jnp.int32)
  if plen:
    seq = seq.at[:, :, 0].set(start_id)
  running_scores = jnp.full((bsz, nb), _NEG, jnp.float32).at[:, 0].set(0.0)
  top_mask = jnp.arange(k) < nb

  def gather(x, idx):
    return jnp.take_along_axis(x, idx.reshape(idx.shape + (1,) * (x.ndim - 2)), axis=1)

  def body(c):
    cur_len, run_seq, run_scores, seqs, beam_scores, finished, unsat, _, logits, state = c
    vocab = logits.shape[-1]
    lp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    lp = _process(lp, run_seq.reshape(bsz * nb, total), cur_len, ignore,
                  repetition_penalty=repetition_penalty, min_length=min_length,
                  eos_token_id=eos_token_id)
    lp = lp.reshape(bsz, nb, vocab) + run_scores[:, :, None]
    topk_lp, topk_idx = jax.lax.top_k(lp.reshape(bsz, nb * vocab), k)
    src = topk_idx // vocab
    tok = (topk_idx % vocab).astype(jnp.int32)
    topk_seq = gather(run_seq, src)
    topk_seq = jax.lax.dynamic_update_slice(topk_seq, tok[:, :, None], (0, 0, cur_len))
    hits = (tok == eos_token_id) | (cur_len + 1 >= total)
    # Running beams: the best num_beams continuations that did not stop.
    run_lp = topk_lp + hits.astype(jnp.float32) * _NEG
    _, nxt = jax.lax.top_k(run_lp, nb)
    run_seq = gather(topk_seq, nxt)
    run_scores = gather(run_lp, nxt)
    run_src = gather(src, nxt)
    # Finished beams: merge the stopped ones among the top num_beams.
    did = hits & top_mask[None, :]
    fin_lp = topk_lp / ((cur_len + 1 - plen).astype(jnp.float32) ** length_penalty)
    fin_lp = fin_lp + (~unsat)[:, None].astype(jnp.float32) * _NEG
    fin_lp = fin_lp + (~did).astype(jnp.float32) * _NEG
    merged_scores = jnp.concatenate([beam_scores, fin_lp], 1)
    _, best = jax.lax.top_k(merged_scores, nb)
    seqs = gather(jnp.concatenate([seqs, topk_seq], 1), best)
    beam_scores = gather(merged_scores, best)
    finished = gather(jnp.concatenate([finished, did], 1), best)
    # Early-stop heuristic (early_stopping=False) and the loop condition.
    cur_len = cur_len + 1
    best_running = run_scores[:, 0] / ((cur_len - plen).astype(jnp.float32) ** length_penalty)
    worst = jnp.where(finished, jnp.min(beam_scores, axis=1, keepdims=True), _NEG)
    unsat = unsat & jnp.any(best_running[:, None] > worst, axis=-1)
    done = ~(jnp.any(unsat) & ~jnp.all(hits))
    new_tok = run_seq[:, :, cur_len - 1].reshape(-1)

    def advance():
      return stepper.step(stepper.reorder(state, run_src), new_tok, cur_len)

    logits, state = jax.lax.cond(done, lambda: (logits, state), advance)
    return (cur_len, run_seq, run_scores, seqs, beam_scores, finished, unsat, done,
            logits, state)

  carry = (jnp.int32(plen), seq, running_scores, seq,
           jnp.full((bsz, nb), _NEG, jnp.float32), jnp.zeros((bsz, nb), bool),
           jnp.ones((bsz,), bool), jnp.bool_(False), logits, state)
  carry = jax.lax.while_loop(lambda c: ~c[7], body, carry)
  seqs, beam_scores = carry[3], carry[4]
  return seqs[:, 0, plen:], jnp.exp(beam_scores[:, 0])


def _pad_after_eos(tokens: Array, eos_token_id: int, pad_token_id: int) -> Array:
  is_eos = tokens == eos_token_id
  after = jnp.cumsum(is_eos, axis=1) - is_eos.astype(jnp.int32) > 0
  return jnp.where(after, pad_token_id, tokens)


@functools.partial(jax.jit, static_argnames=(
    "model", "num_beams", "max_new_tokens", "min_length", "length_penalty",
    "repetition_penalty", "eos_token_id", "pad_token_id", "decoder_start_token_id",
    "penalty_skips_padding", "contrastive_alpha"))
def generate(model: T5 | DecoderLM, params, *, inputs_embeds: Array,
             attention_mask: Array, num_beams: int = 2, max_new_tokens: int = 20,
             min_length: int = 1, length_penalty: float = 0.0,
             repetition_penalty: float = 1.5, eos_token_id: int,
             pad_token_id: int, decoder_start_token_id: int | None = None,
             penalty_skips_padding: bool = True, contrastive_alpha: float = 0.0,
             contrast_inputs_embeds: Array | None = None) -> tuple[Array, Array]:
  """Decodes a batch with Hugging Face `generate` semantics (see module doc).

  Args:
    model: an unbound `T5` or `DecoderLM`.
    params: its parameter dict (the `params` collection).
    inputs_embeds: float[B, L, D] encoder input (T5) or prefix (decoder-only).
    attention_mask: int/bool[B, L].
    num_beams: 1 is greedy.
    max_new_tokens: N, generated tokens (EOS included).
    min_length: HF `min_length`.
    length_penalty: exponent of the length in the beam score.
    repetition_penalty: HF CTRL-style penalty (1.0 switches it off).
    eos_token_id: the one end-of-sequence id.
    pad_token_id: fills the tokens after EOS.
    decoder_start_token_id: T5 only (default: the model config's).
    penalty_skips_padding: decoder-only: True (HF) exempts a row's first n_pad
      generated ids from the repetition penalty, n_pad its prefix's leading
      padding; False penalises every generated id.
    contrastive_alpha: a >= 0; a > 0 decodes with visual contrastive decoding
      against `contrast_inputs_embeds` (module doc); 0 ignores them.
    contrast_inputs_embeds: float[B, L, D], the distorted `inputs_embeds` (same
      `attention_mask`); needed when contrastive_alpha > 0.

  Returns:
    tokens int32[B, N] (pad after the first EOS) and scores float32[B]: exp of
    the beam's sequence score (HF `sequences_scores`) or, greedy, exp of the
    mean log-probability of the generated tokens.
  """
  if num_beams < 1:
    raise ValueError(f"generate: num_beams must be >= 1, got {num_beams}")
  if max_new_tokens < 1:
    raise ValueError(f"generate: max_new_tokens must be >= 1, got {max_new_tokens}")
  if contrastive_alpha < 0:
    raise ValueError(f"generate: contrastive_alpha must be >= 0, got {contrastive_alpha}")
  bsz, plen = attention_mask.shape
  copies = num_beams
  contrastive = contrastive_alpha > 0
  if contrastive:
    if contrast_inputs_embeds is None or contrast_inputs_embeds.shape != inputs_embeds.shape:
      raise ValueError(
          f"generate: contrastive_alpha={contrastive_alpha} needs contrast_inputs_embeds of "
          f"shape {inputs_embeds.shape}, got "
          f"{None if contrast_inputs_embeds is None else contrast_inputs_embeds.shape}")
    # Item i at row 2i, its distorted input at row 2i + 1 (module doc).
    embeds = jnp.stack([inputs_embeds, contrast_inputs_embeds.astype(inputs_embeds.dtype)], 1)
    embeds = embeds.reshape((2 * bsz,) + inputs_embeds.shape[1:])
    mask = jnp.repeat(attention_mask, 2, axis=0)
  else:
    embeds, mask = inputs_embeds, attention_mask
  if isinstance(model, T5):
    start = (model.config.decoder_start_token_id if decoder_start_token_id is None
             else decoder_start_token_id)
    stepper = _t5_stepper(model, params, embeds, mask, copies, max_new_tokens, start)
    eff_min = min_length
    ignore = jnp.zeros((bsz * copies,), jnp.int32)
  elif isinstance(model, DecoderLM):
    start = None
    stepper = _decoder_lm_stepper(model, params, embeds, mask, copies, max_new_tokens)
    eff_min = max(min_length - plen, 0)
    if penalty_skips_padding:
      ignore = _repeat(jnp.argmax(attention_mask != 0, axis=1).astype(jnp.int32), copies)
    else:
      ignore = jnp.zeros((bsz * copies,), jnp.int32)
  else:
    raise TypeError(f"generate: model must be T5 or DecoderLM, got {type(model).__name__}")
  if contrastive:
    stepper = _contrastive_stepper(stepper, copies, float(contrastive_alpha))
  kw = dict(repetition_penalty=repetition_penalty, min_length=eff_min,
            eos_token_id=eos_token_id, pad_token_id=pad_token_id)
  if num_beams == 1:
    tokens, scores = _greedy(stepper, bsz, max_new_tokens, start, ignore, **kw)
  else:
    tokens, scores = _beam(stepper, bsz, num_beams, max_new_tokens, start, ignore,
                           length_penalty=length_penalty, **kw)
  return _pad_after_eos(tokens, eos_token_id, pad_token_id), scores.astype(jnp.float32)
