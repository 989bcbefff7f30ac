"""The target-box prompt (`model.target_box_prompt`): coverage op and its effect."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

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


def test_zero_init_changes_nothing_and_a_learned_vector_marks_the_box():
  c_off, c_on = tiny_config(), tiny_config(target_box_prompt=True)
  batch = make_batch(c_on)
  te = jnp.asarray(np.random.default_rng(0).normal(size=(V, c_on.model.clip_text.projection_dim)),
                   jnp.float32)
  m_off, m_on = aligncap.build_model(c_off, V), aligncap.build_model(c_on, V)
  p_on = nn.unbox(m_on.init(jax.random.key(0), batch, te))["params"]
  assert p_on["target_embedding"].shape == (c_on.model.vision.hidden_size,)
  p_off = {k: v for k, v in p_on.items() if k != "target_embedding"}
  logits = lambda m, p, b: m.apply({"params": p}, b, method=aligncap.AlignCap.caption_logits)  # noqa: E731
  # Zero-initialised: the same numbers as the model without it (a frozen tower starts unchanged).
  np.testing.assert_array_equal(np.asarray(logits(m_on, p_on, batch)),
                                np.asarray(logits(m_off, p_off, batch)))
  # It gets a gradient, and once non-zero the caption depends on where the box is.
  grad = jax.grad(lambda p: m_on.apply({"params": p}, batch, te, train=False)[0])(p_on)
  assert float(jnp.abs(grad["target_embedding"]).max()) > 0
  p_on["target_embedding"] = jnp.ones_like(p_on["target_embedding"])
  moved = dict(batch, view_boxes=batch["view_boxes"][:, :, [2, 3, 0, 1]].clip(0) * 0
               + np.array([0, 0, 8, 8], np.float32))
  a, b = logits(m_on, p_on, batch), logits(m_on, p_on, moved)
  assert float(jnp.abs(a - b).max()) > 1e-3


def test_whole_view_pooling_reads_candidate_views_over_their_whole_extent():
  """`candidate_pool="whole_view"`: a context view is pooled over all of it, so its
  own target box no longer matters (view 0 still pools the target box)."""
  c = tiny_config(candidate_pool="whole_view")
  batch = make_batch(c)
  te = jnp.zeros((V, c.model.clip_text.projection_dim), jnp.float32)
  model = aligncap.build_model(c, V)
  params = nn.unbox(model.init(jax.random.key(0), batch, te))["params"]
  logits = lambda b: np.asarray(model.apply(  # noqa: E731
      {"params": params}, b, method=aligncap.AlignCap.caption_logits))
  base = logits(batch)
  moved = batch["view_boxes"].copy()
  moved[:, 1:] = [1.0, 2.0, 9.0, 7.0]
  np.testing.assert_array_equal(logits(dict(batch, view_boxes=moved)), base)
  moved0 = batch["view_boxes"].copy()
  moved0[:, 0] = [1.0, 2.0, 9.0, 7.0]
  assert np.abs(logits(dict(batch, view_boxes=moved0)) - base).max() > 1e-4
  # The paper's reading pools the target box in every view: candidates' boxes matter.
  c2 = tiny_config()
  m2 = aligncap.build_model(c2, V)
  p2 = nn.unbox(m2.init(jax.random.key(0), batch, te))["params"]
  l2 = lambda b: np.asarray(m2.apply(  # noqa: E731
      {"params": p2}, b, method=aligncap.AlignCap.caption_logits))
  assert np.abs(l2(dict(batch, view_boxes=moved)) - l2(batch)).max() > 1e-4
