"""Evaluator contract, caption metrics, eval outputs and predict's input errors."""
from __future__ import annotations

import json
import os
import sys

import numpy as np
from PIL import Image
import pytest

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "configs"))

import fixtures_train as ft  # noqa: E402
import tiny  # noqa: E402

from aligncap_jax import evaluate as eval_lib  # noqa: E402
from aligncap_jax import predict as predict_lib  # noqa: E402
from aligncap_jax import train  # noqa: E402

LIBS = dict(model_lib=ft.FakeModelLib, pipeline_lib=ft.FakePipelineLib)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("trained"))
  c = tiny.get_config()
  c.train.total_steps = 2
  c.train.eval_every_steps = -1
  train.train_and_evaluate(c, workdir, **LIBS)
  return workdir


def test_bleu4_matches_the_formula_and_perfect_captions_score_100():
  m = eval_lib.caption_metrics([["a b c d f"]], ["a b c d e"])
  # Precisions 4/5, 3/4, 2/3, 1/2; no brevity penalty.
  assert m["Bleu_4"] == pytest.approx(100 * (0.8 * 0.75 * (2 / 3) * 0.5) ** 0.25, rel=1e-6)
  refs = [["a red circle left of a square"], ["two blue squares above a green star"]]
  perfect = eval_lib.caption_metrics(refs, [r[0] for r in refs])
  assert set(perfect) == {"Bleu_4", "METEOR", "ROUGE_L", "CIDEr"}
  assert perfect["Bleu_4"] == pytest.approx(100.0, rel=1e-6)
  assert perfect["ROUGE_L"] == pytest.approx(100.0, rel=1e-6)
  assert perfect["METEOR"] > 90
  with pytest.raises(ValueError, match="1 predictions for 2 targets"):
    eval_lib.caption_metrics(refs, ["x"])


def test_simple_tokenizer_fallback():
  assert eval_lib.simple_tokenize("A Red, circle!  (left)") == "a red circle left"


def test_evaluate_writes_metrics_predictions_and_grid(trained, capsys):
  c = tiny.get_config()
  metrics = eval_lib.evaluate(c, trained, **LIBS)
  out = capsys.readouterr().out
  assert "SPICE skipped" in out and "Bleu_4 |   METEOR |  ROUGE_L |    CIDEr" in out
  with open(os.path.join(trained, "eval", "metrics.json")) as f:
    saved = json.load(f)
  assert saved == pytest.approx(metrics)
  assert all(0.0 <= v <= 1000.0 for v in saved.values())
  with open(os.path.join(trained, "eval", "predictions.json")) as f:
    preds = json.load(f)
  targets = ft.eval_targets(c, "test", c.train.eval_max_examples)
  # 7 regions in batches of 4 x 8 devices: one padded batch, masked, none dropped.
  assert len(preds) == len(targets) == 7
  for p, t in zip(preds, targets):
    assert set(p) == {"image_id", "region_id", "box", "caption", "score", "references"}
    assert (p["image_id"], p["region_id"], p["references"]) == (
        t["image_id"], t["region_id"], t["references"])
    assert p["caption"] and 0.0 < p["score"] <= 1.0
  img = Image.open(os.path.join(trained, "eval", "examples.png"))
  assert img.size[0] > 100 and img.size[1] > 100


def test_evaluator_contract_returns_the_metrics_of_its_predictions(trained):
  c = tiny.get_config()
  mesh, assets, model, params, step = eval_lib.load_for_inference(c, trained, "eval", **LIBS)
  assert step == 2
  ev = eval_lib.Evaluator(c, model, assets, mesh, **LIBS)
  decoded = ev.decode(params, ev._encode(params, assets.tag_clip_tokens, assets.tag_clip_mask))
  targets = ft.eval_targets(c, "test", c.train.eval_max_examples)
  want = eval_lib.caption_metrics([t["references"] for t in targets],
                                  [d["caption"] for d in decoded])
  assert ev.run(params) == pytest.approx(want)


def _png(path, size=(80, 60)):
  Image.fromarray(np.full((size[1], size[0], 3), 120, np.uint8)).save(path)
  return str(path)


def test_predict_prints_one_caption_per_box(trained, tmp_path, capsys):
  image = _png(tmp_path / "a.png")
  out = predict_lib.predict(tiny.get_config(), trained, image,
                            [(10, 10, 60, 50), (0, 0, 100, 30), (5, 5, 9, 9)], **LIBS)
  printed = capsys.readouterr().out
  assert len(out) == 3 and all(r["caption"] for r in out)
  assert out[1]["box"] == [0.0, 0.0, 80.0, 30.0]
  assert "clipped to the 80x60 image -> 0,0,80,30" in printed
  assert "no --detections given" in printed
  for r in out:
    assert f"[{','.join(f'{v:g}' for v in r['box'])}] {r['caption']}" in printed


@pytest.mark.parametrize("box, message", [
    ((10, 10, 10, 40), "zero or negative area"),
    ((30, 10, 20, 40), "x2 > x1"),
    ((100, 70, 120, 90), "lies outside the 80x60 image"),
])
def test_predict_rejects_bad_boxes(trained, tmp_path, box, message):
  with pytest.raises(ValueError, match=message):
    predict_lib.predict(tiny.get_config(), trained, _png(tmp_path / "a.png"), [box], **LIBS)


def test_predict_input_errors(trained, tmp_path):
  c = tiny.get_config()
  with pytest.raises(FileNotFoundError, match="--image .*missing.png: file not found"):
    predict_lib.predict(c, trained, str(tmp_path / "missing.png"), [(0, 0, 5, 5)], **LIBS)
  bad = tmp_path / "corrupt.jpg"
  bad.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
  with pytest.raises(ValueError, match="corrupt.jpg: not a readable image"):
    predict_lib.predict(c, trained, str(bad), [(0, 0, 5, 5)], **LIBS)
  with pytest.raises(ValueError, match="--box '1,2,3': expected four numbers"):
    predict_lib.parse_box("1,2,3")
  assert predict_lib.parse_box("1, 2,3.5,4") == (1.0, 2.0, 3.5, 4.0)
  empty = tmp_path / "empty"
  empty.mkdir()
  with pytest.raises(FileNotFoundError, match="--mode predict needs a trained checkpoint"):
    predict_lib.predict(c, str(empty), _png(tmp_path / "a.png"), [(0, 0, 5, 5)], **LIBS)


def test_view_strip_puts_views_side_by_side_and_clips_the_target_box_to_each():
  rs = np.random.RandomState(0)
  views = rs.randint(0, 256, (3, 10, 10, 3)).astype(np.uint8)
  boxes = np.array([[2, 3, 8, 9],        # inside the target view
                    [-4, 6, 3, 14],      # partly outside: clipped to the view
                    [11, 2, 15, 5]],     # outside (an object crop of a neighbour)
                   np.float32)
  strip, rects = eval_lib.view_strip(views, boxes, gap=2)
  assert strip.shape == (10, 3 * 10 + 2 * 2, 3) and strip.dtype == np.uint8
  for k in range(3):
    np.testing.assert_array_equal(strip[:, 12 * k:12 * k + 10], views[k])
  assert (strip[:, 10:12] == 255).all() and (strip[:, 22:24] == 255).all()
  assert rects == [(2.0, 3.0, 8.0, 9.0), (12.0, 6.0, 15.0, 10.0), None]
  # Float views in [0, 1] become the same uint8 picture.
  strip_f, _ = eval_lib.view_strip(views / 255.0, boxes, gap=2)
  np.testing.assert_array_equal(strip_f, strip)
