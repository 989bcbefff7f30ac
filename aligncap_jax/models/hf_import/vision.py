"""Hugging Face import for the vision towers, the Q-Former and the CLIP text tower.

Families (`FAMILIES[name](hf_dir, *, shardings=None, dtype=None, config=None)
-> (config, params)`):

* `blip2_vision`, `blip2_qformer`: read out of a full BLIP-2 folder
  (`Blip2ForConditionalGeneration`); the language model's tensors are ignored.
* `clip_text`, `clip_vision`: a `CLIPTextModel` / `CLIPVisionModel` folder, or a
  `CLIPModel` folder (the tower is read out of it).
* `siglip_vision`: a `SiglipVisionModel` or `SiglipModel` folder (the attention
  pooling head is not used).

`params` is the Flax param tree of the module (what goes under
`variables["params"]`). With `config` given, its architecture fields are
checked against the folder (a difference is an error naming the field) and its
`scan_layers` decides the layout (stacked on a leading `layers` axis when on);
without it, the config comes from the folder, unscanned. Every tensor is read
on its own from the memory-mapped safetensors, converted, checked against its
expected Hugging Face shape and placed on its sharding, so host memory never
holds two copies of the model. A missing or unexpected tensor, or a shape
mismatch, is a `WeightsError` naming the tensor.
"""
from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, Callable, Iterable, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from aligncap_jax.models.clip_text import CLIPTextConfig, CLIPTextEncoder
from aligncap_jax.models.hf_import.common import (WeightsError, SafetensorsFolder,
                                                  check_config_fields, read_config)
from aligncap_jax.models.qformer import QFormer, QFormerConfig
from aligncap_jax.models.vit import VisionConfig, VisionTransformer


@dataclasses.dataclass(frozen=True)
class Source:
  """HF tensors `names` (expected torch shapes `shapes`) combined by `fn` into one leaf."""
  names: tuple[str, ...]
  shapes: tuple[tuple[int, ...], ...]
  fn: Callable[..., np.ndarray]


def _copy(name: str, shape: Sequence[int], out_shape: Sequence[int] | None = None) -> Source:
  out = tuple(out_shape) if out_shape is not None else tuple(shape)
  return Source((name,), (tuple(shape),), lambda a: a.reshape(out))


def _linear(name: str, d_in: int, out_shape: Sequence[int], bias: bool = True) -> dict:
  """torch Linear(d_in -> prod(out_shape)) -> {'kernel': [d_in, *out], 'bias': [*out]}."""
  d_out = math.prod(out_shape)
  out = {"kernel": Source((f"{name}.weight",), ((d_out, d_in),),
                          lambda w: w.T.reshape(d_in, *out_shape))}
  if bias:
    out["bias"] = _copy(f"{name}.bias", (d_out,), out_shape)
  return out


def _linear_out(name: str, in_shape: Sequence[int], d_out: int) -> dict:
  """torch Linear(prod(in_shape) -> d_out) -> kernel [*in_shape, d_out]."""
  d_in = math.prod(in_shape)
  return {"kernel": Source((f"{name}.weight",), ((d_out, d_in),),
                           lambda w: w.T.reshape(*in_shape, d_out)),
          "bias": _copy(f"{name}.bias", (d_out,))}


def _layer_norm(name: str, dim: int) -> dict:
  return {"scale": _copy(f"{name}.weight", (dim,)), "bias": _copy(f"{name}.bias", (dim,))}


def _fused_qkv(prefix: str, c: int, heads: int) -> dict:
  """Separate q/k/v_proj Linear(c -> c) -> qkv kernel [c, 3, H, D], bias [3, H, D]."""
  names = tuple(f"{prefix}.{p}_proj" for p in "qkv")
  d = c // heads
  return {
      "kernel": Source(tuple(f"{n}.weight" for n in names), ((c, c),) * 3,
                       lambda *ws: np.stack([w.T for w in ws], 1).reshape(c, 3, heads, d)),
      "bias": Source(tuple(f"{n}.bias" for n in names), ((c,),) * 3,
                     lambda *bs: np.stack(bs).reshape(3, heads, d)),
  }


def _encoder_layer(p: str, cfg_c: int, heads: int, mlp: int, blip2: bool) -> dict:
  """One pre-LN layer (`vit.EncoderLayer`) at HF prefix p (`...layers.{i}`)."""
  if blip2:
    attn = {"qkv": _linear(f"{p}.self_attn.qkv", cfg_c, (3, heads, cfg_c // heads),
                           bias=True),
            "out": _linear_out(f"{p}.self_attn.projection", (heads, cfg_c // heads), cfg_c)}
  else:
    attn = {"qkv": _fused_qkv(f"{p}.self_attn", cfg_c, heads),
            "out": _linear_out(f"{p}.self_attn.out_proj", (heads, cfg_c // heads), cfg_c)}
  return {"ln1": _layer_norm(f"{p}.layer_norm1", cfg_c), "attn": attn,
          "ln2": _layer_norm(f"{p}.layer_norm2", cfg_c),
          "mlp": {"fc1": _linear(f"{p}.mlp.fc1", cfg_c, (mlp,)),
                  "fc2": _linear(f"{p}.mlp.fc2", mlp, (cfg_c,))}}


def _flat(tree: Mapping, prefix: str = "") -> dict[str, Any]:
  return {prefix + "/".join(k): v for k, v in traverse_util.flatten_dict(tree).items()}


def _layers(per_layer: Callable[[int], dict], num_layers: int, scan: bool,
            name: str = "layers") -> dict[str, Any]:
  """Flat mapping of `num_layers` layers: `{name}_{i}/...` or stacked `{name}/...`."""
  if not scan:
    out = {}
    for i in range(num_layers):
      out.update(_flat(per_layer(i), f"{name}_{i}/"))
    return out
  flats = [_flat(per_layer(i), f"{name}/") for i in range(num_layers)]
  return {k: [f[k] for f in flats] for k in flats[0]}


def assemble_sources(folder: SafetensorsFolder, mapping: Mapping[str, Any],
                     abstract_params: Any, *, prefixes: tuple[str, ...],
                     ignore_unused: Iterable[str] = (), shardings: Any = None,
                     dtype: Any = None) -> dict:
  """Builds the param tree from `mapping` ('/'-joined path -> Source or a list of
  Sources stacked on a new leading axis), one leaf at a time.

  Raises WeightsError naming the tensor for a missing tensor, a shape that
  differs from the expected Hugging Face shape, or a tensor under one of
  `prefixes` that nothing reads (unless it matches an `ignore_unused` regex).
  """
  flat_abs = _flat(abstract_params)
  flat_sh = _flat(shardings) if shardings is not None else {}
  if set(flat_abs) != set(mapping):
    raise WeightsError(
        f"importer/model mismatch: no source for {sorted(set(flat_abs) - set(mapping))}, "
        f"unknown targets {sorted(set(mapping) - set(flat_abs))}")
  used: set[str] = set()

  def read(src: Source, path: str) -> np.ndarray:
    arrays = []
    for name, shape in zip(src.names, src.shapes):
      a = folder.get(name)
      if tuple(a.shape) != shape:
        raise WeightsError(
            f"shape mismatch for tensor '{name}' -> '{path}' in '{folder.hf_dir}': "
            f"checkpoint {tuple(a.shape)} vs expected {shape}")
      used.add(name)
      arrays.append(a)
    return src.fn(*arrays)

  leaves = {}
  for path, src in mapping.items():
    want = flat_abs[path]
    out_dtype = dtype or want.dtype
    if isinstance(src, list):
      arr = np.empty(want.shape, out_dtype)
      for i, s in enumerate(src):
        arr[i] = read(s, path)
    else:
      arr = np.asarray(read(src, path), out_dtype)
    if arr.shape != tuple(want.shape):
      raise WeightsError(f"importer built {arr.shape} for '{path}', model wants "
                            f"{tuple(want.shape)}")
    leaves[path] = (jax.device_put(arr, flat_sh[path], may_alias=False) if path in flat_sh
                    else jnp.array(arr))
  pats = [re.compile(p) for p in ignore_unused]
  unexpected = sorted(k for k in folder.keys() if k.startswith(prefixes)
                      and k not in used and not any(p.search(k) for p in pats))
  if unexpected:
    raise WeightsError(f"unexpected tensors in '{folder.hf_dir}': {unexpected[:10]}"
                          f"{' ...' if len(unexpected) > 10 else ''}")
  return traverse_util.unflatten_dict({tuple(k.split("/")): v for k, v in leaves.items()})


def _abstract(module: nn.Module, *inputs) -> Any:
  shapes = jax.eval_shape(lambda: module.init(jax.random.key(0), *inputs))
  return nn.unbox(shapes)["params"]


def _resolve(family: str, ours: Any, folder_cfg: Any, hf_dir: str,
             extra: Mapping[str, Any] | None = None) -> Any:
  """The config to build: `ours` checked against the folder's, else the folder's.

  `extra` holds fields outside `to_hf()` (name -> the folder's value)."""
  if ours is None:
    return folder_cfg
  extra = dict(extra or {})
  check_config_fields(family, {**folder_cfg.to_hf(), **extra},
                      {**ours.to_hf(), **{k: getattr(ours, k) for k in extra}}, hf_dir)
  return ours


def _tower_prefix(folder: SafetensorsFolder, name: str) -> str:
  """`name + '.'` when the folder nests the tower (CLIPModel, pre-v5 saves), else ''."""
  return f"{name}." if any(k.startswith(f"{name}.") for k in folder.keys()) else ""


def _vision_mapping(cfg: VisionConfig, p: str) -> dict:
  c, heads, n = cfg.hidden_size, cfg.num_heads, cfg.num_tokens
  ps = cfg.patch_size
  e = f"{p}embeddings."
  patch = {"kernel": Source((f"{e}patch_embedding.weight",), ((c, 3, ps, ps),),
                            lambda w: w.transpose(2, 3, 1, 0))}
  if cfg.family != "clip":
    patch["bias"] = _copy(f"{e}patch_embedding.bias", (c,))
  top: dict[str, Any] = {"patch_embed": patch}
  if cfg.family == "blip2":
    top["cls_token"] = _copy(f"{e}class_embedding", (1, 1, c), (c,))
    top["pos_embed"] = _copy(f"{e}position_embedding", (1, n, c), (n, c))
    top["post_norm"] = _layer_norm(f"{p}post_layernorm", c)
  elif cfg.family == "clip":
    top["cls_token"] = _copy(f"{e}class_embedding", (c,))
    top["pos_embed"] = _copy(f"{e}position_embedding.weight", (n, c))
    top["pre_norm"] = _layer_norm(f"{p}pre_layrnorm", c)
  else:
    top["pos_embed"] = _copy(f"{e}position_embedding.weight", (n - 1, c))
    top["post_norm"] = _layer_norm(f"{p}post_layernorm", c)
  mapping = _flat(top)
  mapping.update(_layers(
      lambda i: _encoder_layer(f"{p}encoder.layers.{i}", c, heads, cfg.mlp_dim,
                               cfg.family == "blip2"),
      cfg.num_layers, cfg.scan_layers))
  return mapping


def _load_vision(family: str, hf_dir: str, *, shardings=None, dtype=None,
                 config: VisionConfig | None = None):
  hf = read_config(hf_dir)
  folder = SafetensorsFolder(hf_dir)
  if family == "blip2":
    sub, p = hf.get("vision_config") or {}, "vision_model."
  else:
    sub = hf["vision_config"] if "vision_config" in hf else hf
    p = _tower_prefix(folder, "vision_model")
  cfg = _resolve(f"{family}_vision", config, VisionConfig.from_hf(sub, family), hf_dir,
                 {"family": family})
  ignore = {"blip2": [], "clip": [rf"^{re.escape(p)}post_layernorm\."],
            "siglip": [rf"^{re.escape(p)}head\."]}[family]
  module = VisionTransformer(cfg)
  abstract = _abstract(module, jnp.zeros((1, cfg.image_size, cfg.image_size, 3)))
  params = assemble_sources(folder, _vision_mapping(cfg, p), abstract, prefixes=(p,),
                            ignore_unused=ignore, shardings=shardings, dtype=dtype)
  return cfg, params


def load_blip2_vision(hf_dir: str, *, shardings=None, dtype=None,
                      config: VisionConfig | None = None):
  """BLIP-2's EVA ViT + `ln_vision` out of a full BLIP-2 folder -> (VisionConfig, params)."""
  return _load_vision("blip2", hf_dir, shardings=shardings, dtype=dtype, config=config)


def load_clip_vision(hf_dir: str, *, shardings=None, dtype=None,
                     config: VisionConfig | None = None):
  """A CLIPVisionModel (or CLIPModel's vision tower) -> (VisionConfig, params)."""
  return _load_vision("clip", hf_dir, shardings=shardings, dtype=dtype, config=config)


def load_siglip_vision(hf_dir: str, *, shardings=None, dtype=None,
                       config: VisionConfig | None = None):
  """A SiglipVisionModel (or SiglipModel's vision tower) -> (VisionConfig, params)."""
  return _load_vision("siglip", hf_dir, shardings=shardings, dtype=dtype, config=config)


def _bert_attention(p: str, h: int, kv: int, heads: int) -> dict:
  d = h // heads
  a = f"{p}.attention"
  return {"query": _linear(f"{a}.query", h, (heads, d)),
          "key": _linear(f"{a}.key", kv, (heads, d)),
          "value": _linear(f"{a}.value", kv, (heads, d)),
          "dense": _linear_out(f"{p}.output.dense", (heads, d), h),
          "norm": _layer_norm(f"{p}.output.LayerNorm", h)}


def _qformer_layer(cfg: QFormerConfig, i: int) -> dict:
  p, h = f"qformer.encoder.layer.{i}", cfg.hidden_size
  out = {"self_attn": _bert_attention(f"{p}.attention", h, h, cfg.num_heads),
         "fc1": _linear(f"{p}.intermediate_query.dense", h, (cfg.intermediate_size,)),
         "fc2": _linear(f"{p}.output_query.dense", cfg.intermediate_size, (h,)),
         "ffn_norm": _layer_norm(f"{p}.output_query.LayerNorm", h)}
  if i % cfg.cross_attention_frequency == 0:
    out["cross_attn"] = _bert_attention(f"{p}.crossattention", h,
                                        cfg.encoder_hidden_size, cfg.num_heads)
  return out


def load_blip2_qformer(hf_dir: str, *, shardings=None, dtype=None,
                       config: QFormerConfig | None = None):
  """BLIP-2's Q-Former (query tokens, layernorm, layers) out of a full BLIP-2 folder.

  Returns (QFormerConfig, params). The text-only parts of a Q-Former trained with
  text input (`use_qformer_text_input`: word/position embeddings, text FFN) are
  not used and skipped.
  """
  hf = read_config(hf_dir)
  folder = SafetensorsFolder(hf_dir)
  cfg = _resolve("blip2_qformer", config, QFormerConfig.from_hf(hf), hf_dir,
                 {"num_query_tokens": hf.get("num_query_tokens", 32)})
  h, q = cfg.hidden_size, cfg.num_query_tokens
  mapping = _flat({"query_tokens": _copy("query_tokens", (1, q, h)),
                   "layernorm": _layer_norm("qformer.layernorm", h)})
  freq = cfg.cross_attention_frequency
  if cfg.scan_layers:
    for r in range(freq):
      mapping.update(_layers(lambda j, r=r: {f"layer_{r}": _qformer_layer(cfg, j * freq + r)},
                             cfg.num_layers // freq, True))
  else:
    mapping.update(_layers(lambda i: _qformer_layer(cfg, i), cfg.num_layers, False))
  ignore = []
  if (hf.get("qformer_config") or {}).get("use_qformer_text_input", False):
    ignore = [r"^qformer\.embeddings\.",
              r"^qformer\.encoder\.layer\.\d+\.(intermediate|output)\."]
  module = QFormer(cfg)
  abstract = _abstract(module, jnp.zeros((1, 1, cfg.encoder_hidden_size)))
  params = assemble_sources(folder, mapping, abstract,
                            prefixes=("qformer.", "query_tokens"), ignore_unused=ignore,
                            shardings=shardings, dtype=dtype)
  return cfg, params


def load_clip_text(hf_dir: str, *, shardings=None, dtype=None,
                   config: CLIPTextConfig | None = None):
  """A CLIPTextModel folder (or CLIPModel's text tower) -> (CLIPTextConfig, params)."""
  hf = read_config(hf_dir)
  folder = SafetensorsFolder(hf_dir)
  cfg = _resolve("clip_text", config, CLIPTextConfig.from_hf(hf), hf_dir)
  p = _tower_prefix(folder, "text_model")
  d = cfg.hidden_size
  mapping = _flat({
      "token_embedding": {"embedding": _copy(f"{p}embeddings.token_embedding.weight",
                                             (cfg.vocab_size, d))},
      "position_embedding": _copy(f"{p}embeddings.position_embedding.weight",
                                  (cfg.max_position_embeddings, d)),
      "final_norm": _layer_norm(f"{p}final_layer_norm", d)})
  mapping.update(_layers(
      lambda i: _encoder_layer(f"{p}encoder.layers.{i}", d, cfg.num_heads,
                               cfg.intermediate_size, blip2=False),
      cfg.num_layers, cfg.scan_layers))
  module = CLIPTextEncoder(cfg)
  abstract = _abstract(module, jnp.zeros((1, 1), jnp.int32))
  params = assemble_sources(folder, mapping, abstract, prefixes=(p,),
                            shardings=shardings, dtype=dtype)
  return cfg, params


FAMILIES = {
    "blip2_vision": load_blip2_vision,
    "blip2_qformer": load_blip2_qformer,
    "clip_text": load_clip_text,
    "clip_vision": load_clip_vision,
    "siglip_vision": load_siglip_vision,
}
