"""`--mode describe`: parameter counts and per-device bytes, without any weights.

Everything here works on `jax.eval_shape` of the model's init, so the real
4-billion-parameter configs are described in seconds on a laptop. The total is
compared with the public checkpoints the real config is built from (DESIGN.md
section 10: ViT, Q-Former, projection, T5-XL and the CLIP text tower only).
"""
from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import traverse_util

from aligncap_jax import sharding
from aligncap_jax import train_state

# Public parameter counts of the checkpoints the real configs start from: exact
# counts of each checkpoint's unique tensors, which add up to the hub pages'
# rounded figures. hf.co/Salesforce/blip2-flan-t5-xl ("3.94B params" =
# 3_942_446_592 = the five BLIP-2 parts below, Flan-T5-XL included):
BLIP2_VIT_G = 985_952_256           # vision_model, incl. post_layernorm (ln_vision)
BLIP2_QFORMER = 105_137_664         # qformer (layernorm + 12 BERT-base layers)
BLIP2_QUERY_TOKENS = 24_576         # query_tokens 1 x 32 x 768
BLIP2_PROJECTION = 1_574_912        # language_projection 768 -> 2048
# hf.co/google/flan-t5-xl ("2.85B params"): T5 v1.1 does not tie the output layer
# to the input embedding (config.json: tie_word_embeddings false), so its
# safetensors hold `shared` and `lm_head` (32128 x 2048 each) besides the 24 + 24
# layers. transformers 5 builds T5 with the two tied and so counts 2_783_959_040,
# one 32128 x 2048 matrix fewer than the checkpoint holds.
FLAN_T5_XL = 2_849_757_184
# hf.co/openai/clip-vit-large-patch14 ("428M params" = 427_616_513 in all);
# its text tower (CLIPTextModel: embeddings, 12 layers, final layer norm):
CLIP_L14_TEXT = 123_060_480
PUBLIC_PARTS = {
    "BLIP-2 ViT-g/14": BLIP2_VIT_G,
    "BLIP-2 Q-Former (+ query tokens)": BLIP2_QFORMER + BLIP2_QUERY_TOKENS,
    "BLIP-2 language projection": BLIP2_PROJECTION,
    "Flan-T5-XL": FLAN_T5_XL,
    "CLIP ViT-L/14 text tower": CLIP_L14_TEXT,
}
PUBLIC_TOTAL = sum(PUBLIC_PARTS.values())


def abstract_variables(config: ml_collections.ConfigDict, model: nn.Module,
                       num_tags: int) -> Any:
  """`jax.eval_shape` of `model.init` on a one-region dummy batch (boxed, no weights)."""
  from aligncap_jax.models import aligncap
  batch = aligncap.dummy_batch(config, 1, num_tags)
  tag_embeddings = np.zeros((num_tags, config.model.clip_text.hidden_size), np.float32)
  key = jax.random.key(0)
  return jax.eval_shape(
      lambda: model.init({"params": key, "dropout": key}, batch, tag_embeddings, train=False))


def _shard_size(shape: tuple[int, ...], spec: jax.sharding.PartitionSpec,
                mesh_sizes: dict[str, int]) -> int:
  """Elements in one device's shard (uneven dims are replicated, as `sharding` does)."""
  shard = list(shape)
  for i, axes in enumerate(tuple(spec)[:len(shard)]):
    names = (axes,) if isinstance(axes, str) else tuple(axes or ())
    size = math.prod(mesh_sizes[a] for a in names)
    if size and shard[i] % size == 0:
      shard[i] //= size
  return math.prod(shard)


def _fmt_gib(n: float) -> str:
  return f"{n / 2**30:.3f} GiB"


def describe(config: ml_collections.ConfigDict, num_devices: int | None = None,
             model: nn.Module | None = None, num_tags: int | None = None) -> dict:
  """Prints per-module parameter counts, trainable/frozen totals and bytes per device.

  Args:
    config: the full config.
    num_devices: devices the configured mesh spans (default: `jax.device_count()`).
    model: the module to describe (default: `aligncap.build_model(config, num_tags)`).
    num_tags: tag vocabulary size (default: `config.data.tag_vocab_size`).

  Returns:
    dict with `modules` ({name: count}), `total`, `trainable`, `frozen`,
    `bytes_per_device` (parameters) and `adam_bytes_per_device` (AdamW moments of
    the trainable parameters, float32), `mesh` ({axis: size}) and, for configs
    with the reference backbones, `public_total` and `percent_difference`.
  """
  num_tags = int(config.data.tag_vocab_size if num_tags is None else num_tags)
  if model is None:
    from aligncap_jax.models import aligncap
    model = aligncap.build_model(config, num_tags)
  num_devices = jax.device_count() if num_devices is None else int(num_devices)
  mesh_sizes = dict(zip(sharding.MESH_AXES, sharding.mesh_shape(config, num_devices)))
  variables = abstract_variables(config, model, num_tags)
  boxed = variables["params"]
  specs = nn.logical_to_mesh(nn.get_partition_spec(boxed), sharding.logical_rules(config))
  params = nn.meta.unbox(boxed)
  mask = train_state.trainable_mask(config, params)
  flat = traverse_util.flatten_dict(params, sep="/")
  flat_mask = traverse_util.flatten_dict(mask, sep="/")
  flat_spec = traverse_util.flatten_dict(specs, sep="/")

  modules: dict[str, list[int]] = {}
  total = trainable = per_device = adam = 0
  for path, x in flat.items():
    n = math.prod(x.shape)
    top = path.split("/")[0]
    row = modules.setdefault(top, [0, 0])
    row[0] += n
    total += n
    shard = _shard_size(x.shape, flat_spec[path], mesh_sizes)
    per_device += shard * jnp.dtype(x.dtype).itemsize
    if flat_mask[path]:
      row[1] += n
      trainable += n
      adam += 2 * shard * 4

  width = max(len(k) for k in modules)
  print(f"mesh: {' x '.join(f'{a}={s}' for a, s in mesh_sizes.items())} "
        f"({num_devices} devices)")
  print(f"{'module'.ljust(width)}  {'parameters':>15}  {'trainable':>15}")
  for name in sorted(modules):
    n, t = modules[name]
    print(f"{name.ljust(width)}  {n:>15,}  {t:>15,}")
  print(f"frozen parameters: {total - trainable:,}")
  print(f"parameter bytes per device: {_fmt_gib(per_device)}")
  print(f"AdamW state bytes per device (trainable, float32): {_fmt_gib(adam)}")
  out = {"modules": {k: v[0] for k, v in modules.items()}, "total": total,
         "trainable": trainable, "frozen": total - trainable,
         "bytes_per_device": per_device, "adam_bytes_per_device": adam, "mesh": mesh_sizes}
  if _is_reference(config):
    pct = 100.0 * (total - PUBLIC_TOTAL) / PUBLIC_TOTAL
    for name, n in PUBLIC_PARTS.items():
      print(f"public {name}: {n:,}")
    print(f"public checkpoints' sum: {PUBLIC_TOTAL:,} ({pct:+.2f}% difference)")
    out.update(public_total=PUBLIC_TOTAL, percent_difference=pct)
  print(f"total parameters: {total}")
  print(f"trainable parameters: {trainable}")
  return out


def _is_reference(config: ml_collections.ConfigDict) -> bool:
  """Whether the backbones have the public BLIP-2 / Flan-T5-XL / CLIP-L sizes."""
  m = config.model
  return (m.vision.family == "blip2" and m.vision.hidden_size == 1408
          and m.vision.num_layers == 39 and m.llm.family == "t5"
          and m.llm.d_model == 2048 and m.llm.num_layers == 24
          and m.clip_text.hidden_size == 768 and m.clip_text.num_layers == 12)
