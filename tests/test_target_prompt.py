"""The target-box prompt (`model.target_box_prompt`): coverage op and its effect."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
import pytest

from aligncap_jax import ops
from aligncap_jax.models import aligncap
from test_aligncap import V, make_batch, tiny_config  # noqa: E402


def _coverage_by_pixels(box, grid, cell):
  """Brute force: the share of each cell's 1/8-pixel sub-samples inside the box."""
  sub = 8
  out = np.zeros(grid * grid)
  for gy in range(grid):
    for gx in range(grid):
      ys = gy * cell + (np.arange(cell * sub) + 0.5) / sub
      xs = gx * cell + (np.arange(cell * sub) + 0.5) / sub
      inside = ((xs[None] >= box[0]) & (xs[None] < box[2]) &
                (ys[:, None] >= box[1]) & (ys[:, None] < box[3]))
      out[gy * grid + gx] = inside.mean()
  return out


def test_box_coverage_matches_pixel_count():
  boxes = np.array([[0, 0, 16, 16], [2.5, 4.0, 13.0, 9.5], [6, 6, 7, 7], [-3, 10, 40, 40]],
                   np.float32)
  got = np.asarray(ops.box_coverage(jnp.asarray(boxes), 4, 4.0))
  want = np.stack([_coverage_by_pixels(b, 4, 4) for b in boxes])
  # Sub-pixel sampling at 1/8 px resolves box edges at multiples of 1/16 exactly.
  np.testing.assert_allclose(got, want, atol=1e-6)
  assert got[0].tolist() == [1.0] * 16 and got[2].sum() == 1 / 16


def _logits_fn(model):
  """Jitted caption logits (one compile per model; eager would dispatch op by op)."""
  return jax.jit(lambda p, b: model.apply({"params": p}, b,
                                          method=aligncap.AlignCap.caption_logits))


def _init(model, batch, te):
  return nn.unbox(jax.jit(model.init)(jax.random.key(0), batch, te))["params"]


def _loss_grad(model, params, name, batch, te):
  """The training loss's gradient with respect to `params[name]` alone.

  The other parameters enter as constants of the derivative, so the compiled
  backward pass computes no gradient of theirs (a smaller program than the full
  gradient).
  """
  def loss(own, rest, batch, te):
    return model.apply({"params": {**rest, name: own}}, batch, te, train=False)[0]
  rest = {k: v for k, v in params.items() if k != name}
  return jax.jit(jax.grad(loss))(params[name], rest, batch, te)


@pytest.fixture(scope="module")
def batch():
  """The tests' batch (it depends on the data config only, the same for every variant)."""
  return make_batch(tiny_config())


@pytest.fixture(scope="module")
def off():
  """The tiny model as configured (every new option off) and its jitted caption logits,
  compiled once for the module."""
  model = aligncap.build_model(tiny_config(), V)
  return model, _logits_fn(model)


def test_zero_init_changes_nothing_and_a_learned_vector_marks_the_box(batch, off):
  c_on = tiny_config(target_box_prompt=True)
  te = jnp.asarray(np.random.default_rng(0).normal(size=(V, c_on.model.clip_text.projection_dim)),
                   jnp.float32)
  m_on = aligncap.build_model(c_on, V)
  p_on = _init(m_on, batch, te)
  assert p_on["target_embedding"].shape == (c_on.model.vision.hidden_size,)
  p_off = {k: v for k, v in p_on.items() if k != "target_embedding"}
  on, off = _logits_fn(m_on), off[1]
  # Zero-initialised: the same numbers as the model without it (a frozen tower starts unchanged).
  np.testing.assert_array_equal(np.asarray(on(p_on, batch)), np.asarray(off(p_off, batch)))
  # It gets a gradient, and once non-zero the caption depends on where the box is.
  grad = _loss_grad(m_on, p_on, "target_embedding", batch, te)
  assert float(jnp.abs(grad).max()) > 0
  p_on["target_embedding"] = jnp.ones_like(p_on["target_embedding"])
  moved = dict(batch, view_boxes=np.broadcast_to(
      np.array([0, 0, 8, 8], np.float32), batch["view_boxes"].shape).copy())
  assert float(jnp.abs(on(p_on, batch) - on(p_on, moved)).max()) > 1e-3


def test_whole_view_pooling_reads_candidate_views_over_their_whole_extent(batch, off):
  """`candidate_pool="whole_view"`: a context view is pooled over all of it, so its
  own target box no longer matters (view 0 still pools the target box)."""
  c = tiny_config(candidate_pool="whole_view")
  te = jnp.zeros((V, c.model.clip_text.projection_dim), jnp.float32)
  model = aligncap.build_model(c, V)
  params = _init(model, batch, te)
  f = _logits_fn(model)
  base = np.asarray(f(params, batch))
  moved = batch["view_boxes"].copy()
  moved[:, 1:] = [1.0, 2.0, 9.0, 7.0]
  np.testing.assert_array_equal(np.asarray(f(params, dict(batch, view_boxes=moved))), base)
  moved0 = batch["view_boxes"].copy()
  moved0[:, 0] = [1.0, 2.0, 9.0, 7.0]
  assert np.abs(np.asarray(f(params, dict(batch, view_boxes=moved0))) - base).max() > 1e-4
  # The paper's reading pools the target box in every view: candidates' boxes matter.
  f2 = off[1]
  assert np.abs(np.asarray(f2(params, dict(batch, view_boxes=moved)))
                - np.asarray(f2(params, batch))).max() > 1e-4


def test_box_geometry_is_corners_centre_and_extent_over_the_view_size():
  got = np.asarray(ops.box_geometry(jnp.asarray([[8.0, 16.0, 24.0, 64.0]]), 64.0))
  np.testing.assert_allclose(got, [[0.125, 0.25, 0.375, 1.0, 0.25, 0.625, 0.25, 0.75]],
                             rtol=1e-7)   # exact binary fractions
  centred = np.asarray(ops.box_geometry(jnp.asarray([[8.0, 16.0, 24.0, 64.0]]), 64.0,
                                        centred=True))
  # Corners and centre from the view's centre (the side is the sign); extent kept.
  np.testing.assert_allclose(centred, [[-0.375, -0.25, -0.125, 0.5, -0.25, 0.125, 0.25, 0.75]],
                             rtol=1e-7)


def test_view_box_embedding_starts_at_zero_and_then_tells_where_the_target_sits(batch, off):
  c_on = tiny_config(view_box_embedding=True)
  te = jnp.zeros((V, c_on.model.clip_text.projection_dim), jnp.float32)
  m_on = aligncap.build_model(c_on, V)
  p_on = _init(m_on, batch, te)
  assert p_on["view_box_proj"]["kernel"].shape == (8, c_on.model.vision.hidden_size)
  p_off = {k: v for k, v in p_on.items() if k != "view_box_proj"}
  on, off = _logits_fn(m_on), off[1]
  np.testing.assert_array_equal(np.asarray(on(p_on, batch)), np.asarray(off(p_off, batch)))
  grad = _loss_grad(m_on, p_on, "view_box_proj", batch, te)
  assert float(jnp.abs(grad["kernel"]).max()) > 0
  # Once learned, the embedding is what the caption reads: non-zero weights change
  # the logits, and by how much depends on the boxes' geometry alone.
  p_zero = p_on
  p_one = dict(p_on, view_box_proj={"kernel": jnp.ones_like(p_on["view_box_proj"]["kernel"]),
                                    "bias": p_on["view_box_proj"]["bias"]})
  moved = batch["view_boxes"].copy()
  moved[:, 1:] = moved[:, 1:] * 0.5
  moved_batch = dict(batch, view_boxes=moved)
  effect = np.asarray(on(p_one, batch) - on(p_zero, batch))
  effect_moved = np.asarray(on(p_one, moved_batch) - on(p_zero, moved_batch))
  assert np.abs(effect).max() > 1e-3
  assert np.abs(effect - effect_moved).max() > 1e-3


def _view_tokens_fn(model):
  return jax.jit(lambda p, b: model.apply({"params": p}, b,
                                          method=aligncap.AlignCap.view_tokens))


def test_view_box_centred_reaches_the_view_box_embedding(batch):
  """`model.view_box_centred` shifts the corners and centre the embedding reads by
  -0.5: with an all-ones linear map, every token moves by exactly 6 x -0.5."""
  te = jnp.zeros((V, tiny_config().model.clip_text.projection_dim), jnp.float32)
  tokens = {}
  for centred in (False, True):
    m = aligncap.build_model(tiny_config(view_box_embedding=True, view_box_centred=centred), V)
    p = _init(m, batch, te)
    p = dict(p, view_box_proj={"kernel": jnp.ones_like(p["view_box_proj"]["kernel"]),
                               "bias": p["view_box_proj"]["bias"]})
    tokens[centred] = np.asarray(_view_tokens_fn(m)(p, batch))
  # Same seed, same params but the geometry: the difference is the shift alone
  # (float32 sums of O(1) terms: a few ulps).
  np.testing.assert_allclose(tokens[True] - tokens[False], -3.0, atol=1e-5)


def test_context_tokens_are_the_whole_view_pooled_and_marked_where_the_target_is(batch):
  k = 3
  c_on = tiny_config(context_tokens=k)
  m_on = aligncap.build_model(c_on, V)
  te = jnp.zeros((V, c_on.model.clip_text.projection_dim), jnp.float32)
  p_on = _init(m_on, batch, te)
  emb = p_on["context_target_embedding"]
  assert emb.shape == (c_on.model.vision.hidden_size,) and not np.asarray(emb).any()
  b, j = batch["views"].shape[:2]
  r, s, patch = c_on.model.roi_output_size, c_on.data.view_size, c_on.model.vision.patch_size
  tokens = np.asarray(_view_tokens_fn(m_on)(p_on, batch))
  assert tokens.shape[:3] == (b, j, 1 + r * r + k * k)
  # With the mark at zero the context tokens are RoI-align of the ViT's patch grid
  # over the whole view (the same op on the same tower output).
  vit = jax.jit(lambda p, x: m_on.apply({"params": p}, x, method=lambda mdl, x: mdl.vision(x)))
  mean, std = aligncap.PIXEL_STATS[c_on.model.vision.family]
  x = ((batch["views"].astype(np.float32) / 255.0 - mean) / std).reshape((b * j, s, s, 3))
  out = vit(p_on, jnp.asarray(x, jnp.dtype(c_on.model.frozen_dtype)))
  g = s // patch
  grid = out[:, 1:].reshape((b * j, g, g, -1)).astype(jnp.float32)
  whole = jnp.broadcast_to(jnp.asarray([0.0, 0.0, s, s], jnp.float32), (b * j, 1, 4))
  want = ops.roi_align(grid, whole, k, 1.0 / patch, sampling_ratio=c_on.model.roi_sampling_ratio,
                       aligned=c_on.model.roi_aligned).reshape((b, j, k * k, -1))
  # Same float32 ops, compiled in two programs: a few ulps of the tokens' scale.
  np.testing.assert_allclose(tokens[:, :, 1 + r * r:], np.asarray(want), rtol=1e-5, atol=1e-5)
  # The learned mark adds, to each context cell, the vector times the share of the
  # cell the target box covers, and nothing to the other tokens.
  vec = jnp.arange(1.0, c_on.model.vision.hidden_size + 1.0) / 10.0
  marked = np.asarray(_view_tokens_fn(m_on)(dict(p_on, context_target_embedding=vec), batch))
  diff = marked - tokens
  np.testing.assert_array_equal(diff[:, :, :1 + r * r], 0.0)
  cover = np.asarray(ops.box_coverage(jnp.asarray(batch["view_boxes"].reshape((b * j, 4))),
                                      k, s / k)).reshape((b, j, k * k, 1))
  np.testing.assert_allclose(diff[:, :, 1 + r * r:], cover * np.asarray(vec), rtol=1e-5,
                             atol=1e-5)
  assert 0 < cover.mean() < 1
  grad = _loss_grad(m_on, p_on, "context_target_embedding", batch, te)
  assert float(jnp.abs(grad).max()) > 0


def test_context_tokens_must_not_be_negative():
  from aligncap_jax import config as config_lib
  with pytest.raises(ValueError, match="model.context_tokens"):
    config_lib.validate(tiny_config(context_tokens=-1))
