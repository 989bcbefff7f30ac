"""Loads the public pretrained checkpoints into AlignCap's parameters (DESIGN.md 3, 10).

`load_pretrained(config, params)` replaces whole subtrees of the model's
parameter tree with Hugging Face checkpoint tensors:

* `config.init.blip2` (a `Blip2ForConditionalGeneration` folder, e.g.
  `blip2-flan-t5-xl`): `vision` (EVA ViT + `ln_vision`), `qformer` (with its query
  tokens and layernorm), `language_projection`, and `llm` from the folder's
  `language_model.*` tensors unless `config.init.llm` is set;
* `config.init.llm`: `llm` from its own folder (T5 / Flan-T5, Llama, Qwen2);
* `config.init.clip_text`: `clip_text` from a `CLIPTextModel` or `CLIPModel` folder.

A field that is None leaves its towers as they are (their init). Before any
tensor is read, every folder's config.json is compared with `config.model.*`
and a single `WeightsError` names every field that differs (by its config
name, e.g. `model.vision.hidden_size`). Tensors are read one at a time from the
memory-mapped safetensors, cast to the dtype of the parameter they replace and
placed on its sharding, so host memory never holds two copies of a tower.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable, Mapping

import jax
import numpy as np
from absl import logging
from flax import traverse_util

from aligncap_jax.models import aligncap as aligncap_lib
from aligncap_jax.models import hf_import
from aligncap_jax.models.clip_text import CLIPTextConfig
from aligncap_jax.models.decoder_lm import DecoderLMConfig
from aligncap_jax.models.hf_import import llama as llama_import
from aligncap_jax.models.hf_import import t5 as t5_import
from aligncap_jax.models.hf_import import vision as vision_import
from aligncap_jax.models.hf_import.common import (WeightsError, SafetensorsFolder,
                                                  assemble, read_config)
from aligncap_jax.models.qformer import QFormerConfig
from aligncap_jax.models.t5 import T5Config
from aligncap_jax.models.vit import VisionConfig

PyTree = Any

# Dataclass fields that set the layout or training behaviour, not the architecture.
_NOT_ARCHITECTURE = frozenset({"scan_layers", "remat", "dropout"})
# DecoderLMConfig field -> `config.model.llm` field (the T5 and tower configs
# already use the config's names).
_DECODER_LM_NAMES = {"hidden_size": "d_model", "intermediate_size": "d_ff",
                     "num_kv_heads": "num_key_value_heads", "head_dim": "d_kv",
                     "rms_norm_eps": "layer_norm_epsilon", "qkv_bias": "attention_bias"}
_BLIP2_LM_PREFIX = "language_model."


class _PrefixedFolder:
  """The tensors of a SafetensorsFolder under `prefix`, with the prefix removed.

  Lets the single-model importers read a sub-model (BLIP-2's `language_model.*`);
  a missing tensor is reported by its full name in the folder.
  """

  def __init__(self, folder: SafetensorsFolder, prefix: str):
    self.folder, self.prefix, self.hf_dir = folder, prefix, folder.hf_dir
    self._keys = [k[len(prefix):] for k in folder.keys() if k.startswith(prefix)]

  def keys(self) -> list[str]:
    return list(self._keys)

  def __contains__(self, name: str) -> bool:
    return self.prefix + name in self.folder

  def get(self, name: str) -> np.ndarray:
    return self.folder.get(self.prefix + name)


def _tower_config(cls, cd, model_cfg):
  """A tower's dataclass config exactly as `AlignCap.setup` builds it."""
  cfg = cls.from_config(cd)
  names = {f.name for f in dataclasses.fields(cfg)}
  return dataclasses.replace(
      cfg, **{k: bool(model_cfg[k]) for k in ("scan_layers", "remat") if k in names})


def _field_diffs(section: str, ours: Any, theirs: Any, config_section: Any,
                 names: Mapping[str, str] | None = None) -> list[str]:
  """'model.SECTION.FIELD: config X vs checkpoint Y' for every architecture field
  where two dataclass configs differ. A field the config does not hold (derived
  from others) is named with its config section and its dataclass name."""
  names = names or {}
  out = []
  for f in dataclasses.fields(ours):
    if f.name in _NOT_ARCHITECTURE:
      continue
    a, b = getattr(ours, f.name), getattr(theirs, f.name)
    if a == b:
      continue
    key = names.get(f.name, f.name)
    label = (f"model.{section}.{key}" if key in config_section
             else f"model.{section} (derived {f.name})")
    out.append(f"{label}: config {a!r} vs checkpoint {b!r}")
  return out


def _folder_config(field: str, path: str) -> dict:
  """The config.json of the folder in `config.init.FIELD`, with errors naming both."""
  if not os.path.isdir(path):
    raise WeightsError(f"config.init.{field}: '{path}' is not a folder")
  if not os.path.exists(os.path.join(path, "config.json")):
    raise WeightsError(f"config.init.{field}: no config.json in '{path}' "
                          f"(missing '{os.path.join(path, 'config.json')}')")
  return read_config(path)


def _t5_from_folder(hf: dict, folder: Any) -> T5Config:
  """T5Config of a folder as transformers resolves it (see `hf_import.t5`), except
  that a saved `dense_act_fn` is what the folder's config.json says.

  transformers turns `feed_forward_proj="gated-gelu"` into `gelu_new` whatever
  `dense_act_fn` says; BLIP-2's checkpoints store `dense_act_fn="gelu"`, the
  activation the reference (LAVIS) runs Flan-T5 with, and the config files
  follow the stored value (DESIGN.md section 3).
  """
  cfg = T5Config.from_hf(hf)
  untied = "lm_head.weight" in folder and (
      not cfg.tie_word_embeddings
      or not np.array_equal(folder.get("lm_head.weight"), folder.get("shared.weight")))
  cfg = dataclasses.replace(cfg, tie_word_embeddings=not untied)
  if "dense_act_fn" in hf:
    cfg = dataclasses.replace(cfg, dense_act_fn=hf["dense_act_fn"])
  return cfg


def _llm_from_folder(family: str, hf: dict, folder: Any, where: str) -> Any:
  model_type = hf.get("model_type")
  known = {"t5": ("t5",), "llama": ("llama", "qwen2")}[family]
  if model_type is not None and model_type not in known:
    raise WeightsError(f"model.llm.family: config {family!r} vs checkpoint model_type "
                          f"{model_type!r} in '{where}'")
  if family == "t5":
    return _t5_from_folder(hf, folder)
  return DecoderLMConfig.from_hf(hf)


def _load_llm(family: str, theirs: Any, folder: Any, abstract: PyTree,
              shardings: PyTree) -> dict:
  """The LLM's params from `folder` (a folder or a prefixed view), in the layout of
  `abstract` (stacked when scanned), each leaf cast to `abstract`'s dtype."""
  if family == "t5":
    stacked = hf_import.is_stacked(abstract, "encoder_layers")
    source = hf_import.StackingFolder(folder, {"encoder.block.": theirs.num_layers,
                                               "decoder.block.": theirs.num_decoder_layers})
    ignore = [r"^(encoder|decoder)\.embed_tokens\.weight$"]
    mapping = t5_import.mapping(theirs, stacked)
  else:
    stacked = hf_import.is_stacked(abstract, "layers")
    source = hf_import.StackingFolder(folder, {"model.layers.": theirs.num_layers})
    ignore = [r"\.rotary_emb\.inv_freq$"]
    mapping = llama_import.mapping(theirs, stacked)
  if theirs.tie_word_embeddings:
    ignore.append(r"^lm_head\.weight$")
  return assemble(source, mapping, abstract, ignore_unused=ignore, shardings=shardings)


def _load_projection(folder: SafetensorsFolder, abstract: PyTree, shardings: PyTree) -> dict:
  """BLIP-2's `language_projection` (torch Linear) -> Dense {kernel [Dq, D], bias [D]}."""
  mapping = {"kernel": ("language_projection.weight", hf_import.linear_t),
             "bias": ("language_projection.bias", lambda x: x)}
  return assemble(folder, mapping, abstract, prefix="language_projection.",
                  shardings=shardings)


def _single_dtype(tower: str, tree: PyTree) -> Any:
  dtypes = {np.dtype(x.dtype) for x in jax.tree.leaves(tree)}
  if len(dtypes) != 1:
    raise WeightsError(f"params['{tower}'] mixes dtypes {sorted(map(str, dtypes))}; "
                          "the importer casts a tower to one dtype")
  return dtypes.pop()


def _shardings_of(tree: PyTree) -> PyTree | None:
  """Each leaf's `.sharding` (arrays, or ShapeDtypeStructs built with one), else None."""
  shardings = jax.tree.map(lambda x: getattr(x, "sharding", None), tree)
  leaves = jax.tree.leaves(shardings, is_leaf=lambda x: x is None)
  return None if any(s is None for s in leaves) else shardings


def _check_same_layout(tower: str, loaded: PyTree, model: PyTree) -> None:
  """The loaded subtree must have the model's paths, shapes and dtypes."""
  got = {"/".join(k): v for k, v in traverse_util.flatten_dict(loaded).items()}
  want = {"/".join(k): v for k, v in traverse_util.flatten_dict(model).items()}
  if set(got) != set(want):
    raise WeightsError(
        f"params['{tower}']: the importer built {sorted(set(got) - set(want))[:5]} and "
        f"missed {sorted(set(want) - set(got))[:5]} of the model's parameters")
  bad = [f"{p}: {tuple(got[p].shape)} {got[p].dtype} vs model {tuple(want[p].shape)} "
         f"{want[p].dtype}" for p in sorted(want)
         if tuple(got[p].shape) != tuple(want[p].shape) or got[p].dtype != want[p].dtype]
  if bad:
    raise WeightsError(f"params['{tower}'] loaded with the wrong layout: {bad[:5]}")


@dataclasses.dataclass
class _Job:
  """One subtree to replace: `load(abstract, shardings) -> params`, and its source."""
  tower: str
  source: str
  load: Callable[[PyTree, PyTree], dict]


def _plan(config, params: PyTree) -> tuple[list[_Job], list[str]]:
  """Checks every configured folder against `config.model` and returns the jobs.

  Raises:
    WeightsError: naming every differing field, or a missing folder/config.json.
  """
  m, init = config.model, config.init
  jobs: list[_Job] = []
  diffs: list[str] = []
  blip2_path, llm_path, clip_path = init.blip2, init.llm, init.clip_text
  llm_ours = aligncap_lib.llm_module(config).config
  llm_names = _DECODER_LM_NAMES if m.llm.family == "llama" else {}

  if blip2_path is not None:
    hf = _folder_config("blip2", blip2_path)
    folder = SafetensorsFolder(blip2_path)
    vision_ours = _tower_config(VisionConfig, m.vision, m)
    vision_theirs = VisionConfig.from_hf(hf.get("vision_config") or {}, "blip2")
    diffs += _field_diffs("vision", vision_ours, vision_theirs, m.vision)
    qformer_ours = _tower_config(QFormerConfig, m.qformer, m)
    diffs += _field_diffs("qformer", qformer_ours, QFormerConfig.from_hf(hf), m.qformer)
    jobs.append(_Job("vision", blip2_path, lambda a, s: vision_import.load_blip2_vision(
        blip2_path, shardings=s, dtype=_single_dtype("vision", a), config=vision_ours)[1]))
    jobs.append(_Job("qformer", blip2_path, lambda a, s: vision_import.load_blip2_qformer(
        blip2_path, shardings=s, dtype=_single_dtype("qformer", a), config=qformer_ours)[1]))
    jobs.append(_Job("language_projection", blip2_path,
                     lambda a, s: _load_projection(folder, a, s)))
    if llm_path is None:
      view = _PrefixedFolder(folder, _BLIP2_LM_PREFIX)
      where = f"{blip2_path} (text_config)"
      theirs = _llm_from_folder(m.llm.family, hf.get("text_config") or {}, view, where)
      diffs += _field_diffs("llm", llm_ours, theirs, m.llm, llm_names)
      jobs.append(_Job("llm", f"{blip2_path} ({_BLIP2_LM_PREFIX}*)",
                       lambda a, s: _load_llm(m.llm.family, theirs, view, a, s)))

  if llm_path is not None:
    hf = _folder_config("llm", llm_path)
    llm_folder = SafetensorsFolder(llm_path)
    llm_theirs = _llm_from_folder(m.llm.family, hf, llm_folder, llm_path)
    diffs += _field_diffs("llm", llm_ours, llm_theirs, m.llm, llm_names)
    jobs.append(_Job("llm", llm_path,
                     lambda a, s: _load_llm(m.llm.family, llm_theirs, llm_folder, a, s)))

  if clip_path is not None:
    hf = _folder_config("clip_text", clip_path)
    clip_ours = _tower_config(CLIPTextConfig, m.clip_text, m)
    diffs += _field_diffs("clip_text", clip_ours, CLIPTextConfig.from_hf(hf), m.clip_text)
    jobs.append(_Job("clip_text", clip_path, lambda a, s: vision_import.load_clip_text(
        clip_path, shardings=s, dtype=_single_dtype("clip_text", a), config=clip_ours)[1]))

  if diffs:
    raise WeightsError("the pretrained checkpoints differ from the config: "
                          + "; ".join(diffs))
  missing = [j.tower for j in jobs if j.tower not in params]
  if missing:
    raise WeightsError(f"params has no subtree {missing} to load into "
                          f"(top-level keys: {sorted(params)})")
  untouched = [t for t in ("vision", "qformer", "language_projection", "llm", "clip_text")
               if t not in {j.tower for j in jobs}]
  return jobs, untouched


def load_pretrained(config, params: PyTree, *, shardings: PyTree = None,
                    donate: bool = False) -> PyTree:
  """Replaces the pretrained towers of AlignCap's params with checkpoint tensors.

  Args:
    config: the full config; `config.init.{blip2, llm, clip_text}` name local
      Hugging Face folders (None: that tower keeps what `params` holds) and
      `config.model.*` must match their config.json.
    params: the model's (unboxed) parameter dict with top-level `vision`,
      `qformer`, `language_projection`, `llm`, `clip_text`: arrays, or
      `jax.ShapeDtypeStruct`s (e.g. `StateFactory.abstract_state.params`).
      Only shapes, dtypes and shardings of the replaced subtrees are read.
    shardings: optional tree of Shardings matching `params`; by default each
      leaf's own `.sharding` when every leaf of the subtree has one.
    donate: delete the arrays of each replaced subtree before its checkpoint is
      placed, so device memory never holds the init and the checkpoint of a tower
      at once (the caller must not use those arrays afterwards).

  Returns:
    A new dict: `params` with the loaded subtrees replaced, each leaf of the
    replaced parameter's dtype (the frozen towers' bf16, the Q-Former's f32) and
    placed on its sharding; the other entries are `params`' own.

  Raises:
    WeightsError: a configured folder or its config.json is missing, a
      config field differs from a folder's config.json (all of them are named),
      or a tensor is missing, unexpected or of the wrong shape (named).
  """
  jobs, untouched = _plan(config, params)
  out = dict(params)
  for job in jobs:
    model_sub = params[job.tower]
    sub_shardings = (shardings[job.tower] if shardings is not None
                     else _shardings_of(model_sub))
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), model_sub)
    if donate:
      for leaf in jax.tree.leaves(model_sub):
        if isinstance(leaf, jax.Array):
          leaf.delete()
    loaded = job.load(abstract, sub_shardings)
    _check_same_layout(job.tower, loaded, abstract)
    out[job.tower] = loaded
  by_source: dict[str, list[str]] = {}
  for job in jobs:
    by_source.setdefault(job.source, []).append(job.tower)
  logging.info("pretrained weights: %s; kept as initialised: %s",
               "; ".join(f"{', '.join(t)} from {s}" for s, t in by_source.items()) or "none",
               ", ".join(untouched) or "none")
  return out


__all__ = ["load_pretrained", "WeightsError"]
