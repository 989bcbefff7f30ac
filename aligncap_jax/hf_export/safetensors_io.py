"""Flax parameter trees <-> Hugging Face style safetensors files.

A parameter `qformer/layer_0/query/kernel` is stored under the dotted name
`qformer.layer_0.query.kernel`, in its own dtype (bf16 frozen towers stay bf16).
Above `max_shard_bytes` (5 GB, the Hugging Face default) the tensors are split
into `model-0000i-of-0000n.safetensors` files plus `model.safetensors.index.json`
(`{"metadata": {"total_size": ...}, "weight_map": {name: file}}`); below it, one
`model.safetensors`. Tensors are fetched from the devices one shard file at a
time, so host memory holds at most one file's worth.
"""
from __future__ import annotations

import json
import math
import os
from typing import Any

import jax
import numpy as np
from flax import traverse_util
from safetensors.numpy import save_file

from aligncap_jax.models.hf_import import common

MAX_SHARD_BYTES = 5 * 10**9
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


def flat_names(params: Any) -> dict[str, Any]:
  """{dotted name: leaf} of a nested param dict.

  Raises:
    ValueError: a path component contains '.', which would not round-trip.
  """
  out = {}
  for path, leaf in traverse_util.flatten_dict(params).items():
    bad = [k for k in path if "." in str(k)]
    if bad:
      raise ValueError(f"parameter {'/'.join(map(str, path))}: name part {bad[0]!r} "
                       "contains '.', which safetensors names use as separator")
    out[".".join(map(str, path))] = leaf
  return out


def _nbytes(x) -> int:
  return math.prod(x.shape) * np.dtype(x.dtype).itemsize


def save_params(params: Any, directory: str,
                max_shard_bytes: int = MAX_SHARD_BYTES) -> list[str]:
  """Writes `params` (jax or numpy arrays) as safetensors into `directory`.

  Returns:
    The written file names (one, or the shards then the index).
  """
  names = flat_names(params)
  shards: list[list[str]] = [[]]
  size = 0
  for name, leaf in names.items():
    n = _nbytes(leaf)
    if shards[-1] and size + n > max_shard_bytes:
      shards.append([])
      size = 0
    shards[-1].append(name)
    size += n
  metadata = {"format": "flax", "producer": "aligncap_jax"}
  if len(shards) == 1:
    save_file({k: np.asarray(jax.device_get(names[k])) for k in shards[0]},
              os.path.join(directory, SINGLE_FILE), metadata=metadata)
    return [SINGLE_FILE]
  files, weight_map = [], {}
  for i, keys in enumerate(shards):
    fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
    save_file({k: np.asarray(jax.device_get(names[k])) for k in keys},
              os.path.join(directory, fname), metadata=metadata)
    weight_map.update({k: fname for k in keys})
    files.append(fname)
  index = {"metadata": {"total_size": sum(_nbytes(v) for v in names.values())},
           "weight_map": weight_map}
  with open(os.path.join(directory, INDEX_FILE), "w") as f:
    json.dump(index, f, indent=2, sort_keys=True)
  return files + [INDEX_FILE]


def load_params(directory: str, abstract_params: Any | None = None,
                shardings: Any | None = None) -> Any:
  """Reads the params written by `save_params` (single file or sharded).

  Args:
    directory: the export folder.
    abstract_params: optional tree (arrays or ShapeDtypeStructs) the result must
      match: every tensor present, none extra, same shapes; its dtypes are used.
    shardings: optional tree of Shardings (same structure) to place each tensor on.

  Returns:
    The nested param dict (numpy arrays, or jax arrays when `shardings` is given
    or `abstract_params` is).

  Raises:
    WeightsError: naming the missing / unexpected tensor or the shape mismatch.
  """
  folder = common.SafetensorsFolder(directory)
  if abstract_params is None:
    return traverse_util.unflatten_dict(
        {tuple(k.split(".")): folder.get(k) for k in folder.keys()})
  mapping = {path.replace(".", "/"): (path, common.identity)
             for path in flat_names(abstract_params)}
  return common.assemble(folder, mapping, abstract_params, shardings=shardings)
