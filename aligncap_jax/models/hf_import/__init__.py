"""Hugging Face checkpoint import: one registry over every model family.

`load(family, hf_dir)` returns `(config dataclass, params)` for a local folder
(config.json + safetensors, sharded or not). Text families (`t5`, `llama`, the
latter also reading Qwen2) live here; vision families come from
`hf_import.vision.FAMILIES` and are imported lazily.
"""
from __future__ import annotations

import importlib
from typing import Any

import numpy as np

from aligncap_jax.models.hf_import.common import WeightsError, SafetensorsFolder

_TEXT_FAMILIES = {"t5": "aligncap_jax.models.hf_import.t5",
                  "llama": "aligncap_jax.models.hf_import.llama"}
_VISION_FAMILIES = ("blip2_vision", "blip2_qformer", "clip_text", "clip_vision",
                    "siglip_vision")


def families() -> list[str]:
  """Every family name `load` accepts."""
  return sorted(set(_TEXT_FAMILIES) | set(_VISION_FAMILIES))


def load(family: str, hf_dir: str, *, abstract: Any = None, shardings: Any = None,
         dtype: Any = None) -> tuple[Any, dict]:
  """Loads a Hugging Face folder into our Flax parameter layout.

  Args:
    family: one of `families()`.
    hf_dir: local folder with config.json and model.safetensors[.index.json].
    abstract: (text families) the target module's abstract params
      (ShapeDtypeStructs or arrays); decides the layer layout (stacked when it
      was built with `scan_layers=True`) and checks every shape. Default: the
      unscanned layout from the folder's config.
    shardings: optional pytree of Shardings matching the params; each tensor is
      placed straight onto its sharding.
    dtype: cast every tensor to this dtype (default float32, or the abstract
      leaf's dtype).

  Returns:
    (config dataclass, params dict).
  """
  if family in _TEXT_FAMILIES:
    module = importlib.import_module(_TEXT_FAMILIES[family])
    return module.load(hf_dir, abstract=abstract, shardings=shardings, dtype=dtype)
  if family in _VISION_FAMILIES:
    vision = importlib.import_module("aligncap_jax.models.hf_import.vision")
    if family not in vision.FAMILIES:
      raise ValueError(f"family '{family}' is not provided by hf_import.vision "
                       f"(it has {sorted(vision.FAMILIES)})")
    return vision.FAMILIES[family](hf_dir, shardings=shardings, dtype=dtype)
  raise ValueError(f"unknown model family '{family}'; known: {families()}")


class StackingFolder:
  """A SafetensorsFolder view where 'a.{layer}.b' reads and stacks n layers.

  Lets `common.assemble` build parameters stacked on a leading `layers` axis
  (scan_layers) from per-layer tensors: each stacked read records the per-layer
  names it consumed so `keys()` (used for the unexpected-tensor check) stays
  exact. A missing layer tensor raises the usual error naming it.
  """

  def __init__(self, folder: SafetensorsFolder, num_layers: dict[str, int]):
    self.folder = folder
    self.hf_dir = folder.hf_dir
    self.num_layers = num_layers
    self._consumed: set[str] = set()

  def keys(self) -> list[str]:
    return [k for k in self.folder.keys() if k not in self._consumed]

  def __contains__(self, name: str) -> bool:
    return name in self.folder

  def get(self, name: str) -> np.ndarray:
    if "{layer}" not in name:
      return self.folder.get(name)
    prefix = name.split("{layer}")[0]
    n = self.num_layers[prefix]
    parts = []
    for i in range(n):
      real = name.format(layer=i)
      arr = self.folder.get(real)
      if parts and arr.shape != parts[0].shape:
        raise WeightsError(f"tensor '{real}' has shape {arr.shape}, layer 0 has "
                              f"{parts[0].shape}")
      parts.append(arr)
      self._consumed.add(real)
    return np.stack(parts)


def layer_names(template: str, num_layers: int, stacked: bool,
                flax_prefix: str) -> list[tuple[str, str]]:
  """(flax path prefix, HF name) pairs for the layers of one stack.

  `template` holds '{layer}'. Stacked: one pair with the scanned module's path;
  unstacked: one pair per layer with `flax_prefix_i`.
  """
  if stacked:
    return [(flax_prefix, template)]
  return [(f"{flax_prefix}_{i}", template.replace("{layer}", str(i)))
          for i in range(num_layers)]


def last2_to_in_heads(heads: int):
  """torch Linear weight [..., H*Dk, D] -> Flax kernel [..., D, H, Dk]."""
  def fn(x: np.ndarray) -> np.ndarray:
    x = np.swapaxes(x, -1, -2)
    return np.ascontiguousarray(x.reshape(x.shape[:-1] + (heads, x.shape[-1] // heads)))
  return fn


def heads_to_out(heads: int):
  """torch Linear weight [..., D, H*Dk] -> Flax kernel [..., H, Dk, D]."""
  def fn(x: np.ndarray) -> np.ndarray:
    x = np.swapaxes(x, -1, -2)
    return np.ascontiguousarray(
        x.reshape(x.shape[:-2] + (heads, x.shape[-2] // heads, x.shape[-1])))
  return fn


def bias_to_heads(heads: int):
  """torch bias [..., H*Dk] -> [..., H, Dk]."""
  def fn(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x.reshape(x.shape[:-1] + (heads, x.shape[-1] // heads)))
  return fn


def linear_t(x: np.ndarray) -> np.ndarray:
  """torch Linear weight [..., out, in] -> Flax kernel [..., in, out]."""
  return np.ascontiguousarray(np.swapaxes(x, -1, -2))


def is_stacked(abstract: Any, key: str) -> bool:
  """Whether abstract params hold the scanned stack `key` (vs `key_0`, ...)."""
  return abstract is not None and key in abstract


__all__ = ["load", "families", "StackingFolder", "WeightsError"]
