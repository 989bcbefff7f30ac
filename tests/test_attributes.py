"""Per-attribute accuracy parsed with the synthetic generator's own grammar."""
from __future__ import annotations

import numpy as np
import pytest

from aligncap_jax.data import synthetic
from aligncap_jax.metrics import attributes


def test_every_generated_caption_parses_to_its_shapes():
  for index in range(20):
    scene = synthetic.generate_scene(0, "test", index, 128)
    for i, text in enumerate(scene.captions):
      p = attributes.parse_caption(text)
      s = scene.shapes[i]
      n = scene.shapes[synthetic.nearest_neighbour(scene.shapes, i)]
      assert p == {"size": s.size, "colour": s.colour, "shape": s.shape,
                   "relation": synthetic.relation(s.box, n.box),
                   "n_colour": n.colour, "n_shape": n.shape}, text


def test_accuracy_counts_each_attribute():
  refs = [["a small red circle left of a blue square"],
          ["a large orange diamond above a yellow triangle"],
          ["a small green square below an orange circle"],
          ["a large purple triangle right of a red diamond"]]
  preds = ["a small red circle left of a blue square",          # all right
           "a large orange diamond below a yellow square",      # relation, n_shape wrong
           "A small green square below an orange circle.",      # right (case, period)
           "something else entirely"]                           # unparsable
  got = attributes.attribute_accuracy(preds, refs)
  assert got["attr_parsed"] == 0.75
  assert got["attr_size"] == got["attr_colour"] == got["attr_shape"] == 0.75
  assert got["attr_relation"] == 0.5
  assert got["attr_neighbour_colour"] == 0.75
  assert got["attr_neighbour_shape"] == 0.5
  assert got["attr_neighbour"] == 0.5
  assert got["exact_match"] == 0.5
  assert all(0.0 <= v <= 1.0 for v in got.values())


def test_any_reference_counts_and_bad_references_are_named():
  got = attributes.attribute_accuracy(
      ["a small red circle above a blue square"],
      [["a small red circle left of a blue square", "a small red circle above a green square"]])
  assert got["attr_relation"] == 1.0 and got["attr_neighbour"] == 1.0
  assert got["exact_match"] == 0.0
  with pytest.raises(ValueError, match="not a synthetic caption"):
    attributes.attribute_accuracy(["a red circle"], [["a dog on a sofa"]])


def test_chance_level_of_random_captions_is_low():
  rng = np.random.default_rng(0)
  scene_caps = [synthetic.generate_scene(0, "test", i, 128).captions for i in range(30)]
  refs = [[c] for caps in scene_caps for c in caps]
  words = lambda seq: seq[int(rng.integers(len(seq)))]  # noqa: E731
  preds = [f"a {words(synthetic.SIZES)} {words(list(synthetic.COLOURS))} "
           f"{words(synthetic.SHAPES)} {words(synthetic.RELATIONS)} a "
           f"{words(list(synthetic.COLOURS))} {words(synthetic.SHAPES)}" for _ in refs]
  got = attributes.attribute_accuracy(preds, refs)
  assert got["attr_parsed"] == 1.0
  assert got["attr_neighbour"] < 0.2 and got["attr_relation"] < 0.45
