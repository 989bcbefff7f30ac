"""`--mode describe`: per-module counts, trainable set and bytes per device."""
from __future__ import annotations

import importlib.util
import pathlib
import re

import flax.linen as nn
import jax.numpy as jnp
import pytest

from aligncap_jax import config as config_lib
from aligncap_jax import describe

ROOT = pathlib.Path(__file__).resolve().parents[1]
TRAINABLE_MODULES = ("cross_view", "view_fusion", "qformer", "language_projection", "tagging",
                     "prompt_vector")
FROZEN_MODULES = ("vision", "llm", "clip_text")


def _config(name: str, arg: str | None = None):
  spec = importlib.util.spec_from_file_location(name, ROOT / "configs" / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


def test_vg_t5xl_matches_the_public_checkpoints(capsys):
  config = _config("vg_t5xl")
  out = describe.describe(config, num_devices=8)
  text = capsys.readouterr().out
  lines = text.strip().splitlines()
  assert lines[-2] == f"total parameters: {out['total']}"
  assert lines[-1] == f"trainable parameters: {out['trainable']}"
  assert re.fullmatch(r"total parameters: \d+", lines[-2])
  assert abs(out["total"] - describe.PUBLIC_TOTAL) / describe.PUBLIC_TOTAL < 0.05
  assert out["percent_difference"] == pytest.approx(
      100 * (out["total"] - describe.PUBLIC_TOTAL) / describe.PUBLIC_TOTAL)
  mods = out["modules"]
  # The frozen towers have exactly the public architectures' sizes.
  assert mods["vision"] == describe.BLIP2_VIT_G
  assert mods["llm"] == describe.FLAN_T5_XL
  assert mods["language_projection"] == describe.BLIP2_PROJECTION
  assert abs(mods["clip_text"] - describe.CLIP_L14_TEXT) <= 768 * 768
  assert abs(mods["qformer"] - describe.BLIP2_QFORMER - describe.BLIP2_QUERY_TOKENS) < 0.01 * (
      describe.BLIP2_QFORMER)


def test_vg_t5xl_trainable_set_is_the_designs(capsys):
  config = _config("vg_t5xl")
  out = describe.describe(config, num_devices=8)
  capsys.readouterr()
  mods = out["modules"]
  query_tokens = config.model.qformer.num_query_tokens * config.model.qformer.hidden_size
  heads = sum(n for k, n in mods.items() if k.startswith(("cond_", "multi_")))
  assert heads > 0
  want_trainable = sum(mods[k] for k in TRAINABLE_MODULES) + heads - query_tokens
  assert out["trainable"] == want_trainable
  assert out["frozen"] == sum(mods[k] for k in FROZEN_MODULES) + query_tokens
  assert set(mods) == set(TRAINABLE_MODULES) | set(FROZEN_MODULES) | {
      k for k in mods if k.startswith(("cond_", "multi_"))}
  # 8-way fsdp: the bf16 towers are split, so a device holds well under 1/4 of 8 GB.
  assert out["bytes_per_device"] < 2 * 2**30


class _Toy(nn.Module):
  """Known shapes and logical axes, the AlignCap call signature."""
  config: object
  num_tags: int

  @nn.compact
  def __call__(self, batch, tag_embeddings, train=False):
    p = lambda name, axes, shape, dt: self.param(
        name, nn.with_logical_partitioning(nn.initializers.zeros, axes), shape, dt)
    kernel = p("kernel", ("embed", "mlp"), (24, 16), jnp.bfloat16)   # 24/8 rows per device
    bias = p("bias", ("mlp",), (16,), jnp.float32)                   # mlp -> tensor=1
    odd = p("odd", ("embed",), (20,), jnp.float32)                   # 20 % 8 != 0: replicated
    vec = p("prompt_vector", ("embed",), (24,), jnp.float32)         # trainable
    return (kernel.sum() + bias.sum() + odd.sum() + vec.sum()) * 0.0


def test_bytes_per_device_by_hand(capsys):
  config = _config("vg_t5xl", "smoke")
  config.mesh.update(data=1, fsdp=-1, tensor=1)
  config.trainable = [r"^prompt_vector$"]
  config_lib.validate(config)
  out = describe.describe(config, num_devices=8, model=_Toy(config, 4), num_tags=4)
  text = capsys.readouterr().out
  assert out["total"] == 24 * 16 + 16 + 20 + 24
  assert out["trainable"] == 24
  assert out["bytes_per_device"] == 3 * 16 * 2 + 16 * 4 + 20 * 4 + 3 * 4
  assert out["adam_bytes_per_device"] == 2 * 3 * 4
  assert "public checkpoints' sum" not in text   # not the reference backbones
  assert text.strip().splitlines()[-2:] == ["total parameters: 444", "trainable parameters: 24"]
  one = describe.describe(config, num_devices=1, model=_Toy(config, 4), num_tags=4)
  assert one["bytes_per_device"] == 24 * 16 * 2 + 16 * 4 + 20 * 4 + 24 * 4
