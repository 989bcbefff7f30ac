"""The hard synthetic variant: grammar, geometry, detector and its pipeline build."""
from __future__ import annotations

import hashlib
import importlib.util
import itertools
import os

import numpy as np
import pytest

from aligncap_jax.data import synthetic, synthetic_hard
from aligncap_jax.data.synthetic_hard import GRAMMAR, HardShape
from aligncap_jax.metrics import attributes

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _config(arg):
  spec = importlib.util.spec_from_file_location("synthetic_cfg", os.path.join(ROOT, "configs",
                                                                            "synthetic.py"))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod.get_config(arg)


def _facts():
  """Facts covering every word of the grammar (and both articles) at least once."""
  cols, shapes = GRAMMAR.colours, GRAMMAR.shapes
  for k, (size, pattern, relation) in enumerate(itertools.product(
      GRAMMAR.sizes, GRAMMAR.patterns, synthetic.RELATIONS)):
    yield dict(size=size, pattern=pattern, colour=cols[k % len(cols)],
               shape=shapes[k % len(shapes)], relation=relation,
               n_colour=cols[(5 * k + 3) % len(cols)], n_shape=shapes[(3 * k + 1) % len(shapes)])


def test_every_template_parses_back_to_its_fact_and_only_one_matches():
  seen = set()
  for f in _facts():
    texts = [GRAMMAR.render(t, f) for t in range(len(GRAMMAR.templates))]
    assert len(set(texts)) == len(texts)
    for text in texts:
      assert attributes.parse_caption(text, GRAMMAR) == f, text
      regexes = attributes._compiled(GRAMMAR)  # pylint: disable=protected-access
      assert sum(bool(r.match(text)) for r, _ in regexes) == 1, text
      assert attributes.parse_caption(text) is None     # not the default grammar
      seen.update(text.split())
  vocab = set(GRAMMAR.sizes + GRAMMAR.patterns + GRAMMAR.colours + GRAMMAR.shapes)
  assert vocab <= seen and {"a", "an"} <= seen


def test_templates_read_as_written():
  f = dict(size="small", pattern="striped", colour="red", shape="circle", relation="left of",
           n_colour="blue", n_shape="square")
  assert [GRAMMAR.render(t, f) for t in range(4)] == [
      "a small striped red circle left of a blue square",
      "small striped red circle to the left of a blue square",
      "a blue square is right of this small striped red circle",
      "a small striped red circle with a blue square to the right of it"]
  f.update(relation="below", n_colour="amber", colour="orange", size="medium")
  assert GRAMMAR.render(2, f) == "an amber square is above this medium striped orange circle"
  assert GRAMMAR.render(3, f) == "a medium striped orange circle with an amber square over it"
  # The default variant renders through the same machinery, unchanged.
  assert synthetic.GRAMMAR.render(0, dict(size="large", colour="purple", shape="diamond",
                                          relation="above", n_colour="orange",
                                          n_shape="circle")) == \
      "a large purple diamond above an orange circle"


@pytest.mark.parametrize("text", [
    "a small red circle left of a blue square",                       # default grammar: no pattern
    "a small striped red circle to the left of a blue square",         # article + paraphrase words
    "small striped red circle left of a blue square",                  # no article + canonical words
    "a blue square is to the right of this small striped red circle",  # inverse with paraphrase
    "a small striped red circle with a blue square right of it",       # "with" with canonical
    "a small spotted red circle left of a blue square",                # not a pattern word
    "a small striped scarlet circle left of a blue square",            # not a colour
    "a small striped red oval left of a blue square",                  # not a shape
    "a small striped red circle near a blue square",                   # not a relation
    "a small striped red circle left of a blue square today",          # trailing words
    "a striped small red circle left of a blue square",                # word order
    "a small striped red circle left of a striped blue square",        # neighbour has no pattern
    "",
])
def test_off_grammar_text_is_rejected(text):
  assert attributes.parse_caption(text, GRAMMAR) is None


def test_accuracy_with_paraphrase_references_and_pattern():
  refs = [["a small striped red circle left of a blue square",
           "a blue square is right of this small striped red circle"]]
  got = attributes.attribute_accuracy(
      ["small striped red circle to the left of a blue square"], refs, GRAMMAR)
  assert got["attr_pattern"] == got["attr_relation"] == got["attr_neighbour"] == 1.0
  assert got["exact_match"] == 0.0          # a correct paraphrase that is not a reference
  got = attributes.attribute_accuracy(
      ["a teal square is left of this small dotted red circle"], refs, GRAMMAR)
  assert (got["attr_relation"], got["attr_pattern"], got["attr_neighbour_shape"],
          got["attr_neighbour_colour"], got["attr_colour"]) == (0.0, 0.0, 1.0, 0.0, 1.0)
  assert "attr_pattern" not in attributes.attribute_accuracy(
      ["a small red circle left of a blue square"],
      [["a small red circle left of a blue square"]])
  assert attributes.grammar_for("synthetic_regions_hard") is GRAMMAR
  with pytest.raises(ValueError, match="synthetic_regions_hard"):
    attributes.grammar_for("synthetic_regions_easy")


def test_neighbour_is_the_nearest_box_outside_the_target():
  boxes = np.array([[40, 40, 60, 60],     # target
                    [55, 45, 75, 65],     # nearest, but overlaps the target
                    [61, 40, 81, 60],     # 1 px outside: closer than the gap
                    [40, 63, 60, 83],     # 3 px below: the neighbour
                    [0, 0, 10, 10]], np.float32)
  assert synthetic_hard.neighbour_index(boxes, 0) == 3
  assert synthetic.relation(tuple(boxes[0]), tuple(boxes[3])) == "above"
  boxes[3] = [40, 105, 60, 125]           # 65 px away: the corner box (63.6) is nearer
  assert synthetic_hard.neighbour_index(boxes, 0) == 4
  assert synthetic.relation(tuple(boxes[0]), tuple(boxes[4])) == "right of"
  assert synthetic_hard.neighbour_index(boxes[:3], 0) == -1


def _outside(a, b, gap):
  return b[0] >= a[2] + gap or b[2] <= a[0] - gap or b[1] >= a[3] + gap or b[3] <= a[1] - gap


def test_scenes_are_consistent_with_their_geometry():
  counts, overlapping = [], 0
  for split, index in itertools.product(("train", "test"), range(25)):
    s = synthetic_hard.generate_scene(0, split, index, 128)
    n = len(s.shapes)
    counts.append(n)
    assert synthetic_hard.MIN_OBJECTS <= n <= synthetic_hard.MAX_OBJECTS
    assert s.image.shape == (128, 128, 3) and s.image.dtype == np.uint8
    exact = np.array([sh.box for sh in s.shapes])
    assert np.abs(s.object_boxes - np.clip(exact, 0, 128)).max() <= 1.0 + 1e-5
    overlapping += any(not _outside(a, b, 0) for a, b in itertools.combinations(exact, 2))
    per_object = 4 if split == "test" else 1
    assert len(s.captions) == len(s.region_boxes) == per_object * n
    for r, (obj, text) in enumerate(zip(s.region_objects, s.captions)):
      np.testing.assert_array_equal(s.region_boxes[r], s.object_boxes[obj])
      nb = s.neighbours[obj]
      a, b = s.object_boxes[obj], s.object_boxes[nb]
      assert _outside(a, b, synthetic_hard.NEIGHBOUR_GAP_PX)
      dx = (a[0] + a[2]) / 2 - (b[0] + b[2]) / 2
      dy = (a[1] + a[3]) / 2 - (b[1] + b[3]) / 2
      want = (("left of" if dx < 0 else "right of") if abs(dx) >= abs(dy)
              else ("above" if dy < 0 else "below"))
      t, m = s.shapes[obj], s.shapes[nb]
      assert attributes.parse_caption(text, GRAMMAR) == dict(
          size=t.size, pattern=t.pattern, colour=t.colour, shape=t.shape, relation=want,
          n_colour=m.colour, n_shape=m.shape), text
      # No box outside the gap is nearer than the neighbour.
      c = (s.object_boxes[:, :2] + s.object_boxes[:, 2:]) / 2
      d = ((c - c[obj]) ** 2).sum(-1)
      for k in range(n):
        if k != obj and _outside(a, s.object_boxes[k], synthetic_hard.NEIGHBOUR_GAP_PX):
          assert d[k] >= d[nb]
      assert len(text.split()) <= 15    # fits max_caption_tokens=16 with EOS
    if split == "test":
      assert len({c for c in s.captions}) == len(s.captions)
    # The last-drawn shape's centre shows its fill or its pattern tint.
    top = s.shapes[-1]
    cx, cy = (int(v) for v in top.centre)
    rgb = np.array(top.rgb, np.float64)
    tint = np.round(rgb + (255 - rgb) * synthetic_hard._TINT)  # pylint: disable=protected-access
    assert any(np.array_equal(s.image[cy, cx], v) for v in (rgb, tint))
  assert len(set(counts)) >= 4 and overlapping >= 5


def test_same_seed_same_scene_and_detector_noise():
  a = synthetic_hard.generate_scene(4, "train", 9, 96)
  b = synthetic_hard.generate_scene(4, "train", 9, 96)
  np.testing.assert_array_equal(a.image, b.image)
  assert a.captions == b.captions
  assert not np.array_equal(a.image, synthetic_hard.generate_scene(5, "train", 9, 96).image)
  misses = fps = total = 0
  for i in range(150):
    s = synthetic_hard.generate_scene(1, "train", i, 96)
    total += len(s.shapes)
    hi = [d for d in s.detections if d["score"] >= 0.5]
    misses += len(s.shapes) - len(hi)
    fps += len(s.detections) - len(hi)
    assert all(d["label"] in synthetic_hard.SHAPES for d in s.detections)
  assert 0.03 < misses / total < 0.2 and 0.3 < fps / 150 < 0.7


def test_shapes_and_colours_of_the_pattern_helpers():
  s = HardShape("star", "pink", "large", "checked", (10, 10, 40, 40), (230, 110, 170))
  poly = synthetic_hard._outline(s)  # pylint: disable=protected-access
  assert len(poly) == 10
  assert synthetic_hard._outline(  # pylint: disable=protected-access
      HardShape("circle", "red", "small", "plain", (0, 0, 9, 9), (0, 0, 0))) is None
  y, x = np.mgrid[0:12, 0:12]
  for name in synthetic_hard.PATTERNS:
    frac = synthetic_hard._pattern(name, x, y).mean()  # pylint: disable=protected-access
    assert frac == 0 if name == "plain" else 0.2 < frac < 0.6


DEFAULT_PIN = "987b9d5a8f58267b4a86a308090e09678d2e23e37b3b6d56fe15a1b4fb763fc5"


def test_default_variant_scenes_are_unchanged():
  """Images, boxes, captions and detections of the default variant, pinned."""
  h = hashlib.sha256()
  for split in ("train", "test"):
    for i in range(12):
      s = synthetic.generate_scene(0, split, i, 128)
      h.update(s.image.tobytes())
      h.update(s.region_boxes.tobytes())
      h.update("|".join(s.captions).encode())
      for d in s.detections:
        h.update(d["label"].encode())
        h.update(np.asarray(d["bbox"], np.float32).tobytes())
        h.update(np.float32(d["score"]).tobytes())
  assert h.hexdigest() == DEFAULT_PIN


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
  from aligncap_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  data_dir = str(tmp_path_factory.mktemp("tfds"))
  configs = {}
  for arg in ("hard", None):
    c = _config(arg)
    c.data.data_dir = data_dir
    c.data.synthetic.update(num_train_images=12, num_validation_images=3, num_test_images=5,
                            image_size=96, seed=2)
    pipeline.prepare(c)
    configs[arg] = c
  return configs


def test_hard_variant_builds_beside_the_default_through_the_pipeline(prepared):
  from aligncap_jax.data import god_tfds, pipeline  # pylint: disable=g-import-not-at-top
  hard, default = prepared["hard"], prepared[None]
  ddir = hard.data.data_dir
  for name in ("synthetic_regions", "synthetic_regions_hard"):
    assert god_tfds.is_built(name, ddir)
  # Each reads its own records, built from its own generator.
  for c, gen in ((hard, synthetic_hard.generate_scene), (default, synthetic.generate_scene)):
    source = pipeline._source(c, "test")  # pylint: disable=protected-access
    for j in range(len(source)):
      rec = source[j]
      scene = gen(2, "test", rec["image_id"] - synthetic.image_id("test", 0), 96)
      assert [r["caption"] for r in rec["regions"]] == list(scene.captions)
  targets = pipeline.eval_targets(hard, "test")
  assert all(len(t["references"]) == 4 for t in targets)
  grammar = attributes.grammar_for(hard.data.name)
  refs = [t["references"] for t in targets]
  got = attributes.attribute_accuracy([r[1] for r in refs], refs, grammar)
  assert got["exact_match"] == got["attr_neighbour"] == got["attr_pattern"] == 1.0
  assets = pipeline.load_assets(hard)
  batch = next(pipeline.make_eval_iterator(hard, assets, "test", batch_size=4))
  assert batch["views"].shape == (4, hard.data.num_views, 64, 64, 3)
  assert pipeline.dataset_tokenizer_path(hard) != pipeline.dataset_tokenizer_path(default)
  assert "crimson" in assets.llm_tokenizer.get_vocab() or "navy" in assets.llm_tokenizer.get_vocab()


def test_context_reach_on_the_hard_variant(prepared):
  from aligncap_jax.data import context_reach, pipeline  # pylint: disable=g-import-not-at-top
  hard = prepared["hard"]
  got = context_reach.context_reach(hard, "test")
  assert 0.0 <= got["context_in_eval_views"] <= got["context_in_any_view"] <= 1.0
  assert got["context_in_any_view"] > 0.4
  # The neighbour it checks is the generator's neighbour of each target.
  source = pipeline._source(hard, "test")  # pylint: disable=protected-access
  for t in pipeline._eval_target_rows(hard, "test", 0):  # pylint: disable=protected-access
    rec = source[t["_record"]]
    scene = synthetic_hard.generate_scene(2, "test", rec["image_id"] - synthetic.image_id("test", 0),
                                          96)
    boxes = np.stack([np.asarray(r["bbox"], np.float32) for r in rec["regions"]])
    obj = scene.region_objects[t["_region"]]
    np.testing.assert_array_equal(
        context_reach._neighbour_box(hard.data.name, boxes, t["_region"]),  # pylint: disable=protected-access
        scene.object_boxes[scene.neighbours[obj]])
  hard.data.num_views = 1
  try:
    assert context_reach.context_reach(hard, "test")["context_in_eval_views"] == 0
  finally:
    hard.data.num_views = 3
