"""The GOD TFDS job on a tiny synthetic base: every field against god/tags directly."""
from __future__ import annotations

import importlib.util
import json
import os

import numpy as np
import pytest
import tensorflow_datasets as tfds

from aligncap_jax.data import god, god_tfds, synthetic, tags

BASE = "synthetic_regions"


def _build_base(data_dir):
  builder = synthetic.SyntheticRegions(
      data_dir=str(data_dir), file_format="array_record", num_train_images=4,
      num_validation_images=1, num_test_images=2, image_size=64, seed=3)
  builder.download_and_prepare()
  return builder


def _text(v):
  return v.decode() if isinstance(v, bytes) else str(v)


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
  data_dir = tmp_path_factory.mktemp("tfds")
  _build_base(data_dir)
  return str(data_dir)


def _base_records(data_dir, split):
  builder = tfds.core.read_only_builder.builder_from_files(BASE, data_dir=data_dir)
  return list(builder.as_data_source(split))


def _check_against_direct(data_dir, *, top_k, threshold, objects_of):
  vocab = tags.load_vocab(god_tfds.tag_vocab_path(BASE, data_dir))
  for split in ("train", "validation", "test"):
    base = _base_records(data_dir, split)
    source = god_tfds.load_source(BASE, split, data_dir)
    assert len(source) == len(base)
    expected_index = [(i, r) for i, rec in enumerate(base) for r in range(len(rec["regions"]["id"]))]
    np.testing.assert_array_equal(source.regions, np.array(expected_index).reshape(-1, 2))
    assert source.regions.dtype == np.int64
    np.testing.assert_array_equal(
        np.load(god_tfds.regions_index_path(BASE, split, data_dir)), source.regions)
    for i, want in enumerate(base):
      got = source[i]
      assert got["image_id"] == want["image_id"]
      assert (got["width"], got["height"]) == (want["width"], want["height"])
      np.testing.assert_array_equal(got["image"], want["image"])
      objects = objects_of(want)
      assert [o["label"] for o in got["objects"]] == [o["label"] for o in objects]
      for o, w in zip(got["objects"], objects):
        np.testing.assert_allclose(o["bbox"], w["bbox"], rtol=1e-6)
        assert o["score"] == pytest.approx(w["score"], rel=1e-6)
      assert len(got["regions"]) == len(want["regions"]["id"])
      for r, region in enumerate(got["regions"]):
        box = want["regions"]["bbox"][r]
        caption = _text(want["regions"]["caption"][r])
        assert region["id"] == want["regions"]["id"][r]
        assert region["caption"] == caption
        np.testing.assert_array_equal(region["bbox"], box)
        views = god.propose_views(box, objects, top_k=top_k, score_threshold=threshold,
                                  image_size=(want["width"], want["height"]))
        np.testing.assert_array_equal(region["views"], views)
        assert region["views"].dtype == np.float32 and region["views"].shape[1:] == (4,)
        np.testing.assert_array_equal(region["view_distance"],
                                      god.view_distances(want["image"], box, views))
        assert region["view_distance"].dtype == np.int32
        np.testing.assert_array_equal(region["tag_ids"], tags.tag_ids(caption, vocab))
        assert region["tag_ids"].dtype == np.int32


def _own_objects(rec):
  return [{"label": _text(l), "bbox": b, "score": float(s)}
          for l, b, s in zip(rec["objects"]["label"], rec["objects"]["bbox"], rec["objects"]["score"])]


def test_god_job_fields_vocab_and_reuse(base_dir):
  out = god_tfds.build(BASE, data_dir=base_dir, top_k=2, score_threshold=0.3, tag_vocab_size=6)
  assert out == os.path.join(base_dir, f"{BASE}_god", "1.0.0")
  assert god_tfds.is_built(BASE, base_dir)
  train_captions = [_text(c) for rec in _base_records(base_dir, "train")
                    for c in rec["regions"]["caption"]]
  vocab_text = open(god_tfds.tag_vocab_path(BASE, base_dir)).read()
  assert vocab_text == "".join(w + "\n" for w in tags.build_vocab(train_captions, 6))
  _check_against_direct(base_dir, top_k=2, threshold=0.3, objects_of=_own_objects)
  counts = [len(r["views"]) for rec in god_tfds.load_source(BASE, "train", base_dir)
            for r in rec["regions"]]
  assert max(counts) > 0  # the tiny scenes do produce views
  # Same settings: reused, not rebuilt.
  shard = [f for f in os.listdir(out) if "train.array_record" in f][0]
  stamp = os.path.getmtime(os.path.join(out, shard))
  god_tfds.build(BASE, data_dir=base_dir, top_k=2, score_threshold=0.3, tag_vocab_size=6)
  assert os.path.getmtime(os.path.join(out, shard)) == stamp


def test_god_job_with_detections_file_rebuilds(base_dir, tmp_path):
  rng = np.random.default_rng(0)
  dets, by_image = [], {}
  for split in ("train", "validation", "test"):
    for rec in _base_records(base_dir, split):
      for _ in range(rng.integers(0, 4)):
        x, y = rng.uniform(0, 50, 2)
        w, h = rng.uniform(1, 30, 2)
        cat = int(rng.integers(1, 3))
        dets.append({"image_id": int(rec["image_id"]), "category_id": cat,
                     "bbox": [float(x), float(y), float(w), float(h)],
                     "score": float(rng.uniform())})
        by_image.setdefault(int(rec["image_id"]), []).append(
            {"label": ["", "cup", "fork"][cat], "bbox": [x, y, x + w, y + h],
             "score": dets[-1]["score"]})
  path = tmp_path / "dets.json"
  path.write_text(json.dumps({"categories": [{"id": 1, "name": "cup"}, {"id": 2, "name": "fork"}],
                              "detections": dets}))
  god_tfds.build(BASE, data_dir=base_dir, top_k=1, score_threshold=0.0, tag_vocab_size=6,
                 detections_file=str(path))
  _check_against_direct(base_dir, top_k=1, threshold=0.0,
                        objects_of=lambda rec: by_image.get(int(rec["image_id"]), []))


def test_bad_detections_file_names_entry(base_dir, tmp_path):
  path = tmp_path / "bad.json"
  path.write_text(json.dumps({"categories": [{"id": 1, "name": "cup"}],
                              "detections": [{"image_id": 1, "category_id": 7,
                                              "bbox": [0, 0, 1, 1], "score": 1.0}]}))
  with pytest.raises(ValueError, match=r"bad.json: detections\[0\].category_id=7"):
    god_tfds.build(BASE, data_dir=base_dir, top_k=1, score_threshold=0.0, tag_vocab_size=6,
                   detections_file=str(path))
  path.write_text("[]")
  with pytest.raises(ValueError, match="categories"):
    god_tfds.build(BASE, data_dir=base_dir, top_k=1, score_threshold=0.0, tag_vocab_size=6,
                   detections_file=str(path))


def test_missing_base_is_a_clear_error(tmp_path):
  with pytest.raises(FileNotFoundError, match="base dataset 'synthetic_regions' is not prepared"):
    god_tfds.build(BASE, data_dir=str(tmp_path), top_k=1, score_threshold=0.0, tag_vocab_size=6)
  assert not god_tfds.is_built(BASE, str(tmp_path))


def test_two_processes_give_identical_records(tmp_path):
  one, two = tmp_path / "one", tmp_path / "two"
  for d in (one, two):
    _build_base(d)
  god_tfds.build(BASE, data_dir=str(one), top_k=1, score_threshold=0.0, tag_vocab_size=8)
  god_tfds.build(BASE, data_dir=str(two), top_k=1, score_threshold=0.0, tag_vocab_size=8,
                 num_processes=2)
  for split in ("train", "test"):
    a = god_tfds.load_source(BASE, split, str(one))
    b = god_tfds.load_source(BASE, split, str(two))
    np.testing.assert_array_equal(a.regions, b.regions)
    for i in range(len(a)):
      for ra, rb in zip(a[i]["regions"], b[i]["regions"]):
        for key in ("views", "view_distance", "tag_ids", "bbox"):
          np.testing.assert_array_equal(ra[key], rb[key])


def test_exact_and_fast_hash_write_identical_records(tmp_path):
  """data.god_hash only picks the pHash implementation: the records are the same, so a
  dataset built with one is reused by the other (the method is not in its identity)."""
  fast, exact = tmp_path / "fast", tmp_path / "exact"
  for d in (fast, exact):
    _build_base(d)
  kw = dict(top_k=2, score_threshold=0.0, tag_vocab_size=8)
  out = god_tfds.build(BASE, data_dir=str(fast), **kw, hash_method="fast")
  god_tfds.build(BASE, data_dir=str(exact), **kw, hash_method="exact")
  for split in ("train", "validation", "test"):
    a = god_tfds.load_source(BASE, split, str(fast))
    b = god_tfds.load_source(BASE, split, str(exact))
    for i in range(len(a)):
      for ra, rb in zip(a[i]["regions"], b[i]["regions"]):
        for key in ("views", "view_distance", "tag_ids", "bbox"):
          np.testing.assert_array_equal(ra[key], rb[key])
  shard = [f for f in os.listdir(out) if "train.array_record" in f][0]
  stamp = os.path.getmtime(os.path.join(out, shard))
  god_tfds.build(BASE, data_dir=str(fast), **kw, hash_method="exact")
  assert os.path.getmtime(os.path.join(out, shard)) == stamp
  with pytest.raises(ValueError, match="data.god_hash"):
    god_tfds.build(BASE, data_dir=str(fast), **kw, hash_method="approx")


_HAS_BEAM = importlib.util.find_spec("apache_beam") is not None
_BEAM_HOW = ("apache_beam is not installed in this venv; the Beam path runs in its own: "
             "python -m venv .venv-beam && .venv-beam/bin/pip install -e '.[beam,test]', then "
             ".venv-beam/bin/python -m pytest tests/test_god_tfds.py -k beam (launch/test.sh does)")


def test_beam_venv_has_beam():
  """launch/test.sh sets ALIGNCAP_REQUIRE_BEAM=1 in .venv-beam: a broken install fails there."""
  if os.environ.get("ALIGNCAP_REQUIRE_BEAM") == "1":
    assert _HAS_BEAM, "ALIGNCAP_REQUIRE_BEAM=1 but apache_beam cannot be imported"


@pytest.mark.skipif(not _HAS_BEAM, reason=_BEAM_HOW)
def test_beam_path_gives_the_records_of_the_in_process_path(tmp_path):
  one, two = tmp_path / "inproc", tmp_path / "beam"
  for d in (one, two):
    _build_base(d)
  kw = dict(top_k=2, score_threshold=0.3, tag_vocab_size=6)
  god_tfds.build(BASE, data_dir=str(one), **kw)
  god_tfds.build(BASE, data_dir=str(two), **kw,
                 beam_options="--runner=DirectRunner --direct_num_workers=1")
  _check_against_direct(str(two), top_k=2, threshold=0.3, objects_of=_own_objects)
  for name in ("tag_vocab.txt",):
    assert (open(os.path.join(god_tfds.god_dir(BASE, str(one)), name)).read()
            == open(os.path.join(god_tfds.god_dir(BASE, str(two)), name)).read())
  for split in ("train", "validation", "test"):
    a = god_tfds.load_source(BASE, split, str(one))
    b = god_tfds.load_source(BASE, split, str(two))
    np.testing.assert_array_equal(a.regions, b.regions)
    assert len(a) == len(b)
    for i in range(len(a)):
      ra, rb = a[i], b[i]
      assert ra["image_id"] == rb["image_id"]
      for xa, xb in zip(ra["regions"], rb["regions"]):
        for key in ("views", "view_distance", "tag_ids", "bbox"):
          np.testing.assert_array_equal(xa[key], xb[key])


@pytest.mark.skipif(_HAS_BEAM, reason="checks the error raised when apache_beam is missing")
def test_beam_options_without_beam_is_a_clear_error(base_dir):
  with pytest.raises(RuntimeError, match=r"god_beam_options is set but apache_beam is not installed"):
    god_tfds.build(BASE, data_dir=base_dir, top_k=1, score_threshold=0.0, tag_vocab_size=6,
                   beam_options="--runner=DirectRunner")
