"""Checks our Flax import of a Hugging Face folder against transformers (PyTorch, CPU).

  python -m aligncap_jax.tools.hf_parity --family t5 --hf_dir DIR [--generate]

Loads the folder with both, runs identical random inputs and prints the max
absolute difference of the outputs (logits for text models, last hidden state
for vision towers); exits 0 when it is within 1e-4 (float32). With --generate
(t5, llama) it also decodes greedily and with beam 2 (20 new tokens, min length
1, length penalty 0, repetition penalty 1.5) and exits non-zero on any token
that differs from `generate`. Vision families come from
`aligncap_jax.tools.parity_vision.FAMILIES`.
"""
from __future__ import annotations

import argparse
import importlib
import sys
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from aligncap_jax.models import hf_import
from aligncap_jax.models.decoder_lm import DecoderLM, rope_positions
from aligncap_jax.models.generate import generate
from aligncap_jax.models.t5 import T5

TOLERANCE = 1e-4
TEXT_FAMILIES = ("t5", "llama")
DECODE_SETTINGS = dict(max_new_tokens=20, min_length=1, length_penalty=0.0,
                       repetition_penalty=1.5)


def _torch_model(family: str, hf_dir: str):
  import torch
  import transformers
  cls = (transformers.T5ForConditionalGeneration if family == "t5"
         else transformers.AutoModelForCausalLM)
  model = cls.from_pretrained(hf_dir, dtype=torch.float32)
  return model.eval()


def _inputs(vocab: int, batch: int, length: int, seed: int, left_pad: bool):
  """Random ids int64[B, L] and a mask with a few padded positions per row."""
  rng = np.random.default_rng(seed)
  ids = rng.integers(3, vocab, size=(batch, length))
  mask = np.ones((batch, length), np.int64)
  for b in range(1, batch):
    pad = min(b, length - 2)
    if left_pad:
      mask[b, :pad] = 0
    else:
      mask[b, length - pad:] = 0
  return ids, mask


def _load(family: str, hf_dir: str) -> tuple[Any, Any, dict]:
  config, params = hf_import.load(family, hf_dir)
  model = T5(config) if family == "t5" else DecoderLM(config)
  return config, model, params


def logits_parity(family: str, hf_dir: str, *, seed: int = 0) -> float:
  """Max |ours - transformers| over the logits of random token ids (valid positions)."""
  import torch
  config, model, params = _load(family, hf_dir)
  hf = _torch_model(family, hf_dir)
  ids, mask = _inputs(config.vocab_size, 3, 9, seed, left_pad=family != "t5")
  variables = {"params": params}
  if family == "t5":
    dec = np.random.default_rng(seed + 1).integers(0, config.vocab_size, size=(3, 6))
    with torch.no_grad():
      want = hf(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                decoder_input_ids=torch.tensor(dec)).logits.numpy()
    embeds = model.apply(variables, jnp.asarray(ids), method=T5.embed)
    got = np.asarray(model.apply(variables, embeds, jnp.asarray(mask), jnp.asarray(dec)))
    return float(np.max(np.abs(got - want)))
  positions = np.asarray(rope_positions(jnp.asarray(mask)))
  with torch.no_grad():
    want = hf(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
              position_ids=torch.tensor(positions)).logits.numpy()
  embeds = model.apply(variables, jnp.asarray(ids), method=DecoderLM.embed)
  got = np.asarray(model.apply(variables, embeds, jnp.asarray(mask)))
  return float(np.max(np.abs(got - want)[mask.astype(bool)]))


def normalise(tokens: np.ndarray, length: int, eos: int, pad: int) -> np.ndarray:
  """Pads/crops int[B, T] to `length`, with pad after the first EOS."""
  out = np.full((tokens.shape[0], length), pad, np.int64)
  n = min(length, tokens.shape[1])
  out[:, :n] = tokens[:, :n]
  for row in out:
    hit = np.flatnonzero(row == eos)
    if hit.size:
      row[hit[0] + 1:] = pad
  return out


def generate_parity(family: str, hf_dir: str, *, seed: int = 0, batch: int = 4
                    ) -> list[str]:
  """Greedy and beam-2 decoding vs `generate`; one line per difference (empty: equal)."""
  import torch
  config, model, params = _load(family, hf_dir)
  hf = _torch_model(family, hf_dir)
  ids, mask = _inputs(config.vocab_size, batch, 9, seed, left_pad=family != "t5")
  variables = {"params": params}
  eos, pad = config.eos_token_id, config.pad_token_id
  embed_fn = T5.embed if family == "t5" else DecoderLM.embed
  embeds = model.apply(variables, jnp.asarray(ids), method=embed_fn)
  problems = []
  for num_beams in (1, 2):
    kw = dict(num_beams=num_beams, eos_token_id=eos, pad_token_id=pad, **DECODE_SETTINGS)
    hf_kw = dict(do_sample=False, early_stopping=False, output_scores=True,
                 return_dict_in_generate=True, **kw)
    with torch.no_grad():
      if family == "t5":
        start = config.decoder_start_token_id
        out = hf.generate(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                          decoder_start_token_id=start, **hf_kw)
        want = out.sequences.numpy()[:, 1:]
      else:
        out = hf.generate(inputs_embeds=torch.tensor(np.asarray(embeds)),
                          attention_mask=torch.tensor(mask), **hf_kw)
        want = out.sequences.numpy()
    want = normalise(want, DECODE_SETTINGS["max_new_tokens"], eos, pad)
    tokens, scores = generate(model, params, inputs_embeds=embeds,
                              attention_mask=jnp.asarray(mask), **kw)
    got = np.asarray(tokens)
    name = "greedy" if num_beams == 1 else f"beam-{num_beams}"
    for b in np.flatnonzero((got != want).any(axis=1)):
      first = int(np.flatnonzero(got[b] != want[b])[0])
      problems.append(f"{family} {name} row {b}: first difference at token {first}: "
                      f"ours {got[b].tolist()} vs transformers {want[b].tolist()}")
    if num_beams > 1 and not problems:
      hf_scores = np.exp(out.sequences_scores.numpy())
      diff = float(np.max(np.abs(np.asarray(scores) - hf_scores)))
      if diff > 1e-4:
        problems.append(f"{family} {name}: sequence scores differ by {diff:.3g}")
  return problems


def run(family: str, hf_dir: str, *, with_generate: bool = False, seed: int = 0
        ) -> tuple[float, list[str]]:
  """(max abs logit/hidden difference, decoding differences)."""
  if family in TEXT_FAMILIES:
    diff = logits_parity(family, hf_dir, seed=seed)
    problems = generate_parity(family, hf_dir, seed=seed) if with_generate else []
    return diff, problems
  vision = importlib.import_module("aligncap_jax.tools.parity_vision")
  if family not in vision.FAMILIES:
    known = sorted(set(TEXT_FAMILIES) | set(vision.FAMILIES))
    raise ValueError(f"unknown family '{family}'; known: {known}")
  if with_generate:
    raise ValueError(f"--generate applies to {list(TEXT_FAMILIES)}, not '{family}'")
  return float(vision.FAMILIES[family](hf_dir)), []


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--family", required=True, help=f"one of {hf_import.families()}")
  parser.add_argument("--hf_dir", required=True, help="local Hugging Face model folder")
  parser.add_argument("--generate", action="store_true",
                      help="also compare greedy and beam-2 decoding (t5, llama)")
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args(argv)
  jax.config.update("jax_default_matmul_precision", "highest")
  diff, problems = run(args.family, args.hf_dir, with_generate=args.generate,
                       seed=args.seed)
  ok = diff <= TOLERANCE
  print(f"{args.family}: max abs diff {diff:.3e} ({'ok' if ok else 'FAIL'}, "
        f"tolerance {TOLERANCE:g})")
  if args.generate:
    for line in problems:
      print(line)
    print(f"{args.family}: decoding {'identical' if not problems else 'DIFFERS'} "
          "(greedy, beam 2)")
  return 0 if ok and not problems else 1


if __name__ == "__main__":
  sys.exit(main())
