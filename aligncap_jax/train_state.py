"""Train state, optimizer and the jitted train step.

The state is created already sharded: `jax.eval_shape` of the init gives the
abstract (logically boxed) tree, `sharding.logical_shardings` turns the boxes
into `NamedSharding`s, and `jax.jit(init, out_shardings=...)` materialises each
shard where it lives. The step is jitted with the same shardings and donates
the state. Init and step are traced under `jax.set_mesh(mesh)`, so the ring
pairwise loss finds its mesh axes; the step also under the config's logical
axis rules, so the models' activation constraints apply. The init runs without
rules: its outputs (the params) take their shardings from `out_shardings`, the
forward pass it traces is dead code, and the model's init hands still-boxed
scorer params into the ring loss's `shard_map`, where a constraint cannot apply.
`abstract_train_state` and
`make_train_step` also serve the ahead-of-time compiler, which never creates
weights.
"""
from __future__ import annotations

import math
import re
from typing import Any, Callable, Sequence

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from aligncap_jax import sharding as shd

PyTree = Any


@flax.struct.dataclass
class TrainState:
  """Everything a resumed run needs besides the data iterator.

  Attributes:
    step: int32[] number of batches consumed (skipped bad steps included).
    params: model parameters.
    opt_state: optax state (trainable parameters only, beyond empty states).
    rng: uint32[2] base key; step s uses `fold_in(rng, s)` for dropout.
    bad_steps: int32[] steps skipped for a NaN/Inf loss or gradient norm.
    bad_in_row: int32[] consecutive skipped steps up to now.
  """
  step: jax.Array
  params: PyTree
  opt_state: PyTree
  rng: jax.Array
  bad_steps: jax.Array
  bad_in_row: jax.Array


def param_path(path: Sequence[Any]) -> str:
  """'/'-joined parameter path, e.g. 'qformer/layer_0/query/kernel'."""
  keys = []
  for k in path:
    if isinstance(k, jax.tree_util.DictKey):
      keys.append(str(k.key))
    elif isinstance(k, jax.tree_util.GetAttrKey) and k.name == "value":
      continue
    else:
      keys.append(str(getattr(k, "name", getattr(k, "idx", k))))
  return "/".join(keys)


def _is_box(x: Any) -> bool:
  return isinstance(x, nn.meta.AxisMetadata)


QUERY_TOKENS = "qformer/query_tokens"


def trainable_mask(config: ml_collections.ConfigDict, params: PyTree) -> PyTree:
  """True for each parameter matched by one of `config.trainable`'s regexes.

  The Q-Former's query tokens are the exception: `model.train_query_tokens`
  alone decides them (default False, frozen as in the reference), whatever the
  regexes say. Works on boxed or unboxed trees; the result has one bool per
  box/leaf.
  """
  patterns = [re.compile(p) for p in config.trainable]
  train_queries = bool(config.model.train_query_tokens)

  def trained(path, _):
    name = param_path(path)
    if name == QUERY_TOKENS:
      return train_queries
    return any(p.search(name) for p in patterns)

  return jax.tree_util.tree_map_with_path(trained, params, is_leaf=_is_box)


def count_params(params: PyTree, mask: PyTree) -> tuple[int, int]:
  """(trainable, frozen) parameter counts."""
  sizes = jax.tree.leaves(jax.tree.map(lambda x: int(np.prod(x.shape)), nn.meta.unbox(params)))
  flags = jax.tree.leaves(mask)
  trained = sum(s for s, f in zip(sizes, flags) if f)
  return trained, sum(sizes) - trained


def total_steps(config: ml_collections.ConfigDict, num_train_regions: int | None,
                global_batch_size: int) -> int:
  """`train.total_steps`, or `total_epochs` x regions / global batch (rounded up)."""
  if config.train.total_steps is not None:
    if config.train.total_steps < 1:
      raise ValueError(f"config field 'train.total_steps': must be >= 1, "
                       f"got {config.train.total_steps}")
    return int(config.train.total_steps)
  if not num_train_regions:
    raise ValueError("config field 'train.total_steps' is unset and the number of training "
                     "regions is unknown: set train.total_steps")
  return max(1, math.ceil(config.train.total_epochs * num_train_regions / global_batch_size))


def learning_rate_schedule(config: ml_collections.ConfigDict, steps: int) -> optax.Schedule:
  """Linear warmup then cosine decay to 0 (or constant) over `steps`."""
  o = config.optim
  warmup = min(int(o.warmup_steps), max(steps - 1, 0))
  if o.schedule == "cosine":
    return optax.warmup_cosine_decay_schedule(0.0, o.learning_rate, warmup,
                                              decay_steps=max(steps, warmup + 1), end_value=0.0)
  if o.schedule == "constant":
    return optax.join_schedules([optax.linear_schedule(0.0, o.learning_rate, warmup),
                                 optax.constant_schedule(o.learning_rate)], [warmup])
  raise ValueError(f"config field 'optim.schedule': must be 'cosine' or 'constant', "
                   f"got {o.schedule!r}")


def make_optimizer(config: ml_collections.ConfigDict, schedule: optax.Schedule,
                   mask: PyTree) -> optax.GradientTransformation:
  """Global-norm clipping + AdamW on the trainable parameters, zero elsewhere.

  Weight decay applies to matrices only (ndim >= 2), not biases or norms.
  """
  o = config.optim
  adamw = optax.adamw(schedule, b1=o.b1, b2=o.b2, weight_decay=o.weight_decay,
                      mask=lambda p: jax.tree.map(lambda x: x.ndim >= 2, p))
  train = optax.chain(optax.clip_by_global_norm(o.grad_clip_norm), adamw)
  labels = jax.tree.map(lambda m: "train" if m else "frozen", mask)
  return optax.multi_transform({"train": train, "frozen": optax.set_to_zero()}, labels)


def _init_fn(config, model, num_tags, tx_fn, model_lib, batch_size):
  """A function rng -> boxed TrainState (for eval_shape and jit).

  The dummy batch has one region per batch shard (`batch_size`): the ring
  pairwise loss splits the batch over the data-parallel devices.
  """

  def init(rng):
    batch = jax.tree.map(jnp.asarray, model_lib.dummy_batch(config, batch_size, num_tags))
    tag_emb = jnp.zeros((num_tags, config.model.clip_text.hidden_size), jnp.float32)
    k_params, k_drop, k_state = jax.random.split(rng, 3)
    variables = model.init({"params": k_params, "dropout": k_drop}, batch, tag_emb, train=False)
    params = variables["params"]
    tx = tx_fn(params)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                      rng=k_state, bad_steps=jnp.zeros((), jnp.int32),
                      bad_in_row=jnp.zeros((), jnp.int32))

  return init


def _default_model_lib():
  from aligncap_jax.models import aligncap  # pylint: disable=g-import-not-at-top
  return aligncap


class StateFactory:
  """Builds the optimizer, abstract state, shardings and the real state.

  Attributes:
    schedule: the learning-rate schedule.
    abstract_state: unboxed `TrainState` of `jax.ShapeDtypeStruct`s.
    state_shardings: `TrainState` of `NamedSharding`s.
    mask: bool per parameter (True = trainable), unboxed.
    tx: the optax transformation.

  `model_lib` (default `aligncap_jax.models.aligncap`) provides `dummy_batch`.
  """

  def __init__(self, config: ml_collections.ConfigDict, model: nn.Module,
               mesh: jax.sharding.Mesh, num_tags: int, steps: int, *, model_lib: Any = None):
    self.config, self.model, self.mesh, self.num_tags = config, model, mesh, num_tags
    self.schedule = learning_rate_schedule(config, steps)
    self.tx = None

    def tx_fn(params):
      self.tx = make_optimizer(config, self.schedule, trainable_mask(config, params))
      return self.tx

    self._init = _init_fn(config, model, num_tags, tx_fn, model_lib or _default_model_lib(),
                          shd.data_parallel_size(mesh))
    rng = jax.random.PRNGKey(config.seed)
    with jax.set_mesh(mesh):
      boxed = jax.eval_shape(self._init, rng)
    self.boxed_params = boxed.params
    self.mask = nn.meta.unbox(trainable_mask(config, boxed.params))
    self.abstract_state = nn.meta.unbox(boxed)
    self.state_shardings = shd.logical_shardings(boxed, mesh, shd.logical_rules(config))
    self.abstract_state = jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
        self.abstract_state, self.state_shardings)

  def create(self) -> TrainState:
    """The initial state, each array created directly on its shards.

    Then the pretrained towers of `config.init.{blip2, llm, clip_text}` replace
    their random init, or `config.init.hf` (an exported AlignCap folder) replaces
    every parameter; each tensor is placed straight onto its shards. The
    optimizer state starts at zero either way. Tag embeddings computed from
    earlier params are stale afterwards: compute them from the returned state.

    Raises:
      ValueError: `init.hf` is set together with a tower folder.
      WeightsError: a folder, tensor or config field does not match the model.
    """
    towers = [k for k in ("blip2", "llm", "clip_text") if self.config.init[k] is not None]
    if self.config.init.hf is not None and towers:
      raise ValueError(f"config fields 'init.hf' and 'init.{towers[0]}' are both set: an "
                       f"exported AlignCap folder already holds every parameter; unset one")
    init = lambda rng: nn.meta.unbox(self._init(rng))
    with jax.set_mesh(self.mesh):
      state = jax.jit(init, out_shardings=self.state_shardings)(
          jax.random.PRNGKey(self.config.seed))
    if towers:
      from aligncap_jax.models import pretrained  # pylint: disable=g-import-not-at-top
      state = state.replace(params=pretrained.load_pretrained(
          self.config, state.params, shardings=self.state_shardings.params, donate=True))
    elif self.config.init.hf is not None:
      from aligncap_jax import hf_export  # pylint: disable=g-import-not-at-top
      for leaf in jax.tree.leaves(state.params):
        leaf.delete()
      state = state.replace(params=hf_export.load_params(
          self.config.init.hf, self.abstract_state.params, self.state_shardings.params))
    return state


def abstract_train_state(config: ml_collections.ConfigDict, model: nn.Module,
                         mesh: jax.sharding.Mesh, num_tags: int, steps: int = 1, *,
                         model_lib: Any = None) -> TrainState:
  """The train state as sharded `jax.ShapeDtypeStruct`s, no weights created."""
  return StateFactory(config, model, mesh, num_tags, steps, model_lib=model_lib).abstract_state


def create_train_state(config: ml_collections.ConfigDict, model: nn.Module,
                       mesh: jax.sharding.Mesh, num_tags: int, steps: int = 1, *,
                       model_lib: Any = None) -> tuple[TrainState, StateFactory]:
  """A fresh sharded train state and the factory (optimizer, shardings) behind it."""
  factory = StateFactory(config, model, mesh, num_tags, steps, model_lib=model_lib)
  return factory.create(), factory


def make_train_step(config: ml_collections.ConfigDict, model: nn.Module,
                    mesh: jax.sharding.Mesh, factory: StateFactory) -> Callable:
  """The jitted step `(state, batch, tag_embeddings) -> (state, metrics)`.

  A step whose loss or gradient norm is not finite leaves params and optimizer
  state untouched (`jnp.where` on the update), increments `bad_steps` and
  `bad_in_row`; a good step resets `bad_in_row`. The step counter advances
  either way (the batch was consumed). Dropout uses `fold_in(state.rng, step)`.

  Returns:
    A jitted function (call it, or `.lower(...)` it with abstract arguments)
    that traces under `jax.set_mesh(mesh)` (`sharding.MeshBound`); `state` is
    donated. `metrics` holds float32 scalars
    `loss, loss_cap, loss_tag, loss_cond, loss_multi, grad_norm, lr` and the
    bool `ok`.
  """
  tx, mask, schedule = factory.tx, factory.mask, factory.schedule
  rules = shd.logical_rules(config)

  def step_fn(state: TrainState, batch, tag_embeddings):
    dropout_rng = jax.random.fold_in(state.rng, state.step)

    def loss_fn(params):
      params = jax.tree.map(lambda p, m: p if m else jax.lax.stop_gradient(p), params, mask)
      return model.apply({"params": params}, batch, tag_embeddings, train=True,
                         rngs={"dropout": dropout_rng})

    (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    grad_norm = optax.global_norm(grads)
    ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, old)
    bad = (~ok).astype(jnp.int32)
    new_state = state.replace(
        step=state.step + 1, params=keep(params, state.params),
        opt_state=keep(opt_state, state.opt_state), bad_steps=state.bad_steps + bad,
        bad_in_row=(state.bad_in_row + bad) * bad)
    metrics = {k: v.astype(jnp.float32) for k, v in metrics.items()}
    metrics.update(grad_norm=grad_norm.astype(jnp.float32), ok=ok,
                   lr=jnp.asarray(schedule(state.step - state.bad_steps), jnp.float32))
    return new_state, metrics

  def wrapped(state, batch, tag_embeddings):
    with nn.logical_axis_rules(rules):
      return step_fn(state, batch, tag_embeddings)

  batch_sh = shd.batch_sharding(mesh)
  return shd.MeshBound(
      jax.jit(wrapped, in_shardings=(factory.state_shardings, batch_sh, shd.replicated(mesh)),
              out_shardings=(factory.state_shardings, shd.replicated(mesh)),
              donate_argnums=(0,)), mesh)
