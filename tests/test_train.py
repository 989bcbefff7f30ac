"""Trainer: optimizer pieces, frozen masks, device-count equality, the loop."""
from __future__ import annotations

import functools
import json
import math
import os
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "configs"))

import fixtures_train as ft  # noqa: E402
import tiny  # noqa: E402

from aligncap_jax import checkpoint as ckpt_lib  # noqa: E402
from aligncap_jax import sharding as shd  # noqa: E402
from aligncap_jax import train  # noqa: E402
from aligncap_jax import train_state as ts  # noqa: E402

LIBS = dict(model_lib=ft.FakeModelLib, pipeline_lib=ft.FakePipelineLib)


def _run_steps(config, devices, n, batches):
  mesh = shd.make_mesh(config, devices)
  model = ft.FakeAlignCap(config, ft.NUM_TAGS)
  state, factory = ts.create_train_state(config, model, mesh, ft.NUM_TAGS, steps=10,
                                          model_lib=ft.FakeModelLib)
  step = ts.make_train_step(config, model, mesh, factory)
  emb = np.linspace(-1, 1, ft.NUM_TAGS * 32, dtype=np.float32).reshape(ft.NUM_TAGS, 32)
  losses = []
  for b in batches[:n]:
    state, m = step(state, shd.put_batch(b, mesh), emb)
    losses.append(float(m["loss"]))
  return losses, jax.device_get(state.params)


def test_total_steps_from_steps_or_epochs():
  c = tiny.get_config()
  assert ts.total_steps(c, None, 16) == 4
  c.train.total_steps = None
  c.train.total_epochs = 2.5
  assert ts.total_steps(c, 100, 16) == math.ceil(2.5 * 100 / 16)
  with pytest.raises(ValueError, match="train.total_steps"):
    ts.total_steps(c, None, 16)


def test_num_train_regions_reads_the_region_index(tmp_path, monkeypatch):
  from aligncap_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  c = tiny.get_config()
  c.data.data_dir = str(tmp_path)
  with pytest.raises(FileNotFoundError, match="not prepared"):
    pipeline.num_train_regions(c)
  path = str(tmp_path / "regions_train.npy")
  np.save(path, np.zeros((37, 2), np.int64))
  monkeypatch.setattr(pipeline.god_tfds, "regions_index_path",
                      lambda name, split, data_dir: path if split == "train" else "")
  assert pipeline.num_train_regions(c) == 37


def test_total_epochs_sets_the_step_count_when_total_steps_is_unset(tmp_path):
  c = tiny.get_config()
  c.train.eval_every_steps = -1
  c.train.total_steps = None
  c.train.total_epochs = 1.5   # 24 regions x 1.5 / (2 x 8 devices) -> 3 steps
  result = train.train_and_evaluate(c, str(tmp_path), **LIBS)
  assert result["step"] == math.ceil(1.5 * ft.NUM_TRAIN_REGIONS / 16) == 3
  assert result["eval"] is None
  lines = [json.loads(x) for x in open(tmp_path / "train_metrics.jsonl")]
  assert [x["step"] for x in lines] == [1, 2, 3]


def test_schedule_is_warmup_then_cosine():
  c = tiny.get_config()
  c.optim.warmup_steps, c.optim.learning_rate = 4, 0.1
  sched = ts.learning_rate_schedule(c, 20)
  for s in range(21):
    if s <= 4:
      want = 0.1 * s / 4
    else:
      want = 0.05 * (1 + math.cos(math.pi * (s - 4) / 16))
    assert float(sched(s)) == pytest.approx(want, abs=1e-7), s
  c.optim.schedule = "linear"
  with pytest.raises(ValueError, match="optim.schedule"):
    ts.learning_rate_schedule(c, 20)


def test_trainable_regex_mask_and_frozen_params_do_not_move():
  c = tiny.get_config()
  c.trainable = [r"^vision/", r"^prompt_vector$"]
  mesh = shd.make_mesh(c, jax.devices()[:1])
  model = ft.FakeAlignCap(c, ft.NUM_TAGS)
  state, factory = ts.create_train_state(c, model, mesh, ft.NUM_TAGS, steps=4,
                                          model_lib=ft.FakeModelLib)
  assert factory.mask["vision"]["kernel"] and factory.mask["prompt_vector"]
  assert not factory.mask["llm"]["kernel"] and not factory.mask["clip_text"]["embedding"]
  n_train, n_frozen = ts.count_params(state.params, factory.mask)
  assert n_train == 21 * 16 + 16 + 16
  before = jax.device_get(state.params)
  step = ts.make_train_step(c, model, mesh, factory)
  it = ft.make_train_iterator(c, None, global_batch_size=2, process_index=0, process_count=1)
  emb = np.zeros((ft.NUM_TAGS, 32), np.float32)
  for _ in range(2):
    state, _ = step(state, shd.put_batch(next(it), mesh), emb)
  after = jax.device_get(state.params)
  np.testing.assert_array_equal(after["llm"]["kernel"], before["llm"]["kernel"])
  np.testing.assert_array_equal(after["tagging"]["bias"], before["tagging"]["bias"])
  assert not np.allclose(after["vision"]["kernel"], before["vision"]["kernel"])
  # Frozen parameters hold no Adam moments.
  leaves = jax.tree.leaves(state.opt_state)
  assert sum(x.size for x in leaves) == 2 * n_train + 2


@pytest.mark.parametrize("train_queries", [False, True])
@pytest.mark.parametrize("regexes", [r"^(?!clip_text/)", r"^qformer/"])
def test_train_query_tokens_flag_decides_the_query_tokens(train_queries, regexes):
  """model.train_query_tokens alone decides the Q-Former's query tokens, whatever
  the trainable regexes say; frozen tokens get no optimizer update."""
  c = tiny.get_config()
  c.trainable = [regexes]
  c.model.train_query_tokens = train_queries
  queries = nn.Partitioned(jnp.ones((1, 4, 8)), (None, None, "embed"))   # boxed, as in init
  boxed = {"qformer": {"query_tokens": queries, "layer_0": {"kernel": jnp.ones((8, 8))}},
           "clip_text": {"embedding": jnp.ones((4, 8))}}
  mask = ts.trainable_mask(c, boxed)
  assert mask["qformer"]["query_tokens"] is train_queries
  assert mask["qformer"]["layer_0"]["kernel"] and not mask["clip_text"]["embedding"]
  params = nn.meta.unbox(boxed)
  tx = ts.make_optimizer(c, optax.constant_schedule(0.1), mask)
  grads = jax.tree.map(jnp.ones_like, params)
  updates, _ = tx.update(grads, tx.init(params), params)
  new = optax.apply_updates(params, updates)
  moved = lambda *k: not np.array_equal(
      functools.reduce(dict.__getitem__, k, new), functools.reduce(dict.__getitem__, k, params))
  assert moved("qformer", "query_tokens") == train_queries
  assert moved("qformer", "layer_0", "kernel") and not moved("clip_text", "embedding")
  assert ts.count_params(params, mask)[0] == 64 + 32 * train_queries


def test_one_device_equals_eight_devices_after_three_steps():
  assert jax.device_count() == 8
  c1 = tiny.get_config()
  c1.train.per_device_batch_size = 8
  c8 = tiny.get_config()
  c8.train.per_device_batch_size = 1
  c8.mesh.data, c8.mesh.fsdp = 4, 2
  it = ft.make_train_iterator(c1, None, global_batch_size=8, process_index=0, process_count=1)
  batches = [next(it) for _ in range(3)]
  l1, p1 = _run_steps(c1, jax.devices()[:1], 3, batches)
  l8, p8 = _run_steps(c8, jax.devices(), 3, batches)
  np.testing.assert_allclose(l8, l1, rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), p8, p1)
  assert l1[0] != l1[2]  # parameters actually moved


def test_state_is_created_sharded():
  c = tiny.get_config()
  c.mesh.data, c.mesh.fsdp = 4, 2
  mesh = shd.make_mesh(c)
  model = ft.FakeAlignCap(c, ft.NUM_TAGS)
  abstract = ts.abstract_train_state(c, model, mesh, ft.NUM_TAGS, model_lib=ft.FakeModelLib)
  # 'embed' -> fsdp (2): the clip embedding's second axis is split in two.
  emb = abstract.params["clip_text"]["embedding"]
  assert emb.sharding.shard_shape(emb.shape) == (512, 16)
  state, _ = ts.create_train_state(c, model, mesh, ft.NUM_TAGS, model_lib=ft.FakeModelLib)
  arr = state.params["clip_text"]["embedding"]
  assert arr.sharding == emb.sharding
  assert arr.addressable_shards[0].data.shape == (512, 16)


def _factory(config, mesh):
  return ts.StateFactory(config, ft.FakeAlignCap(config, ft.NUM_TAGS), mesh, ft.NUM_TAGS, 4,
                         model_lib=ft.FakeModelLib)


def test_init_hf_replaces_every_param_on_its_shards(tmp_path):
  from aligncap_jax import hf_export  # pylint: disable=g-import-not-at-top
  c = tiny.get_config()
  c.mesh.data, c.mesh.fsdp = 4, 2
  mesh = shd.make_mesh(c)
  fresh = jax.device_get(_factory(c, mesh).create().params)
  exported = jax.tree.map(lambda x: x + 1.5, fresh)
  os.makedirs(tmp_path / "hf")
  hf_export.save_params(exported, str(tmp_path / "hf"))
  c.init.hf = str(tmp_path / "hf")
  factory = _factory(c, mesh)
  state = factory.create()
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(state.params), exported)
  jax.tree.map(lambda a, s: a.sharding == s or pytest.fail(f"{a.sharding} != {s}"),
               state.params, factory.state_shardings.params)
  assert int(state.step) == 0
  c.init.clip_text = str(tmp_path / "clip")
  with pytest.raises(ValueError, match="'init.hf' and 'init.clip_text' are both set"):
    _factory(c, mesh).create()


def test_init_towers_go_through_load_pretrained(monkeypatch):
  from aligncap_jax.models import pretrained  # pylint: disable=g-import-not-at-top
  c = tiny.get_config()
  c.init.clip_text = "/some/clip"
  mesh = shd.make_mesh(c, jax.devices()[:1])
  factory = _factory(c, mesh)
  calls = []

  def fake_load(config, params, *, shardings, donate):
    calls.append((config.init.clip_text, shardings, donate))
    return jax.tree.map(lambda x: x * 0 + 7, params)

  monkeypatch.setattr(pretrained, "load_pretrained", fake_load)
  state = factory.create()
  assert calls == [("/some/clip", factory.state_shardings.params, True)]
  assert all(np.all(np.asarray(x) == 7) for x in jax.tree.leaves(state.params))


def _nan_at(steps):
  def wrap(it):
    for i, b in enumerate(it, start=1):
      if i in steps:
        b = dict(b, view_boxes=np.full_like(b["view_boxes"], np.nan))
      yield b
  return wrap


def test_nan_batch_is_skipped_reported_and_training_goes_on(tmp_path, caplog):
  c = tiny.get_config()
  c.train.eval_every_steps = -1
  c.train.total_steps = 5
  out = train.train_and_evaluate(c, str(tmp_path), wrap_iterator=_nan_at({3}), **LIBS)
  assert out["step"] == 5 and out["bad_steps"] == 1
  lines = [json.loads(x) for x in open(tmp_path / "train_metrics.jsonl")]
  assert [x["step"] for x in lines] == [1, 2, 3, 4, 5]
  assert math.isnan(lines[2]["loss"]) and lines[2]["bad_steps"] == 1
  assert all(math.isfinite(x["loss"]) for i, x in enumerate(lines) if i != 2)
  msg = [r.getMessage() for r in caplog.records if "update skipped" in r.getMessage()]
  assert len(msg) == 1 and "step 3" in msg[0] and "region ids [" in msg[0]
  # The skipped step left the parameters as they were: steps 2->3 equal an
  # update-free step. The restored final state is finite.
  ck = ckpt_lib.Checkpointer(str(tmp_path), read_only=True)
  mesh = shd.make_mesh(c)
  factory = ts.StateFactory(c, ft.FakeAlignCap(c, ft.NUM_TAGS), mesh, ft.NUM_TAGS, 5,
                            model_lib=ft.FakeModelLib)
  state = ck.restore(5, factory.abstract_state)
  ck.close()
  assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(state.params))


def test_nan_step_leaves_params_and_optimizer_untouched():
  c = tiny.get_config()
  mesh = shd.make_mesh(c, jax.devices()[:1])
  model = ft.FakeAlignCap(c, ft.NUM_TAGS)
  state, factory = ts.create_train_state(c, model, mesh, ft.NUM_TAGS, steps=4,
                                          model_lib=ft.FakeModelLib)
  step = ts.make_train_step(c, model, mesh, factory)
  it = ft.make_train_iterator(c, None, global_batch_size=2, process_index=0, process_count=1)
  emb = np.zeros((ft.NUM_TAGS, 32), np.float32)
  state, _ = step(state, shd.put_batch(next(it), mesh), emb)
  before = jax.device_get((state.params, state.opt_state))
  b = next(it)
  b["view_boxes"][:] = np.inf
  state, m = step(state, shd.put_batch(b, mesh), emb)
  assert not bool(m["ok"])
  after = jax.device_get((state.params, state.opt_state))
  jax.tree.map(np.testing.assert_array_equal, after, before)
  assert int(state.step) == 2 and int(state.bad_steps) == 1 and int(state.bad_in_row) == 1
  state, m = step(state, shd.put_batch(next(it), mesh), emb)
  assert bool(m["ok"]) and int(state.bad_in_row) == 0


def test_too_many_bad_steps_in_row_stop_and_keep_last_good_checkpoint(tmp_path):
  c = tiny.get_config()
  c.train.eval_every_steps = -1
  c.train.total_steps = 10
  c.optim.max_bad_steps_in_row = 2
  with pytest.raises(train.TrainingError, match="2 non-finite steps in a row.*step 2"):
    train.train_and_evaluate(c, str(tmp_path), wrap_iterator=_nan_at({3, 4, 5}), **LIBS)
  assert sorted(os.listdir(tmp_path / "checkpoints")) == ["2"]
  lines = [json.loads(x) for x in open(tmp_path / "train_metrics.jsonl")]
  assert [x["step"] for x in lines] == [1, 2, 3, 4]
