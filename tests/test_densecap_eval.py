"""`--mode eval` with `eval.protocol = "densecap"`: the real pipeline on a tiny synthetic
dataset, a stand-in model (tests/fixtures_train.py), ground-truth and detected boxes."""
from __future__ import annotations

import json
import os
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "configs"))

import fixtures_train as ft  # noqa: E402
import tiny  # noqa: E402

from aligncap_jax import densecap_eval  # noqa: E402
from aligncap_jax import evaluate as eval_lib  # noqa: E402
from aligncap_jax import train  # noqa: E402
from aligncap_jax.data import pipeline  # noqa: E402
from aligncap_jax.metrics import densecap  # noqa: E402


def _config(data_dir, **eval_fields):
  c = tiny.get_config()
  c.data.data_dir = str(data_dir)
  c.data.god_top_k = 4
  c.train.eval_max_examples = 0
  c.train.total_steps = 2
  c.train.eval_every_steps = -1
  c.eval.protocol = "densecap"
  c.eval.update(eval_fields)
  return c


def any_caption_meteor(candidates, references):
  """Stand-in METEOR: every caption passes every threshold."""
  del references
  return [1.0] * len(candidates)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """A tiny synthetic dataset and a 2-step checkpoint of the stand-in model."""
  data_dir = tmp_path_factory.mktemp("tfds")
  workdir = str(tmp_path_factory.mktemp("densecap"))
  c = _config(data_dir)
  train.train_and_evaluate(c, workdir, model_lib=ft.FakeModelLib)
  return data_dir, workdir


def _load(path):
  with open(path) as f:
    return json.load(f)


def test_box_iterator_gives_a_region_box_the_region_row(trained):
  c = _config(trained[0])
  assets = pipeline.load_assets(c)
  targets = pipeline.eval_targets(c, "test")[:5]
  boxes = [{"image_id": t["image_id"], "bbox": t["box"], "score": 0.5} for t in targets]
  boxes += [{"image_id": targets[0]["image_id"], "bbox": [500, 500, 600, 600], "score": 1.0},
            {"image_id": 123456789, "bbox": [0, 0, 10, 10], "score": 1.0}]
  kept = pipeline.box_targets(c, "test", boxes)
  assert len(kept) == 5 and [k["bbox"] for k in kept] == [t["box"] for t in targets]
  stats = pipeline.stats()
  assert stats["boxes without area in their image skipped"] >= 1
  assert stats["boxes on images outside the split skipped"] >= 1
  ours = next(pipeline.make_box_iterator(c, assets, "test", kept, batch_size=8))
  theirs = next(pipeline.make_eval_iterator(c, assets, "test", batch_size=8, max_examples=5))
  # Same box, same image, same GOD objects: the same views as the stored region's.
  np.testing.assert_array_equal(ours["valid"], [1] * 5 + [0] * 3)
  np.testing.assert_array_equal(ours["views"][:5], theirs["views"][:5])
  np.testing.assert_allclose(ours["view_boxes"][:5], theirs["view_boxes"][:5], atol=1e-5)
  assert (ours["view_boxes"][:5, 1:] != ours["view_boxes"][:5, :1]).any()  # real context views
  np.testing.assert_array_equal(ours["image_id"][:5], [t["image_id"] for t in targets])
  assert not ours["caption_mask"].any() and not ours["prompt_mask"].any()
  # Without boxes: every record's own objects (the simulated detector's).
  source = pipeline._source(c, "test")  # pylint: disable=protected-access
  n_objects = sum(len(source[i]["objects"]) for i in range(len(source)))
  assert len(pipeline.box_targets(c, "test")) == n_objects > 0


def test_ground_truth_boxes_through_mode_eval_with_the_real_meteor(trained, capsys):
  data_dir, workdir = trained
  c = _config(data_dir, boxes="gt")
  result = eval_lib.evaluate(c, workdir, model_lib=ft.FakeModelLib)
  assert "DenseCap mAP, ground-truth boxes, split test" in capsys.readouterr().out
  saved = _load(os.path.join(workdir, "eval", "densecap.json"))
  assert saved == json.loads(json.dumps(result))
  assert saved["setting"] == "ground-truth boxes" and saved["score"] == "caption"
  assert set(saved["ap"]) == {f"iou{t:g}_meteor{m:g}" for t in densecap.IOU_THRESHOLDS
                              for m in densecap.METEOR_THRESHOLDS}
  targets = pipeline.eval_targets(c, "test")
  dets = _load(os.path.join(workdir, "eval", "densecap_detections.json"))
  assert [d["bbox"] for d in dets] == [t["box"] for t in targets]
  assert all(d["score"] == d["caption_score"] and 0 < d["score"] <= 1 for d in dets)
  # Each prompt box is its own region: with no regions merged, every box is found.
  assert saved["num_positives"] == len(targets) == saved["num_detections"]
  assert saved["detmap"] == 1.0 and 0.0 <= saved["map"] <= 1.0


def test_detected_boxes_from_the_simulated_detector_and_from_a_file(trained, tmp_path):
  data_dir, workdir = trained
  c = _config(data_dir, boxes="detections", detection_score="detection_x_caption")
  r = densecap_eval.evaluate(c, workdir, model_lib=ft.FakeModelLib, meteor=any_caption_meteor)
  dets = _load(os.path.join(workdir, "eval", "densecap_detections.json"))
  objects = pipeline.box_targets(c, "test")
  assert r["setting"] == "detected boxes" and len(dets) == len(objects)
  for d, o in zip(dets, objects):
    assert d["bbox"] == o["bbox"] and d["detection_score"] == pytest.approx(o["score"])
    assert d["score"] == pytest.approx(o["score"] * d["caption_score"])
  truth = densecap_eval.ground_truth(pipeline.eval_targets(c, "test"))
  assert r["map"] == pytest.approx(densecap.densecap_map(dets, truth,
                                                         meteor=any_caption_meteor)["map"])
  assert 0.0 < r["detmap"] < 1.0   # noisy boxes, misses and false positives

  # A COCO results file: one exact region box ([x, y, w, h]) and one stray box.
  t0 = pipeline.eval_targets(c, "test")[0]
  x1, y1, x2, y2 = t0["box"]
  path = tmp_path / "dets.json"
  path.write_text(json.dumps([
      {"image_id": t0["image_id"], "category_id": 1, "bbox": [x1, y1, x2 - x1, y2 - y1],
       "score": 0.9},
      {"image_id": t0["image_id"], "category_id": 1, "bbox": [0, 0, 1, 1], "score": 0.8},
      {"image_id": 424242, "category_id": 1, "bbox": [0, 0, 5, 5], "score": 0.7}]))
  c = _config(data_dir, boxes="detections", detections_file=str(path))
  r = densecap_eval.evaluate(c, workdir, model_lib=ft.FakeModelLib, meteor=any_caption_meteor)
  assert r["num_detections"] == 2 and r["boxes_from"] == str(path)
  # One true positive at rank 1 of P positives: recall 1/P at precision 1 reaches
  # levels k/100 for k <= 100/P, at every IoU threshold (the stray box is 1x1).
  p = r["num_positives"]
  assert r["detmap"] == pytest.approx((min(99, 100 // p) + 1) / 100)
  with pytest.raises(ValueError, match="entry 0 needs 'image_id'"):
    path.write_text(json.dumps([{"bbox": [0, 0, 1, 1], "score": 1}]))
    densecap_eval.read_detections(str(path))


def test_eval_config_fields_are_checked():
  from aligncap_jax import config as config_lib  # pylint: disable=g-import-not-at-top
  c = config_lib.base_config()
  assert c.eval.protocol == "captions" and c.eval.iou_convention == "plus_one"
  c.eval.boxes = "proposals"
  with pytest.raises(ValueError, match="config field 'eval.boxes'"):
    config_lib.validate(c)
