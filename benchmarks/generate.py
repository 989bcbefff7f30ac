"""Beam-search speed: our jitted generate vs transformers `generate` (PyTorch, CPU).

  python benchmarks/generate.py [--batch 16] [--beams 2] [--new_tokens 20] [--rounds 5] [--profile]

Same t5-small-shaped random weights in both (d_model 512, 6+6 layers, 8 heads,
d_ff 2048, vocab 32128; written by transformers, read by our importer), batch
16, beam 2, 20 new tokens, a 40-token encoder input, repetition penalty 1.5.
One warm-up call each (compilation excluded), then `--rounds` interleaved rounds
(ours, transformers, ours, ...; benchmarks/interleave.py); checks that the token
ids are equal and prints tokens/s of each as median (min-max), the ratio of
medians, the load average and the thread settings of the run. `--profile` then
splits each side's time into matrix products and the rest (profile_ops.py).
"""
from __future__ import annotations

import argparse
import os
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

import interleave  # noqa: E402  (benchmarks/, the script's folder)
import profile_ops  # noqa: E402
from aligncap_jax.models import hf_import  # noqa: E402
from aligncap_jax.models.generate import generate  # noqa: E402
from aligncap_jax.models.t5 import T5  # noqa: E402


def main() -> None:
  parser = argparse.ArgumentParser()
  parser.add_argument("--batch", type=int, default=16)
  parser.add_argument("--beams", type=int, default=2)
  parser.add_argument("--new_tokens", type=int, default=20)
  parser.add_argument("--input_len", type=int, default=40)
  parser.add_argument("--profile", action="store_true",
                      help="after the rounds, profile both and split their time into matrix "
                           "products and the rest (benchmarks/profile_ops.py)")
  interleave.add_args(parser)
  args = parser.parse_args()
  torch.manual_seed(0)
  cfg = transformers.T5Config(vocab_size=32128, d_model=512, d_kv=64, d_ff=2048,
                              num_layers=6, num_heads=8, feed_forward_proj="relu",
                              decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
  hf = transformers.T5ForConditionalGeneration(cfg).eval()
  with tempfile.TemporaryDirectory() as tmp:
    hf.save_pretrained(tmp, safe_serialization=True)
    config, params = hf_import.load("t5", tmp)
  model = T5(config)
  rng = np.random.default_rng(0)
  ids = rng.integers(2, cfg.vocab_size, size=(args.batch, args.input_len))
  mask = np.ones_like(ids)
  kw = dict(num_beams=args.beams, max_new_tokens=args.new_tokens, min_length=1,
            length_penalty=0.0, repetition_penalty=1.5, eos_token_id=1, pad_token_id=0)

  embeds = model.apply({"params": params}, jnp.asarray(ids), method=T5.embed)

  def ours():
    tokens, scores = generate(model, params, inputs_embeds=embeds,
                              attention_mask=jnp.asarray(mask), **kw)
    return np.asarray(jax.block_until_ready(tokens))

  def theirs():
    with torch.no_grad():
      return hf.generate(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                         do_sample=False, early_stopping=False, **kw).numpy()

  ours_ids, theirs_ids = ours(), theirs()
  # transformers returns [start, tokens...] and stops at the longest row.
  theirs_ids = theirs_ids[:, 1:]
  same = np.array_equal(ours_ids[:, :theirs_ids.shape[1]], theirs_ids) and not np.any(
      ours_ids[:, theirs_ids.shape[1]:] != kw["pad_token_id"])
  ours_name, theirs_name = "ours (jax.jit)", "transformers (torch)"
  times = interleave.run({ours_name: ours, theirs_name: theirs}, rounds=args.rounds,
                         warmup=args.warmup)
  print(interleave.environment(times))
  print(f"# t5-small shape, batch {args.batch}, beams {args.beams}, {args.new_tokens} new "
        f"tokens, input {args.input_len} tokens, repetition penalty 1.5; token ids equal: "
        f"{same}")
  print(interleave.table(times, unit="tokens/s", work=args.batch * args.new_tokens))
  print(interleave.ratio_line(times, ours_name, theirs_name))
  if args.profile:
    flops = matmul_flops(cfg, args.batch, args.beams, args.input_len, args.new_tokens)
    medians = {name: interleave.stats(ts).median for name, ts in times.items()}
    print(profile_ops.report_pair((ours_name, ours), (theirs_name, theirs), medians, flops=flops,
                                  what="dense layers and the LM head; attention scores excluded"))


def matmul_flops(cfg, batch: int, beams: int, input_len: int, new_tokens: int) -> float:
  """FLOPs of the matrix products of one call: the encoder on `batch` rows, the
  cross-attention keys/values and `new_tokens` decoder steps on `batch * beams`
  rows (the attention score products, under 2% here, left out)."""
  d, ff, v = cfg.d_model, cfg.d_ff, cfg.vocab_size
  inner = cfg.num_heads * cfg.d_kv
  enc_layer = 4 * d * inner + 2 * d * ff
  dec_layer = 4 * d * inner + 2 * d * inner + 2 * d * ff   # self q,k,v,o; cross q,o; mlp
  rows = batch * beams
  encoder = batch * input_len * cfg.num_layers * enc_layer
  cross_kv = rows * input_len * cfg.num_decoder_layers * 2 * d * inner
  steps = new_tokens * rows * (cfg.num_decoder_layers * dec_layer + d * v)
  return 2.0 * (encoder + cross_kv + steps)


if __name__ == "__main__":
  main()
