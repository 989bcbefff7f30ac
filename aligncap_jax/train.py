"""`--mode train`: one readable trainer, top to bottom.

build data -> build state (sharded from abstract shapes) -> restore the latest
checkpoint (state + data iterator; `train_metrics.jsonl` truncated to it) ->
loop {step, log, eval, checkpoint} -> final checkpoint and eval.

Guarantees (tested in tests/test_reliability.py):
  * SIGTERM: the current step finishes, a checkpoint is written, the run exits
    with `Preempted`; restarting the same command resumes. Multi-host runs use
    orbax's preemption sync point instead, so every process stops together.
  * SIGKILL loses only the steps since the last complete checkpoint; a
    half-written one is ignored and reported.
  * Resumed runs log bit-identical losses on CPU: the data order, view
    sampling, prompt dropout (grain iterator state) and the dropout RNG
    (`fold_in(rng, step)`) are all restored.
  * A step with a NaN/Inf loss or gradient norm is not applied; it is logged
    with its region ids. `optim.max_bad_steps_in_row` in a row stop the run
    (`TrainingError`) without touching the last good checkpoint.
"""
from __future__ import annotations

import json
import os
import signal
import time
from typing import Any

from absl import logging
import jax
import ml_collections
import numpy as np

from aligncap_jax import checkpoint as ckpt_lib
from aligncap_jax import evaluate as eval_lib
from aligncap_jax import sharding as shd
from aligncap_jax import train_state as ts

METRICS_FILE = "train_metrics.jsonl"
LOGGED = ("loss", "loss_cap", "loss_tag", "loss_cond", "loss_multi", "lr", "grad_norm")
OPTIONAL_LOGGED = ("loss_context",)  # loss.context_head > 0 only


class TrainingError(RuntimeError):
  """Training cannot go on (e.g. too many non-finite steps in a row)."""


class Preempted(RuntimeError):
  """SIGTERM (or a preemption notice) arrived; a checkpoint was saved."""


def truncate_metrics(path: str, step: int) -> int:
  """Keeps the well-formed lines of `path` with `"step" <= step`.

  Returns:
    The number of lines dropped (later steps, or a line cut by a kill).
  """
  if not os.path.exists(path):
    return 0
  kept, dropped = [], 0
  with open(path) as f:
    for line in f:
      try:
        rec = json.loads(line)
      except json.JSONDecodeError:
        dropped += 1
        continue
      if rec.get("step", step + 1) <= step:
        kept.append(json.dumps(rec) + "\n")
      else:
        dropped += 1
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    f.writelines(kept)
  os.replace(tmp, path)
  return dropped


class MetricsWriter:
  """`train_metrics.jsonl` lines plus TensorBoard scalars (process 0 only)."""

  def __init__(self, workdir: str):
    self.enabled = jax.process_index() == 0
    self.path = os.path.join(workdir, METRICS_FILE)
    self._tb = None
    if self.enabled:
      # tensorboardX writes the event files without TensorFlow (no TF import, no
      # TF thread pools or GPU claims in the trainer process).
      import tensorboardX  # pylint: disable=g-import-not-at-top
      self._tb = tensorboardX.SummaryWriter(os.path.join(workdir, "tensorboard"))

  def write(self, step: int, scalars: dict[str, float]) -> None:
    if not self.enabled:
      return
    with open(self.path, "a") as f:
      f.write(json.dumps({"step": int(step), **scalars}) + "\n")
      f.flush()
      os.fsync(f.fileno())
    for k, v in scalars.items():
      self._tb.add_scalar(k, float(v), int(step))
    self._tb.flush()

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()


class _SigtermFlag:
  """Turns SIGTERM into a flag checked after every step (single process)."""

  def __init__(self):
    self.raised = False
    self._prev = None

  def __enter__(self):
    if jax.process_count() == 1:
      self._prev = signal.signal(signal.SIGTERM, self._handle)
    return self

  def _handle(self, signum, frame):
    del signum, frame
    logging.warning("SIGTERM received: finishing the current step, then saving")
    self.raised = True

  def __exit__(self, *exc):
    if self._prev is not None:
      signal.signal(signal.SIGTERM, self._prev)


def _create_workdir(workdir: str) -> None:
  try:
    os.makedirs(workdir, exist_ok=True)
    # One probe per process: hosts sharing a workdir must not remove each other's.
    probe = os.path.join(workdir, f".write_test.{os.getpid()}.{jax.process_index()}")
    with open(probe, "w") as f:
      f.write("ok")
    os.remove(probe)
  except OSError as e:
    raise ValueError(f"--workdir {workdir}: cannot create or write it ({e.strerror})") from e


def _per_device_bytes(abstract: Any) -> int:
  total = 0
  for x in jax.tree.leaves(abstract):
    shape = x.sharding.shard_shape(x.shape) if x.sharding is not None else x.shape
    total += int(np.prod(shape)) * np.dtype(x.dtype).itemsize
  return total


def _abstract_batch(config, model_lib, mesh, global_bs, num_tags):
  sh = shd.batch_sharding(mesh)
  return {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=sh)
          for k, v in model_lib.dummy_batch(config, global_bs, num_tags).items()}


def _bad_step_message(step: int, m: dict[str, Any], batch: dict[str, np.ndarray]) -> str:
  bad = [k for k in LOGGED if k in m and not np.isfinite(m[k])]
  ids = np.asarray(batch["region_id"])[np.asarray(batch["valid"]) > 0].tolist()
  return (f"step {step}: non-finite {', '.join(bad) or 'values'} "
          f"({', '.join(f'{k}={m[k]}' for k in bad)}); update skipped; region ids {ids}")


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *,
                       model_lib: Any = None, pipeline_lib: Any = None,
                       wrap_iterator: Any = None) -> dict[str, Any]:
  """Trains (resuming from the latest checkpoint in `workdir`), then evaluates.

  Args:
    config: the full config (validated by main).
    workdir: created if missing; holds checkpoints, metrics and eval outputs.
    model_lib, pipeline_lib: module stand-ins for tests (default: the real ones).
    wrap_iterator: optional `batches -> batches` applied to the host batches
      (tests inject faulty batches with it); checkpointing still uses the
      underlying grain iterator.

  Returns:
    {"step", "bad_steps", "eval"} (eval: metrics dict or None).

  Raises:
    Preempted: SIGTERM arrived; a checkpoint of the last step was saved.
    TrainingError: `optim.max_bad_steps_in_row` non-finite steps in a row.
    CheckpointError: a checkpoint could not be written or restored.
  """
  model_lib, pipeline_lib = eval_lib.default_libs(model_lib, pipeline_lib)
  _create_workdir(workdir)
  is_chief = jax.process_index() == 0

  # ---------------------------------------------------------------- data
  mesh = shd.make_mesh(config)
  global_bs = shd.global_batch_size(config, mesh)
  if global_bs % jax.process_count():
    raise ValueError(f"config field 'train.per_device_batch_size': global batch {global_bs} "
                     f"is not divisible by {jax.process_count()} processes")
  eval_lib.prepare_data(config, pipeline_lib)
  assets = pipeline_lib.load_assets(config)
  num_tags = len(assets.tag_vocab)
  regions = (pipeline_lib.num_train_regions(config) if config.train.total_steps is None
             else None)
  steps = ts.total_steps(config, regions, global_bs)
  train_iter = pipeline_lib.make_train_iterator(
      config, assets, global_batch_size=global_bs, process_index=jax.process_index(),
      process_count=jax.process_count())

  # ---------------------------------------------------------------- state
  model = model_lib.build_model(config, num_tags)
  factory = ts.StateFactory(config, model, mesh, num_tags, steps, model_lib=model_lib)
  ckpt = ckpt_lib.Checkpointer(workdir, max_to_keep=config.train.max_checkpoints_to_keep)
  metrics_path = os.path.join(workdir, METRICS_FILE)
  start = ckpt.latest_step()
  if start is not None:
    state = ckpt.restore(start, factory.abstract_state, train_iter)
    dropped = truncate_metrics(metrics_path, start) if is_chief else 0
    logging.info("resumed from step %d (%d later metric lines dropped)", start, dropped)
  else:
    state = factory.create()
    start = 0
    if is_chief and os.path.exists(metrics_path):
      truncate_metrics(metrics_path, 0)
  encode = eval_lib.make_encode_tags(config, model, model_lib, mesh)
  tag_embeddings = encode(state.params, assets.tag_clip_tokens, assets.tag_clip_mask)

  train_step = ts.make_train_step(config, model, mesh, factory).lower(
      factory.abstract_state, _abstract_batch(config, model_lib, mesh, global_bs, num_tags),
      jax.ShapeDtypeStruct(tag_embeddings.shape, tag_embeddings.dtype,
                           sharding=shd.replicated(mesh))).compile()
  n_train, n_frozen = ts.count_params(factory.abstract_state.params, factory.mask)
  mem = train_step.memory_analysis()
  temp = getattr(mem, "temp_size_in_bytes", 0) if mem is not None else 0
  logging.info("mesh %s; batch %d per device, %d global; %d steps",
               dict(mesh.shape), config.train.per_device_batch_size, global_bs, steps)
  logging.info("parameters: %s trainable, %s frozen", f"{n_train:,}", f"{n_frozen:,}")
  logging.info("per-device memory estimate: state %.1f MiB + step temporaries %.1f MiB",
               _per_device_bytes(factory.abstract_state) / 2**20, temp / 2**20)

  evaluator = eval_lib.Evaluator(config, model, assets, mesh, workdir=workdir,
                                 model_lib=model_lib, pipeline_lib=pipeline_lib)
  writer = MetricsWriter(workdir)
  batches = wrap_iterator(train_iter) if wrap_iterator else train_iter
  t = config.train
  step = int(jax.device_get(state.step))
  bar = None
  if is_chief:
    import tqdm  # pylint: disable=g-import-not-at-top
    bar = tqdm.tqdm(total=steps, initial=step, desc="train", unit="step", dynamic_ncols=True)
  last_time, last_step = time.perf_counter(), step

  # ---------------------------------------------------------------- loop
  try:
    with _SigtermFlag() as sigterm:
      while step < steps:
        batch = next(batches)
        state, metrics = train_step(state, shd.put_batch(batch, mesh), tag_embeddings)
        step += 1
        m = jax.device_get(metrics)
        if not m["ok"]:
          logging.warning(_bad_step_message(step, m, batch))
        if step % t.log_every_steps == 0 or step == steps:
          now = time.perf_counter()
          rate = (step - last_step) * global_bs / max(now - last_time, 1e-9)
          last_time, last_step = now, step
          writer.write(step, {**{k: float(m[k]) for k in LOGGED},
                              **{k: float(m[k]) for k in OPTIONAL_LOGGED if k in m},
                              "examples_per_sec": rate,
                              "bad_steps": int(jax.device_get(state.bad_steps))})
          if bar is not None:
            bar.set_postfix(loss=f"{float(m['loss']):.4f}", ex_per_s=f"{rate:.1f}")
        if bar is not None:
          bar.update(1)
        ckpt.poll()   # a failed background save stops the run here, with its error
        in_row = int(jax.device_get(state.bad_in_row))
        if in_row >= config.optim.max_bad_steps_in_row:
          ckpt.wait()
          raise TrainingError(
              f"{in_row} non-finite steps in a row (optim.max_bad_steps_in_row="
              f"{config.optim.max_bad_steps_in_row}), last at step {step}; stopping. The "
              f"last good checkpoint (step {ckpt.latest_step()}) is kept in {ckpt.directory}")
        if t.eval_every_steps > 0 and step % t.eval_every_steps == 0 and step < steps:
          evaluator.run(state.params, tag_embeddings, step=step)
        if step % t.checkpoint_every_steps == 0 or step == steps:
          ckpt.save(step, state, train_iter)
        if sigterm.raised or ckpt.reached_preemption(step):
          if step not in ckpt.all_steps():
            ckpt.save(step, state, train_iter, force=True)
          ckpt.wait()
          raise Preempted(f"preempted at step {step}: checkpoint saved in {ckpt.directory}; "
                          f"rerun the same command to resume")
    ckpt.wait()
  finally:
    if bar is not None:
      bar.close()
    writer.close()
    ckpt.close()

  # ---------------------------------------------------------------- finish
  results = {"step": step, "bad_steps": int(jax.device_get(state.bad_steps)), "eval": None}
  if t.eval_every_steps >= 0:
    results["eval"] = evaluator.run(state.params, tag_embeddings, step=step)
  return results
