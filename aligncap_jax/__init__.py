"""aligncap_jax: AlignCap (region-level captioning) in JAX/Flax.

The public API is imported lazily, on first use, so that `import aligncap_jax`
(and `python -m aligncap_jax.main --help`) does not pay for jax, orbax and
TensorFlow:

  train_and_evaluate(config, workdir)     --mode train
  Captioner.load(path, config).caption(image, boxes)   --mode predict / serve
  Evaluator, make_mesh, StateFactory, make_train_step, abstract_train_state,
  Checkpointer, CheckpointError

`aligncap_jax.evaluate` and `aligncap_jax.predict` stay the submodules (the
repo imports them as `from aligncap_jax import evaluate as eval_lib`); their
entry points are `aligncap_jax.evaluate.evaluate(config, workdir)` (--mode
eval) and `aligncap_jax.predict.predict(config, workdir, image, boxes)`
(--mode predict). A package attribute of the same name would shadow them.
"""
from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "train_and_evaluate": "aligncap_jax.train",
    "Captioner": "aligncap_jax.captioner",
    "Evaluator": "aligncap_jax.evaluate",
    "make_mesh": "aligncap_jax.sharding",
    "StateFactory": "aligncap_jax.train_state",
    "make_train_step": "aligncap_jax.train_state",
    "abstract_train_state": "aligncap_jax.train_state",
    "Checkpointer": "aligncap_jax.checkpoint",
    "CheckpointError": "aligncap_jax.checkpoint",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
  if name not in _EXPORTS:
    raise AttributeError(f"module 'aligncap_jax' has no attribute {name!r}")
  value = getattr(importlib.import_module(_EXPORTS[name]), name)
  globals()[name] = value
  return value


def __dir__() -> list[str]:
  return sorted(set(globals()) | set(_EXPORTS))
