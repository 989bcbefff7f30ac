"""ViT forward: our jitted Flax tower vs transformers' CLIPVisionModel (PyTorch).

CLIP ViT-B/16 shape (224 px, patch 16, width 768, 12 layers, 12 heads, MLP
3072), random weights written once as a Hugging Face folder and loaded into
both (ours through `hf_import.vision.load_clip_vision`), batch 8, float32 on
the host CPU. One warm-up call each (compilation excluded), then `--rounds`
interleaved rounds (ours, transformers, ours, ...; benchmarks/interleave.py);
prints images/s as median (min-max), the ratio of medians, the largest output
difference, the load average and the thread settings of the run. `--profile`
then splits each side's time into matrix products and the rest (profile_ops.py).

  python benchmarks/vit_forward.py [--batch 8] [--rounds 5] [--scan] [--profile]
"""
from __future__ import annotations

import argparse
import dataclasses
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
import torch
import transformers

from aligncap_jax.models.hf_import.vision import load_clip_vision
from aligncap_jax.models.vit import VisionTransformer

import interleave  # benchmarks/, the script's folder
import profile_ops

VIT_B16 = dict(image_size=224, patch_size=16, hidden_size=768, num_hidden_layers=12,
               num_attention_heads=12, intermediate_size=3072)


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--batch", type=int, default=8)
  interleave.add_args(ap)
  ap.add_argument("--scan", action="store_true", help="scan over layers in ours")
  ap.add_argument("--profile", action="store_true",
                  help="after the rounds, profile both and split their time into matrix "
                       "products and the rest (benchmarks/profile_ops.py)")
  args = ap.parse_args()

  torch.manual_seed(0)
  hf_model = transformers.CLIPVisionModel(
      transformers.CLIPVisionConfig(**VIT_B16, attn_implementation="sdpa")).eval()
  with tempfile.TemporaryDirectory() as d:
    hf_model.save_pretrained(d, safe_serialization=True)
    cfg, params = load_clip_vision(d)
    if args.scan:
      cfg, params = load_clip_vision(d, config=dataclasses.replace(cfg, scan_layers=True))

  pixels = np.random.default_rng(0).normal(
      size=(args.batch, 224, 224, 3)).astype(np.float32)
  ours_fn = jax.jit(lambda p, x: VisionTransformer(cfg).apply({"params": p}, x))
  x_jax = jnp.asarray(pixels)
  x_torch = torch.from_numpy(pixels).permute(0, 3, 1, 2).contiguous()

  def run_ours():
    return ours_fn(params, x_jax).block_until_ready()

  def run_torch():
    with torch.no_grad():
      return hf_model(pixel_values=x_torch).last_hidden_state

  diff = float(np.abs(np.asarray(run_ours()) - run_torch().numpy()).max())
  ours_name, theirs_name = "ours (jax.jit)", "transformers (torch)"
  times = interleave.run({ours_name: run_ours, theirs_name: run_torch}, rounds=args.rounds,
                         warmup=args.warmup)
  print(interleave.environment(times))
  print(f"# ViT-B/16 forward, batch {args.batch}, float32, scan_layers {args.scan}; "
        f"max |ours - transformers| {diff:.2e}")
  print(interleave.table(times, unit="images/s", work=args.batch))
  print(interleave.ratio_line(times, ours_name, theirs_name))
  if args.profile:
    flops = matmul_flops(args.batch)
    medians = {name: interleave.stats(ts).median for name, ts in times.items()}
    print(profile_ops.report_pair((ours_name, run_ours), (theirs_name, run_torch), medians, flops=flops,
                                  what="patch embedding, dense layers, attention scores and values"))


def matmul_flops(batch: int) -> float:
  """FLOPs (2 per multiply-add) of ViT-B/16's matrix products at `batch` images."""
  c = VIT_B16
  d, mlp, p = c["hidden_size"], c["intermediate_size"], c["patch_size"]
  n = (c["image_size"] // p) ** 2
  t = n + 1
  patch = n * (p * p * 3) * d
  layer = t * (4 * d * d + 2 * d * mlp) + 2 * t * t * d
  return 2.0 * batch * (patch + c["num_hidden_layers"] * layer)


if __name__ == "__main__":
  main()
