"""`--mode aot`: compile the full train and decode steps ahead of time, no weights.

The train state, batch and tag inputs exist only as `jax.ShapeDtypeStruct`s with
their shardings on the target's mesh; `jit(...).lower(...).compile()` then runs the
target's own compiler and `memory_analysis()` says what one device needs:

  per-device peak = argument + output - alias + temporary bytes

(computed here: `peak_memory` is unreliable on CPU). Targets:
- `cpu:N`: N fake CPU devices. The process must start with
  `XLA_FLAGS="--xla_force_host_platform_device_count=N
  --xla_cpu_enable_concurrency_optimized_scheduler=false"` (the default CPU
  scheduler inflates temporaries several times). CPU runs bf16 ops in f32, so
  this is an upper bound; "fits" means <= 16 GiB (DESIGN.md section 10).
- a TPU topology (`v5e:2x4`, `v5e:16x16`, `v5p:2x2x4`, `v4:2x2x2`, `v6e:2x4`):
  abstract TPU devices from libtpu (`pip install .[tpu]`), compiled by the real
  TPU compiler on this CPU-only machine; "fits" means <= 15 GiB on a v5e.
"""
from __future__ import annotations

import importlib.util
import os
import time
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from aligncap_jax import sharding
from aligncap_jax import train_state

TPU_TOPOLOGIES = ("v5e:2x4", "v5e:16x16", "v5p:2x2x4", "v4:2x2x2", "v6e:2x4")
CPU_SCHEDULER_FLAG = "--xla_cpu_enable_concurrency_optimized_scheduler=false"
GIB = 2**30


def target_devices(topology: str) -> list[jax.Device]:
  """The devices of an AOT target: `cpu:N` or a TPU topology name.

  Raises:
    ValueError: unknown topology, or fewer CPU devices than asked for (the
      message names the XLA_FLAGS value to start the process with).
    RuntimeError: a TPU topology without libtpu installed.
  """
  if topology.startswith("cpu:"):
    try:
      n = int(topology[4:])
    except ValueError:
      raise ValueError(f"--aot_topology '{topology}': expected cpu:N with an integer N") from None
    have = jax.devices("cpu")
    if len(have) < n:
      raise ValueError(
          f"--aot_topology {topology} needs {n} CPU devices but jax was initialised with "
          f"{len(have)}: start the process with the environment variable "
          f"XLA_FLAGS='--xla_force_host_platform_device_count={n} {CPU_SCHEDULER_FLAG}'")
    return list(have[:n])
  if ":" not in topology:
    raise ValueError(f"--aot_topology '{topology}': expected cpu:N or one of "
                     f"{', '.join(TPU_TOPOLOGIES)}")
  if importlib.util.find_spec("libtpu") is None:
    raise RuntimeError(
        f"--aot_topology {topology} needs the TPU compiler (libtpu), which is not "
        "installed: pip install '.[tpu]' (or pip install 'jax[tpu]==0.10.2')")
  # libtpu warns about these when no TPU is attached; any value silences it.
  os.environ.setdefault("TPU_ACCELERATOR_TYPE", "v5litepod-8")
  os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
  # Only the compiler is used, so other processes compiling at the same time
  # (libtpu's /tmp/libtpu_lockfile would refuse them) are harmless.
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  from jax.experimental import topologies
  desc = topologies.get_topology_desc(platform="tpu", topology_name=topology)
  return list(desc.devices)


def make_decode_step(config: ml_collections.ConfigDict, model: nn.Module) -> Callable:
  """`step(params, batch, tag_embeddings, tag_table) -> generate outputs` (config.decode).

  The eval/predict decode step as `--mode eval` runs it; aot compiles it with the
  train state's parameter shardings.
  """
  from aligncap_jax.models import aligncap
  d = config.decode

  def step(params, batch, tag_embeddings, tag_table):
    return model.apply({"params": params}, batch, tag_embeddings, tag_table,
                       method=aligncap.AlignCap.generate, num_beams=d.num_beams,
                       max_new_tokens=d.max_new_tokens, min_length=d.min_length,
                       length_penalty=d.length_penalty,
                       repetition_penalty=d.repetition_penalty,
                       contrastive_alpha=d.contrastive_alpha)

  return step


def _abstract(tree: Any, sharding_: jax.sharding.Sharding) -> Any:
  return jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype, sharding=sharding_), tree)


def _fmt_bytes(n: int) -> str:
  return f"{n / GIB:.3f} GiB" if n >= GIB else f"{n / 2**20:.3f} MiB"


def memory_stats(compiled: Any) -> dict[str, int]:
  """Per-device argument / output / alias / temporary bytes and our peak."""
  m = compiled.memory_analysis()
  out = {"argument": int(m.argument_size_in_bytes), "output": int(m.output_size_in_bytes),
         "alias": int(m.alias_size_in_bytes), "temporary": int(m.temp_size_in_bytes)}
  out["peak"] = out["argument"] + out["output"] - out["alias"] + out["temporary"]
  return out


def compile_steps(config: ml_collections.ConfigDict, topology: str = "cpu:8",
                  model: nn.Module | None = None, num_tags: int | None = None,
                  steps: tuple[str, ...] = ("train", "decode"),
                  compiler_options: dict[str, Any] | None = None) -> dict[str, dict]:
  """Lowers and compiles the train and/or decode step for a target, from shapes only.

  Args:
    config: the full config; its mesh and logical rules are applied to the target.
    topology: `cpu:N` or a TPU topology name.
    model: default `aligncap.build_model(config, num_tags)`.
    num_tags: default `config.data.tag_vocab_size`.
    steps: which of "train" and "decode" to compile.
    compiler_options: XLA / libtpu options for `Lowered.compile` (e.g.
      `{"xla_tpu_enable_windowed_einsum_for_all_gather": False}`); default: on a
      TPU topology, `sharding.tpu_compiler_options(config)`. The config's
      `train.xla_optimization_level` / `xla_exec_time_effort` apply either way.

  Returns:
    {step: {"compiled", "lower_s", "compile_s", "memory", "batch"}} plus
    "target": {"device_kind", "count", "mesh"}.
  """
  from aligncap_jax.models import aligncap
  num_tags = int(config.data.tag_vocab_size if num_tags is None else num_tags)
  model = aligncap.build_model(config, num_tags) if model is None else model
  devices = target_devices(topology)
  mesh = sharding.make_mesh(config, devices)
  rules = sharding.logical_rules(config)
  rep, per_row = sharding.replicated(mesh), sharding.batch_sharding(mesh)
  dp = sharding.data_parallel_size(mesh)
  tag_emb = jax.ShapeDtypeStruct((num_tags, config.model.clip_text.hidden_size), jnp.float32,
                                 sharding=rep)
  out: dict[str, dict] = {"target": {"device_kind": devices[0].device_kind,
                                     "count": len(devices), "mesh": dict(mesh.shape)}}
  # The schedule's length does not change the step's shapes; past the warmup so
  # that optax builds a real cosine (total_steps is 0 for epoch-based configs).
  schedule_steps = max(int(config.train.total_steps or 0), int(config.optim.warmup_steps) + 1)
  factory = train_state.StateFactory(config, model, mesh, num_tags, steps=schedule_steps)
  state = factory.abstract_state
  jobs = {}
  if "train" in steps:
    b = config.train.per_device_batch_size * dp
    batch = _abstract(aligncap.dummy_batch(config, b, num_tags), per_row)
    fn = train_state.make_train_step(config, model, mesh, factory)
    jobs["train"] = (fn, (state, batch, tag_emb), b)
  if "decode" in steps:
    b = config.train.eval_batch_size * dp
    batch = _abstract(aligncap.dummy_batch(config, b, num_tags), per_row)
    table = _abstract(aligncap.dummy_tag_inputs(config, num_tags)[2], rep)
    fn = jax.jit(make_decode_step(config, model),
                 in_shardings=(factory.state_shardings.params, per_row, rep, rep),
                 out_shardings=per_row)
    jobs["decode"] = (fn, (state.params, batch, tag_emb, table), b)
  if compiler_options is None and not topology.startswith("cpu:"):
    compiler_options = sharding.tpu_compiler_options(config)
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules), sharding.compiler_effort(config):
    for name, (fn, args, b) in jobs.items():
      t0 = time.perf_counter()
      lowered = fn.lower(*args)
      t1 = time.perf_counter()
      try:
        compiled = lowered.compile(compiler_options=compiler_options or None)
      except jax.errors.JaxRuntimeError as e:
        if "RESOURCE_EXHAUSTED" not in str(e):
          raise
        first = str(e).strip().splitlines()[0]
        raise ValueError(f"the {name} step does not fit {topology} at {b} regions per step "
                         f"({first}); lower train.per_device_batch_size or enable remat") from e
      t2 = time.perf_counter()
      out[name] = {"compiled": compiled, "lower_s": t1 - t0, "compile_s": t2 - t1,
                   "memory": memory_stats(compiled), "batch": b}
  return out


def compiled_hlo_text(config: ml_collections.ConfigDict, topology: str = "cpu:8",
                      step: str = "train", model: nn.Module | None = None,
                      num_tags: int | None = None) -> str:
  """The compiled (optimised, partitioned) HLO text of one step, to inspect collectives."""
  res = compile_steps(config, topology, model=model, num_tags=num_tags, steps=(step,))
  return res[step]["compiled"].as_text()


def run(config: ml_collections.ConfigDict, topology: str = "cpu:8",
        model: nn.Module | None = None, num_tags: int | None = None) -> dict:
  """`--mode aot`: compiles both steps for `topology` and prints the memory table.

  Returns:
    {"target", "train", "decode"} as in `compile_steps` (without the compiled
    objects) and "peak_gib": the larger per-device peak of the two steps.
  """
  if topology.startswith("cpu:") and CPU_SCHEDULER_FLAG not in os.environ.get("XLA_FLAGS", ""):
    print(f"warning: XLA_FLAGS lacks {CPU_SCHEDULER_FLAG}; CPU temporary bytes will be "
          "inflated (up to 6x for large models)")
  res = compile_steps(config, topology, model=model, num_tags=num_tags)
  t = res["target"]
  print(f"target: {t['device_kind']} x {t['count']}")
  print("mesh: " + ", ".join(f"{k}={v}" for k, v in t["mesh"].items()))
  header = ("step", "batch", "lower s", "compile s", "argument", "output", "alias",
            "temporary", "peak")
  print("{:<7} {:>6} {:>8} {:>10} {:>12} {:>12} {:>12} {:>12} {:>12}".format(*header))
  summary: dict[str, Any] = {"target": t}
  for name in ("train", "decode"):
    r = res[name]
    m = r["memory"]
    print(f"{name:<7} {r['batch']:>6} {r['lower_s']:>8.1f} {r['compile_s']:>10.1f} "
          + " ".join(f"{_fmt_bytes(m[k]):>12}" for k in
                     ("argument", "output", "alias", "temporary", "peak")))
    summary[name] = {k: v for k, v in r.items() if k != "compiled"}
  peak = max(res[n]["memory"]["peak"] for n in ("train", "decode")) / GIB
  summary["peak_gib"] = peak
  print(f"per-device peak: {peak:.2f} GiB")
  return summary
