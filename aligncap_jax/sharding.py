"""Device mesh, logical-to-mesh axis rules and batch placement.

Models annotate parameters and activations with logical axis names (`batch`,
`embed`, `mlp`, ...); `config.logical_axis_rules` maps them to the mesh axes
`data`, `fsdp` and `tensor`. This module is the only place that turns one into
the other, so the same code runs on 1 CPU, 8 fake CPU devices or a pod slice.
"""
from __future__ import annotations

import contextlib
import math
import os
from typing import Any, Callable, Sequence

from absl import logging
import flax.linen as nn
import jax
import ml_collections
import numpy as np

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")


def initialize_distributed(coordinator_address: str | None = None,
                           num_processes: int | None = None,
                           process_id: int | None = None) -> bool:
  """Calls `jax.distributed.initialize()` when flags or the environment ask.

  Multi-host runs are requested either by explicit arguments (main's
  `--coordinator_address/--num_processes/--process_id` flags) or by
  `ALIGNCAP_DISTRIBUTED=1`, in which case JAX discovers the cluster itself
  (Cloud TPU, SLURM). Single-process runs never initialise anything.

  Returns:
    True when the distributed runtime was initialised.
  """
  explicit = coordinator_address is not None
  from_env = os.environ.get("ALIGNCAP_DISTRIBUTED", "0") == "1"
  if not (explicit or from_env):
    return False
  if explicit and (num_processes is None or process_id is None):
    raise ValueError("--coordinator_address needs --num_processes and --process_id")
  jax.distributed.initialize(coordinator_address=coordinator_address,
                             num_processes=num_processes, process_id=process_id)
  logging.info("jax.distributed initialised: process %d of %d",
               jax.process_index(), jax.process_count())
  return True


# libtpu options that compile fsdp's all-gather / reduce-scatter matmuls as one
# collective and one matmul instead of a windowed-einsum loop of partial matmuls.
TPU_WINDOWED_EINSUM_OFF = {"xla_tpu_enable_windowed_einsum_for_all_gather": False,
                           "xla_tpu_enable_windowed_einsum_for_reduce_scatter": False}


def tpu_compiler_options(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """Per-compile libtpu options from `train.tpu_windowed_einsum` (TPU targets only)."""
  return {} if config.train.tpu_windowed_einsum else dict(TPU_WINDOWED_EINSUM_OFF)


def _effort_updates(config: ml_collections.ConfigDict) -> dict[str, Any]:
  t = config.train
  updates: dict[str, Any] = {}
  if t.xla_optimization_level:
    updates["jax_optimization_level"] = t.xla_optimization_level
  if t.xla_exec_time_effort:
    updates["jax_exec_time_optimization_effort"] = float(t.xla_exec_time_effort)
  return updates


@contextlib.contextmanager
def compiler_effort(config: ml_collections.ConfigDict):
  """XLA's effort levels from `train.xla_optimization_level` / `xla_exec_time_effort`
  for the compiles inside the block (restored after)."""
  updates = _effort_updates(config)
  old = {k: getattr(jax.config, k) for k in updates}
  try:
    for k, v in updates.items():
      jax.config.update(k, v)
    yield
  finally:
    for k, v in old.items():
      jax.config.update(k, v)


def apply_compiler_settings(config: ml_collections.ConfigDict) -> list[str]:
  """The process-wide form of the compiler settings, for `main` before the backend starts.

  Sets XLA's effort levels for every later compile, and with
  `train.tpu_windowed_einsum=False` adds the libtpu flags to `LIBTPU_INIT_ARGS`
  (read when libtpu starts, so this must run before the first device query).

  Returns:
    What was set, one line each, for the log.
  """
  done = []
  for k, v in _effort_updates(config).items():
    jax.config.update(k, v)
    done.append(f"{k}={v}")
  extra = [f"--{k}={str(v).lower()}" for k, v in tpu_compiler_options(config).items()]
  if extra:
    args = os.environ.get("LIBTPU_INIT_ARGS", "").split()
    os.environ["LIBTPU_INIT_ARGS"] = " ".join(args + [a for a in extra if a not in args])
    done.append("LIBTPU_INIT_ARGS+=" + " ".join(extra))
  return done


def mesh_shape(config: ml_collections.ConfigDict, num_devices: int) -> tuple[int, ...]:
  """Resolves `config.mesh` (-1 = the remaining devices) to axis sizes.

  Returns:
    (data, fsdp, tensor) sizes whose product is `num_devices`.
  """
  sizes = [int(config.mesh[a]) for a in MESH_AXES]
  free = [i for i, s in enumerate(sizes) if s == -1]
  if len(free) > 1:
    raise ValueError("config field 'mesh': at most one axis may be -1, got "
                     + ", ".join(f"{a}={s}" for a, s in zip(MESH_AXES, sizes)))
  fixed = math.prod(s for s in sizes if s != -1)
  if free:
    if num_devices % fixed:
      raise ValueError(f"config field 'mesh': {num_devices} devices are not divisible "
                       f"by the fixed axes' product {fixed}")
    sizes[free[0]] = num_devices // fixed
  if math.prod(sizes) != num_devices:
    raise ValueError(f"config field 'mesh': data*fsdp*tensor = {math.prod(sizes)} "
                     f"but there are {num_devices} devices")
  return tuple(sizes)


def make_mesh(config: ml_collections.ConfigDict,
              devices: Sequence[jax.Device] | None = None) -> jax.sharding.Mesh:
  """The (data, fsdp, tensor) mesh of `config.mesh` over `devices` (default all)."""
  devices = list(jax.devices() if devices is None else devices)
  shape = mesh_shape(config, len(devices))
  axis_types = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
  if len(devices) == jax.device_count():
    return jax.make_mesh(shape, MESH_AXES, axis_types, devices=devices)
  return jax.sharding.Mesh(np.asarray(devices).reshape(shape), MESH_AXES,
                           axis_types=axis_types)


def logical_rules(config: ml_collections.ConfigDict) -> tuple[tuple[str, Any], ...]:
  """`config.logical_axis_rules` as the tuple of pairs that flax expects."""
  rules = []
  for pair in config.logical_axis_rules:
    name, axes = pair
    rules.append((name, tuple(axes) if isinstance(axes, list) else axes))
  return tuple(rules)


def _fit_spec(spec: jax.sharding.PartitionSpec, shape: Sequence[int],
              mesh: jax.sharding.Mesh) -> jax.sharding.PartitionSpec:
  """Replicates any dimension that its mesh axes do not divide evenly."""
  out = []
  for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
    names = (axes,) if isinstance(axes, str) else tuple(axes or ())
    size = math.prod(mesh.shape[a] for a in names)
    out.append(axes if size and dim % size == 0 else None)
  return jax.sharding.PartitionSpec(*out)


def logical_shardings(abstract_tree: Any, mesh: jax.sharding.Mesh,
                      rules: Sequence[tuple[str, Any]]) -> Any:
  """NamedShardings for a tree of (possibly logically boxed) abstract arrays.

  Args:
    abstract_tree: output of `jax.eval_shape` on an init function; leaves are
      `jax.ShapeDtypeStruct`s, optionally inside flax `LogicallyPartitioned`
      boxes. Unboxed leaves are replicated.
    mesh: the device mesh.
    rules: logical-to-mesh axis rules.

  Returns:
    The unboxed tree structure with a `NamedSharding` per leaf. A dimension that
    its mesh axes do not divide is replicated instead of failing.
  """
  specs = nn.logical_to_mesh(nn.get_partition_spec(abstract_tree), rules)
  shapes = nn.meta.unbox(abstract_tree)
  return jax.tree.map(
      lambda spec, x: jax.sharding.NamedSharding(mesh, _fit_spec(spec, x.shape, mesh)),
      specs, shapes, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))


def batch_sharding(mesh: jax.sharding.Mesh) -> jax.sharding.NamedSharding:
  """Leading (region) axis split over ("data", "fsdp"), the rest replicated."""
  return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(BATCH_AXES))


def replicated(mesh: jax.sharding.Mesh) -> jax.sharding.NamedSharding:
  return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())


def data_parallel_size(mesh: jax.sharding.Mesh) -> int:
  """Number of batch shards: data x fsdp."""
  return mesh.shape["data"] * mesh.shape["fsdp"]


def global_batch_size(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh,
                      per_device: int | None = None) -> int:
  """Global batch = per-device batch x data-parallel devices (DESIGN.md §10)."""
  per_device = config.train.per_device_batch_size if per_device is None else per_device
  return per_device * data_parallel_size(mesh)


def put_batch(batch: dict[str, np.ndarray], mesh: jax.sharding.Mesh) -> dict[str, jax.Array]:
  """Places this process's rows of a batch on the mesh as global arrays.

  Args:
    batch: numpy arrays whose leading axis is this process's share of the
      global batch (the whole batch in a single-process run).
    mesh: the device mesh.

  Returns:
    Global `jax.Array`s sharded over ("data", "fsdp") on the leading axis.
  """
  sharding = batch_sharding(mesh)
  return jax.tree.map(
      lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), batch)


class MeshBound:
  """A jitted function traced, lowered and called under `jax.set_mesh(mesh)`.

  Under the mesh, the models' `nn.with_logical_constraint`s and the parameter
  boxes' constraints take effect (outside one flax silently skips them), and
  code that asks `jax.sharding.get_abstract_mesh()` (the ring pairwise loss)
  finds the `data`/`fsdp` axes. Calling, `.lower(...)` and `.trace(...)` behave
  as the wrapped `jax.jit` object's; `.compile()` of the lowered result and its
  calls need no mesh in context.
  """

  def __init__(self, jitted: Callable, mesh: jax.sharding.Mesh):
    self.jitted, self.mesh = jitted, mesh

  def __call__(self, *args, **kwargs):
    with jax.set_mesh(self.mesh):
      return self.jitted(*args, **kwargs)

  def lower(self, *args, **kwargs):
    with jax.set_mesh(self.mesh):
      return self.jitted.lower(*args, **kwargs)

  def trace(self, *args, **kwargs):
    with jax.set_mesh(self.mesh):
      return self.jitted.trace(*args, **kwargs)
