"""ViT forward: our jitted Flax tower vs transformers' CLIPVisionModel (PyTorch).

CLIP ViT-B/16 shape (224 px, patch 16, width 768, 12 layers, 12 heads, MLP
3072), random weights written once as a Hugging Face folder and loaded into
both (ours through `hf_import.vision.load_clip_vision`), batch 8, float32 on
the host CPU. One warm-up call each (compilation excluded), then `--repeats`
timed calls each, interleaved; prints images/s (median) and the ratio.

  python benchmarks/vit_forward.py [--batch 8] [--repeats 5] [--scan]
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
import torch
import transformers

from aligncap_jax.models.hf_import.vision import load_clip_vision
from aligncap_jax.models.vit import VisionTransformer

VIT_B16 = dict(image_size=224, patch_size=16, hidden_size=768, num_hidden_layers=12,
               num_attention_heads=12, intermediate_size=3072)


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--batch", type=int, default=8)
  ap.add_argument("--repeats", type=int, default=5)
  ap.add_argument("--scan", action="store_true", help="scan over layers in ours")
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

  diff = float(np.abs(np.asarray(run_ours()) - run_torch().numpy()).max())  # warm-up
  times = {"ours (jax.jit)": [], "transformers (torch)": []}
  for _ in range(args.repeats):
    for name, fn in (("ours (jax.jit)", run_ours), ("transformers (torch)", run_torch)):
      t0 = time.perf_counter()
      fn()
      times[name].append(time.perf_counter() - t0)

  print(f"ViT-B/16 forward, batch {args.batch}, float32, {jax.devices()[0].platform} "
        f"({os.cpu_count()} cores, torch threads {torch.get_num_threads()}), "
        f"{args.repeats} timed calls each after one warm-up; max |diff| {diff:.2e}")
  print(f"{'implementation':<24}{'median s/call':>15}{'images/s':>12}")
  rate = {}
  for name, ts in times.items():
    med = statistics.median(ts)
    rate[name] = args.batch / med
    print(f"{name:<24}{med:>15.3f}{rate[name]:>12.2f}")
  print(f"ratio ours / transformers: {rate['ours (jax.jit)'] / rate['transformers (torch)']:.2f}x")


if __name__ == "__main__":
  main()
