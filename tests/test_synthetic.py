"""The synthetic scene generator, its TFDS builder and the word-level tokenizer."""
from __future__ import annotations

import numpy as np
import pytest

from aligncap_jax.data import synthetic, tokenizer
from aligncap_jax.data.synthetic import Shape

SETTINGS = dict(num_train_images=10, num_validation_images=3, num_test_images=4,
                image_size=64, seed=3)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
  data_dir = str(tmp_path_factory.mktemp("tfds"))
  builder = synthetic.SyntheticRegions(data_dir=data_dir, file_format="array_record", **SETTINGS)
  builder.download_and_prepare()
  return data_dir, builder


def test_same_seed_same_scene_other_seed_differs():
  a = synthetic.generate_scene(7, "train", 5, 96)
  b = synthetic.generate_scene(7, "train", 5, 96)
  np.testing.assert_array_equal(a.image, b.image)
  np.testing.assert_array_equal(a.region_boxes, b.region_boxes)
  assert a.captions == b.captions
  assert [d["score"] for d in a.detections] == [d["score"] for d in b.detections]
  c = synthetic.generate_scene(8, "train", 5, 96)
  d = synthetic.generate_scene(7, "test", 5, 96)
  assert not np.array_equal(a.image, c.image) and not np.array_equal(a.image, d.image)


def test_captions_and_relations_on_a_constructed_scene():
  # red circle at left, blue square to its right (same row), green triangle far below.
  shapes = (Shape("circle", "red", "small", (10, 10, 20, 20)),
            Shape("square", "blue", "large", (40, 5, 70, 35)),
            Shape("triangle", "green", "small", (35, 80, 45, 90)))
  assert synthetic.nearest_neighbour(shapes, 0) == 1
  assert synthetic.nearest_neighbour(shapes, 2) == 1
  assert synthetic.caption(shapes, 0) == "a small red circle left of a blue square"
  assert synthetic.caption(shapes, 1) == "a large blue square right of a red circle"
  assert synthetic.caption(shapes, 2) == "a small green triangle below a blue square"
  assert synthetic.relation((0, 0, 10, 10), (0, 50, 10, 60)) == "above"
  assert synthetic.relation((0, 0, 10, 10), (50, 50, 60, 60)) == "left of"  # tie -> horizontal
  shapes = (Shape("diamond", "purple", "large", (0, 0, 10, 10)),
            Shape("circle", "orange", "small", (0, 30, 10, 40)))
  assert synthetic.caption(shapes, 0) == "a large purple diamond above an orange circle"


def test_scene_contents_are_consistent():
  for i in range(20):
    s = synthetic.generate_scene(0, "train", i, 64)
    n = len(s.shapes)
    assert synthetic.MIN_OBJECTS <= n <= synthetic.MAX_OBJECTS
    assert s.image.shape == (64, 64, 3) and s.image.dtype == np.uint8
    assert s.region_boxes.shape == (n, 4)
    assert np.all(s.region_boxes >= 0) and np.all(s.region_boxes <= 64)
    assert np.all(s.region_boxes[:, 2:] > s.region_boxes[:, :2])
    # Region boxes are the shapes' boxes up to the jitter.
    exact = np.array([sh.box for sh in s.shapes])
    assert np.abs(s.region_boxes - np.clip(exact, 0, 64)).max() <= 1.0 + 1e-5
    for k, cap in enumerate(s.captions):
      assert cap == synthetic.caption(s.shapes, k)
    for d in s.detections:
      assert d["label"] in synthetic.SHAPES
      assert 0 < d["score"] <= 1
      assert np.all(d["bbox"][2:] > d["bbox"][:2])
    # The shape's fill colour is at its centre.
    for sh in s.shapes:
      cx, cy = (int(v) for v in sh.centre)
      np.testing.assert_array_equal(s.image[cy, cx], synthetic.COLOURS[sh.colour])


def test_detector_has_misses_and_false_positives():
  misses = fps = total = 0
  for i in range(200):
    s = synthetic.generate_scene(1, "train", i, 64)
    total += len(s.shapes)
    hi = [d for d in s.detections if d["score"] >= 0.5]
    lo = [d for d in s.detections if d["score"] < 0.5]
    misses += len(s.shapes) - len(hi)
    fps += len(lo)
  assert 0.03 < misses / total < 0.2
  assert 0.3 < fps / 200 < 0.7


def test_builder_records_match_the_generator(built):
  _, builder = built
  assert builder.info.metadata["generator"] == SETTINGS
  for split, n in (("train", 10), ("validation", 3), ("test", 4)):
    source = builder.as_data_source(split)
    assert len(source) == n
    seen = set()
    for j in range(n):
      rec = source[j]
      index = rec["image_id"] - synthetic.image_id(split, 0)
      seen.add(index)
      scene = synthetic.generate_scene(SETTINGS["seed"], split, index, 64)
      np.testing.assert_array_equal(rec["image"], scene.image)
      assert (rec["width"], rec["height"]) == (64, 64)
      assert [c.decode() for c in rec["regions"]["caption"]] == list(scene.captions)
      np.testing.assert_array_equal(np.stack(rec["regions"]["bbox"]), scene.region_boxes)
      assert len(set(int(v) for v in rec["regions"]["id"])) == len(scene.captions)
      assert [l.decode() for l in rec["objects"]["label"]] == [d["label"] for d in scene.detections]
    assert seen == set(range(n))


def test_reopened_builder_reads_settings_without_arguments(built):
  data_dir, _ = built
  again = synthetic.SyntheticRegions(data_dir=data_dir)
  assert again.is_prepared()
  assert dict(again.info.metadata["generator"]) == SETTINGS


def test_builder_without_settings_cannot_build(tmp_path):
  b = synthetic.SyntheticRegions(data_dir=str(tmp_path), file_format="array_record")
  with pytest.raises(ValueError, match="num_train_images"):
    b.download_and_prepare()


def test_word_level_tokenizer(tmp_path):
  caps = ["a small red circle left of a blue square", "A large Blue square above a red circle"]
  tok = tokenizer.train_word_level(caps)
  v = tok.get_vocab()
  assert (v["<pad>"], v["</s>"], v["<unk>"]) == (0, 1, 2)
  assert "," in v and "|" in v and "blue" in v and "Blue" not in v
  assert v["a"] == 5   # the most frequent word right after the five fixed tokens
  # Order of the texts does not change the ids.
  assert tokenizer.train_word_level(caps[::-1]).get_vocab() == v
  enc = tok.encode("Red, circle|dragon")
  assert enc.tokens == ["red", ",", "circle", "|", "<unk>", "</s>"]
  path = tmp_path / "tokenizer.json"
  tok.save(str(path))
  assert tokenizer.load(str(path)).encode("a red circle").ids == tok.encode("a red circle").ids
  assert tokenizer.load(str(tmp_path)).get_vocab() == v    # folder with tokenizer.json
  with pytest.raises(FileNotFoundError, match="missing.json"):
    tokenizer.load(str(tmp_path / "missing.json"))


def test_encoders_truncate_keeping_eos():
  tok = tokenizer.train_word_level(["a b c d e f"])
  ids, mask, truncated = tokenizer.encode_llm(tok, "a b c", 6, eos_id=1, pad_id=0)
  assert not truncated
  np.testing.assert_array_equal(mask, [1, 1, 1, 1, 0, 0])
  assert ids[3] == 1 and ids[4] == 0
  ids, mask, truncated = tokenizer.encode_llm(tok, "a b c d e f", 4, eos_id=1, pad_id=0)
  assert truncated and mask.sum() == 4
  np.testing.assert_array_equal(ids, [tok.token_to_id(w) for w in "abc"] + [1])
  clip, cmask = tokenizer.encode_clip(tok, "a b c d e f", 3)
  np.testing.assert_array_equal(clip, [tok.token_to_id("a"), tok.token_to_id("b"), 1])
  assert cmask.sum() == 3
  assert tokenizer.token_id(tok, "|") == 4
  with pytest.raises(ValueError, match="zebra"):
    tokenizer.token_id(tok, "zebra")
