"""Reading Hugging Face PyTorch-layout checkpoints (safetensors) into Flax trees.

Every family importer builds an explicit `{flax_path: (hf_name, transform)}`
mapping; `assemble` reads one tensor at a time (memory-mapped, so host memory
never holds two full copies), applies the transform, checks the shape against
the abstract Flax parameter, optionally places it on its sharding, and reports
missing / unexpected tensors and shape mismatches by name.
"""
from __future__ import annotations

import json
import os
from typing import Any, Callable, Iterable, Mapping

import jax
import numpy as np
from flax import traverse_util
from safetensors import safe_open

Transform = Callable[[np.ndarray], np.ndarray]


class WeightsError(ValueError):
  """A weights folder (Hugging Face layout) does not match what the model expects.

  An input problem (exit code 2 from main), unlike `aligncap_jax.checkpoint.
  CheckpointError`, which is about the trainer's own orbax checkpoints.
  """


def read_config(hf_dir: str) -> dict:
  path = os.path.join(hf_dir, "config.json")
  if not os.path.exists(path):
    raise FileNotFoundError(f"no config.json in Hugging Face folder '{hf_dir}'")
  with open(path) as f:
    return json.load(f)


class SafetensorsFolder:
  """Lazy name -> tensor access over one or many (sharded) safetensors files."""

  def __init__(self, hf_dir: str):
    self.hf_dir = hf_dir
    index = os.path.join(hf_dir, "model.safetensors.index.json")
    single = os.path.join(hf_dir, "model.safetensors")
    if os.path.exists(index):
      with open(index) as f:
        weight_map = json.load(f)["weight_map"]
      self._file_of = {k: os.path.join(hf_dir, v) for k, v in weight_map.items()}
    elif os.path.exists(single):
      with safe_open(single, framework="numpy") as f:
        self._file_of = {k: single for k in f.keys()}
    else:
      raise FileNotFoundError(
          f"no model.safetensors or model.safetensors.index.json in '{hf_dir}' "
          "(PyTorch .bin checkpoints are not read; convert them with "
          "transformers' save_pretrained(safe_serialization=True))")
    self._handles: dict[str, Any] = {}

  def keys(self) -> list[str]:
    return list(self._file_of)

  def __contains__(self, name: str) -> bool:
    return name in self._file_of

  def get(self, name: str) -> np.ndarray:
    if name not in self._file_of:
      raise WeightsError(f"tensor '{name}' is missing from '{self.hf_dir}'")
    path = self._file_of[name]
    if path not in self._handles:
      self._handles[path] = safe_open(path, framework="numpy")
    try:
      return self._handles[path].get_tensor(name)
    except TypeError:
      # numpy has no bfloat16: read it through the flax backend (ml_dtypes).
      with safe_open(path, framework="flax") as f:
        return np.asarray(f.get_tensor(name))


def identity(x: np.ndarray) -> np.ndarray:
  return x


def transpose(x: np.ndarray) -> np.ndarray:
  """torch Linear weight [out, in] -> flax Dense kernel [in, out]."""
  return np.ascontiguousarray(x.T)


def assemble(
    folder: SafetensorsFolder,
    mapping: Mapping[str, tuple[str, Transform]],
    abstract_params: Any,
    *,
    prefix: str = "",
    ignore_unused: Iterable[str] = (),
    shardings: Any = None,
    dtype: Any = None,
) -> dict:
  """Builds a nested param dict from `mapping` and checks it against `abstract_params`.

  Args:
    folder: the checkpoint.
    mapping: '/'-joined Flax path -> (HF tensor name, transform).
    abstract_params: the module's params (arrays or ShapeDtypeStructs).
    prefix: only HF tensors starting with this prefix count as 'unexpected'.
    ignore_unused: regexes of HF names that may stay unused (e.g. other towers).
    shardings: optional pytree of Shardings matching abstract_params.
    dtype: cast every tensor to this dtype (default: the abstract leaf's dtype).
  """
  import re
  flat_abs = {"/".join(k): v for k, v in
              traverse_util.flatten_dict(abstract_params).items()}
  flat_sh = ({"/".join(k): v for k, v in traverse_util.flatten_dict(shardings).items()}
             if shardings is not None else {})
  missing_flax = sorted(set(flat_abs) - set(mapping))
  if missing_flax:
    raise WeightsError(
        f"importer has no source for Flax parameters {missing_flax[:10]}"
        f"{' ...' if len(missing_flax) > 10 else ''}")
  extra_flax = sorted(set(mapping) - set(flat_abs))
  if extra_flax:
    raise WeightsError(f"importer maps unknown Flax parameters {extra_flax[:10]}")
  used = set()
  out = {}
  for path, (name, fn) in mapping.items():
    arr = fn(folder.get(name))
    used.add(name)
    want = flat_abs[path]
    if tuple(arr.shape) != tuple(want.shape):
      raise WeightsError(
          f"shape mismatch for tensor '{name}' -> '{path}': checkpoint "
          f"{tuple(arr.shape)} vs model {tuple(want.shape)}")
    arr = arr.astype(dtype or want.dtype)
    if path in flat_sh:
      # may_alias=False: the train step donates its state, and on CPU a zero-copy
      # buffer would hand XLA memory that numpy owns.
      out[path] = jax.device_put(arr, flat_sh[path], may_alias=False)
    else:
      out[path] = jax.numpy.array(arr)  # a copy, as above
  pats = [re.compile(p) for p in ignore_unused]
  unexpected = sorted(k for k in folder.keys() if k.startswith(prefix)
                      and k not in used and not any(p.search(k) for p in pats))
  if unexpected:
    raise WeightsError(
        f"unexpected tensors in '{folder.hf_dir}': {unexpected[:10]}"
        f"{' ...' if len(unexpected) > 10 else ''}")
  return traverse_util.unflatten_dict({tuple(k.split("/")): v for k, v in out.items()})


def check_config_fields(family: str, hf_config: Mapping[str, Any],
                        expected: Mapping[str, Any], hf_dir: str) -> None:
  """Names every architecture field where our config and the folder differ."""
  diffs = [f"{k}: config {v!r} vs checkpoint {hf_config.get(k)!r}"
           for k, v in expected.items() if k in hf_config and hf_config[k] != v]
  if diffs:
    raise WeightsError(f"{family} checkpoint '{hf_dir}' differs from the config: "
                          + "; ".join(diffs))
