"""Mesh resolution, logical-to-mesh shardings and batch placement on 8 fake CPUs."""
from __future__ import annotations

import os
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "configs"))

import tiny  # noqa: E402

from aligncap_jax import sharding as shd  # noqa: E402

P = jax.sharding.PartitionSpec


def _cfg(data, fsdp, tensor):
  c = tiny.get_config()
  c.mesh.data, c.mesh.fsdp, c.mesh.tensor = data, fsdp, tensor
  return c


@pytest.mark.parametrize("axes, want", [((-1, 1, 1), (8, 1, 1)), ((2, -1, 2), (2, 2, 2)),
                                        ((1, 8, 1), (1, 8, 1)), ((-1, 4, 1), (2, 4, 1))])
def test_mesh_shape_resolves_minus_one(axes, want):
  assert shd.mesh_shape(_cfg(*axes), 8) == want


@pytest.mark.parametrize("axes, match", [((-1, -1, 1), "at most one axis"),
                                         ((-1, 3, 1), "not divisible"),
                                         ((2, 2, 1), "data\\*fsdp\\*tensor = 4")])
def test_mesh_shape_errors(axes, match):
  with pytest.raises(ValueError, match=match):
    shd.mesh_shape(_cfg(*axes), 8)


def test_make_mesh_all_and_subset_of_devices():
  mesh = shd.make_mesh(_cfg(2, -1, 2))
  assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
  one = shd.make_mesh(_cfg(-1, 1, 1), jax.devices()[:1])
  assert dict(one.shape) == {"data": 1, "fsdp": 1, "tensor": 1}


class _Tiny(nn.Module):
  @nn.compact
  def __call__(self, x):
    w = self.param("w", nn.with_logical_partitioning(nn.initializers.ones, ("embed", "mlp")),
                   (8, 6))
    b = self.param("b", nn.initializers.zeros, (6,))
    return x @ w + b


def test_logical_shardings_follow_rules_and_replicate_uneven_dims():
  c = _cfg(2, 2, 2)
  mesh = shd.make_mesh(c)
  abstract = jax.eval_shape(_Tiny().init, jax.random.PRNGKey(0), jnp.zeros((1, 8)))
  sh = shd.logical_shardings(abstract, mesh, shd.logical_rules(c))["params"]
  # embed -> fsdp (8 % 2 == 0), mlp -> tensor (6 % 2 == 0); unboxed bias replicated.
  assert sh["w"].spec == P("fsdp", "tensor")
  assert sh["b"].is_fully_replicated
  c = _cfg(1, 8, 1)
  mesh = shd.make_mesh(c)
  sh = shd.logical_shardings(abstract, mesh, shd.logical_rules(c))["params"]
  assert sh["w"].spec == P("fsdp", "tensor")
  assert sh["w"].shard_shape((8, 6)) == (1, 6)
  c = _cfg(1, 1, 8)
  mesh = shd.make_mesh(c)
  sh = shd.logical_shardings(abstract, mesh, shd.logical_rules(c))["params"]
  # fsdp has size 1; mlp=6 on tensor=8 would not divide, so that dim is replicated.
  assert sh["w"].spec == P("fsdp", None)
  assert sh["w"].is_fully_replicated


def test_put_batch_splits_rows_over_data_and_fsdp():
  c = _cfg(4, 2, 1)
  mesh = shd.make_mesh(c)
  assert shd.data_parallel_size(mesh) == 8 and shd.global_batch_size(c, mesh) == 16
  batch = {"x": np.arange(16 * 3, dtype=np.float32).reshape(16, 3),
           "id": np.arange(16, dtype=np.int32)}
  out = shd.put_batch(batch, mesh)
  assert out["x"].sharding.spec == P(("data", "fsdp"))
  assert {s.data.shape for s in out["x"].addressable_shards} == {(2, 3)}
  np.testing.assert_array_equal(np.asarray(out["x"]), batch["x"])
  np.testing.assert_array_equal(np.asarray(out["id"]), batch["id"])


def test_initialize_distributed_is_a_no_op_without_flags(monkeypatch):
  monkeypatch.delenv("ALIGNCAP_DISTRIBUTED", raising=False)
  assert shd.initialize_distributed() is False
  with pytest.raises(ValueError, match="--num_processes and --process_id"):
    shd.initialize_distributed("localhost:1234")
