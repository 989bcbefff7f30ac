"""Orbax checkpoints of the train state and the grain data iterator.

Layout: `WORKDIR/checkpoints/<step>/{state,data}`; `state` is the `TrainState`
(params, optimizer state, step, RNG key, bad-step counters) written with
`StandardSave`, `data` the grain iterator state (one json per process).
Saves are asynchronous; orbax writes each step into a temporary folder and
renames it when complete, so a run killed mid-save leaves a folder that is
ignored (and reported) on the next start.

Restore order: build the abstract state (shapes + shardings), check the saved
parameter tree against it (a mismatch names the paths and shapes), restore the
state onto its shardings, then restore the iterator in place.
"""
from __future__ import annotations

import os
from typing import Any

from absl import logging
from etils import epath
import grain
import jax
import orbax.checkpoint as ocp

_TMP_MARK = ".orbax-checkpoint-tmp"


class CheckpointError(RuntimeError):
  """A checkpoint could not be written or does not fit the current config."""


def checkpoint_dir(workdir: str) -> str:
  return os.path.join(workdir, "checkpoints")


def _path_str(path) -> str:
  keys = []
  for k in path:
    name = getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))
    keys.append(str(name))
  return "/".join(keys)


def _shapes(tree: Any) -> dict[str, tuple[int, ...]]:
  flat = jax.tree_util.tree_flatten_with_path(
      tree, is_leaf=lambda x: hasattr(x, "shape") and not isinstance(x, dict))[0]
  return {_path_str(p): tuple(x.shape) for p, x in flat if hasattr(x, "shape")}


def describe_mismatch(saved: Any, expected: Any, limit: int = 20) -> list[str]:
  """Lines naming the leaves whose presence or shape differ.

  Args:
    saved: tree of array metadata (anything with `.shape`) from the checkpoint.
    expected: tree of arrays / ShapeDtypeStructs the current config builds.
    limit: at most this many lines (plus one line counting the rest).
  """
  a, b = _shapes(saved), _shapes(expected)
  lines = []
  for k in sorted(set(a) | set(b)):
    if k not in b:
      lines.append(f"{k}: in the checkpoint {a[k]}, not in the config")
    elif k not in a:
      lines.append(f"{k}: in the config {b[k]}, not in the checkpoint")
    elif a[k] != b[k]:
      lines.append(f"{k}: checkpoint {a[k]} vs config {b[k]}")
  if len(lines) > limit:
    lines = lines[:limit] + [f"... and {len(lines) - limit} more"]
  return lines


class Checkpointer:
  """CheckpointManager for `{state, data}` items with clear errors.

  Attributes:
    directory: the checkpoints folder.
    incomplete: folders of interrupted saves found (and ignored) at start.
  """

  def __init__(self, workdir: str, *, max_to_keep: int = 3, async_save: bool = True,
               read_only: bool = False):
    # orbax refuses relative paths (and fails only in its background save thread).
    directory = checkpoint_dir(workdir)
    self.directory = directory if "://" in directory else os.path.abspath(directory)
    self._pending: int | None = None   # step of the async save last started
    self.incomplete = []
    if os.path.isdir(self.directory):
      self.incomplete = sorted(n for n in os.listdir(self.directory) if _TMP_MARK in n)
    for name in self.incomplete:
      logging.warning("ignoring incomplete checkpoint %s (a save was interrupted)",
                      os.path.join(self.directory, name))
    if read_only:
      options = ocp.CheckpointManagerOptions(read_only=True, create=False,
                                             save_interval_steps=0, max_to_keep=None)
    else:
      options = ocp.CheckpointManagerOptions(
          max_to_keep=max_to_keep, create=True, cleanup_tmp_directories=True,
          enable_async_checkpointing=async_save)
    try:
      self._mngr = ocp.CheckpointManager(
          epath.Path(self.directory), options=options,
          item_handlers={"state": ocp.StandardCheckpointHandler(),
                         "data": grain.checkpoint.CheckpointHandler()})
    except OSError as e:
      raise CheckpointError(f"cannot use checkpoint folder {self.directory}: {e}") from e

  def latest_step(self) -> int | None:
    return self._mngr.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._mngr.all_steps())

  def reached_preemption(self, step: int) -> bool:
    """Orbax's multi-host preemption sync point (needs jax.distributed)."""
    return jax.process_count() > 1 and self._mngr.reached_preemption(step)

  def _fail(self, step: int, err: Exception) -> CheckpointError:
    try:  # let an earlier save still in flight finish before naming it
      self._mngr.wait_until_finished()
    except Exception:  # pylint: disable=broad-except
      pass
    self._mngr.reload()
    good = [s for s in self._mngr.all_steps() if s != step]
    prev = (f"the previous checkpoint (step {max(good)}) is intact" if good
            else "no earlier checkpoint exists")
    return CheckpointError(f"could not write checkpoint step {step} to {self.directory}: "
                           f"{type(err).__name__}: {err}; {prev}")

  def save(self, step: int, state: Any, data_iterator: Any | None, *,
           force: bool = False) -> None:
    """Starts an async save of `state` (and the iterator state) at `step`."""
    args = {"state": ocp.args.StandardSave(state)}
    if data_iterator is not None:
      args["data"] = grain.checkpoint.CheckpointSave(data_iterator)
    if self._pending is not None:   # an earlier save's failure is named with its own step
      self.wait()
    try:
      self._mngr.save(step, args=ocp.args.Composite(**args), force=force)
    except Exception as e:  # any storage failure: full disk, permissions, ...
      raise self._fail(step, e) from e
    self._pending = step

  def poll(self) -> None:
    """Raises CheckpointError as soon as a finished async save turns out failed.

    Cheap while a save is running or none is pending; the trainer calls it every
    step, so a save that failed in orbax's background thread stops training then,
    instead of the loss surfacing only at the end of the run.
    """
    if self._pending is not None and not self._mngr.is_saving_in_progress():
      self.wait()

  def wait(self) -> None:
    """Blocks until pending saves are on disk; a failure becomes CheckpointError."""
    step, self._pending = self._pending, None
    try:
      self._mngr.wait_until_finished()
    except Exception as e:
      if step is None:
        step = self._mngr.latest_step()
      raise self._fail(step if step is not None else -1, e) from e

  def check_params(self, step: int, abstract_params: Any) -> None:
    """Raises CheckpointError naming params whose paths/shapes differ."""
    meta = self._mngr.item_metadata(step)["state"]
    tree = getattr(meta, "tree", meta)
    saved = tree["params"] if isinstance(tree, dict) else tree.params
    lines = describe_mismatch(saved, abstract_params)
    if lines:
      raise CheckpointError(
          f"checkpoint {self.directory}/{step} was written by a different config; "
          f"mismatched parameters: " + "; ".join(lines))

  def restore(self, step: int, abstract_state: Any, data_iterator: Any | None = None) -> Any:
    """Restores the state at `step` onto the shardings of `abstract_state`.

    Args:
      step: checkpoint step.
      abstract_state: TrainState of `jax.ShapeDtypeStruct`s with shardings.
      data_iterator: when given, its position is restored in place.

    Returns:
      The restored TrainState.
    """
    self.check_params(step, abstract_state.params)
    args = {"state": ocp.args.StandardRestore(abstract_state)}
    if data_iterator is not None:
      args["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
    try:
      out = self._mngr.restore(step, args=ocp.args.Composite(**args))
    except (ValueError, KeyError, FileNotFoundError) as e:
      raise CheckpointError(f"cannot restore checkpoint {self.directory}/{step}: {e}") from e
    return out["state"]

  def close(self) -> None:
    self._mngr.close()


def latest_step_or_fail(workdir: str, mode: str) -> int:
  """The latest complete checkpoint step, or FileNotFoundError for eval/predict/export."""
  directory = checkpoint_dir(workdir)
  steps = []
  if os.path.isdir(directory):
    steps = [int(n) for n in os.listdir(directory) if n.isdigit()
             and os.path.isdir(os.path.join(directory, n, "state"))]
  if not steps:
    raise FileNotFoundError(f"--mode {mode} needs a trained checkpoint, but {directory} has "
                            f"none: run --mode train with --workdir {workdir} first")
  return max(steps)

