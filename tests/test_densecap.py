"""DenseCap mAP: hand-computed cases, a loop-by-loop reference, the real METEOR jar."""
from __future__ import annotations

import random
import zlib

import numpy as np
import pytest

from aligncap_jax.metrics import densecap as dc


def exact_meteor(candidates, references):
  """Deterministic stand-in: 1 if the caption is one of the references, else 0."""
  return [1.0 if c in refs else 0.0 for c, refs in zip(candidates, references)]


def gt(image, box, caption):
  return {"image_id": image, "bbox": list(box), "caption": caption}


def det(image, box, caption, score):
  return {"image_id": image, "bbox": list(box), "caption": caption, "score": score}


# Plus-one convention: [0, 0, 9, 9] is 10 x 10 pixels.
A, B, C = (0, 0, 9, 9), (50, 50, 59, 59), (100, 0, 109, 9)


def test_iou_conventions():
  a, b = np.array([[0, 0, 9, 9]]), np.array([[5, 0, 14, 9], [9, 0, 18, 9], [20, 20, 30, 30]])
  # +1: 5x10 overlap of two 10x10 boxes = 50 / 150; touching at x=9 shares a pixel column.
  np.testing.assert_allclose(dc.pairwise_iou(a, b), [[50 / 150, 10 / 190, 0.0]])
  # Continuous: 4x9 overlap of two 9x9 boxes = 36 / 126; touching shares nothing.
  np.testing.assert_allclose(dc.pairwise_iou(a, b, "continuous"), [[36 / 126, 0.0, 0.0]])
  with pytest.raises(ValueError, match="iou_convention"):
    dc.pairwise_iou(a, b, "pixels")


def test_perfect_detections_score_one():
  truth = [gt(1, A, "cat"), gt(1, B, "dog"), gt(2, C, "tree")]
  dets = [det(1, A, "cat", 0.3), det(1, B, "dog", 0.9), det(2, C, "tree", 0.5)]
  r = dc.densecap_map(dets, truth, meteor=exact_meteor)
  assert r["map"] == 1.0 and r["detmap"] == 1.0
  assert len(r["ap"]) == 30 and len(r["det_ap"]) == 5
  assert (r["num_images"], r["num_positives"], r["num_detections"]) == (2, 3, 3)


def test_boxes_that_pass_only_the_lower_iou_thresholds():
  # Detection [0, 0, 9, 4] covers half of [0, 0, 9, 9]: IoU 50/100 = 0.5 exactly,
  # a true positive at t = 0.3, 0.4, 0.5 (IoU >= t) and not at 0.6, 0.7.
  r = dc.densecap_map([det(1, (0, 0, 9, 4), "cat", 1.0)], [gt(1, A, "cat")],
                      meteor=exact_meteor)
  assert r["det_ap"] == {"iou0.3": 1.0, "iou0.4": 1.0, "iou0.5": 1.0, "iou0.6": 0.0,
                         "iou0.7": 0.0}
  assert r["detmap"] == pytest.approx(3 / 5) and r["map"] == pytest.approx(3 / 5)
  assert r["ap"]["iou0.5_meteor0.25"] == 1.0 and r["ap"]["iou0.6_meteor0"] == 0.0
  # Continuous IoU of the same boxes: 9x4 / 9x9 = 0.444, passing 0.3 and 0.4 only.
  r = dc.densecap_map([det(1, (0, 0, 9, 4), "cat", 1.0)], [gt(1, A, "cat")],
                      meteor=exact_meteor, iou_convention="continuous")
  assert r["detmap"] == pytest.approx(2 / 5)


def test_perfect_boxes_with_wrong_captions():
  truth = [gt(1, A, "cat"), gt(1, B, "dog")]
  dets = [det(1, A, "car", 0.9), det(1, B, "bus", 0.8)]
  r = dc.densecap_map(dets, truth, meteor=exact_meteor)
  assert r["map"] == 0.0 and r["detmap"] == 1.0


def test_meteor_thresholds_are_strict_and_the_lua_grid_is_available():
  truth, dets = [gt(1, A, "cat")], [det(1, A, "a cat", 1.0)]
  point_twelve = lambda c, refs: [0.12] * len(c)
  # METEOR 0.12 > m for m = 0, 0.05, 0.1: 3 of the 6 default thresholds.
  assert dc.densecap_map(dets, truth, meteor=point_twelve)["map"] == pytest.approx(0.5)
  r = dc.densecap_map(dets, truth, meteor=point_twelve,
                      meteor_thresholds=dc.LUA_METEOR_THRESHOLDS)
  assert r["map"] == pytest.approx(2 / 5)
  # METEOR exactly 0 is not > 0.
  zero = lambda c, refs: [0.0] * len(c)
  assert dc.densecap_map(dets, truth, meteor=zero, meteor_thresholds=(0,))["map"] == 0.0


def test_merge_groups_takes_the_box_with_most_neighbours_not_a_closure():
  # Four 10x10 boxes shifted by one pixel: IoU 0.818 between neighbours, 0.667
  # two apart. Box 1 (first of the two with 3 neighbours) takes 0, 1, 2; 3 stays.
  boxes = np.array([[s, 0, s + 9, 9] for s in range(4)], float)
  groups = dc.merge_groups(boxes, 0.7)
  assert [g.tolist() for g in groups] == [[0, 1, 2], [3]]


def test_ground_truth_merging_pools_references_and_counts_merged_boxes():
  # [0,0,9,9] and [0,0,9,10]: IoU 100/110 >= 0.7 -> one box with both captions.
  truth = [gt(1, A, "cat"), gt(1, (0, 0, 9, 10), "kitten"), gt(1, B, "dog")]
  dets = [det(1, A, "kitten", 0.9), det(1, B, "dog", 0.8)]
  r = dc.densecap_map(dets, truth, meteor=exact_meteor)
  assert r["num_ground_truth"] == 3 and r["num_positives"] == 2
  assert r["map"] == 1.0
  # Without the merge there would be 3 positives and recall could not reach 1.
  seen = []
  dc.densecap_map(dets, truth, meteor=lambda c, refs: seen.extend(refs) or [1.0] * len(c))
  assert sorted(seen[0]) == ["cat", "kitten"] and seen[1] == ["dog"]


def test_a_wrong_caption_that_takes_the_box_first_blocks_the_right_one():
  truth = [gt(1, A, "cat")]
  wrong_first = [det(1, A, "dog", 0.9), det(1, A, "cat", 0.8)]
  r = dc.densecap_map(wrong_first, truth, meteor=exact_meteor)
  # "dog" takes the box and fails METEOR; "cat" finds it used: no true positive.
  assert r["map"] == 0.0
  # Detection-only: the first is a true positive at rank 1 (precision 1, recall 1).
  assert r["detmap"] == 1.0
  right_first = [det(1, A, "dog", 0.7), det(1, A, "cat", 0.8)]
  assert dc.densecap_map(right_first, truth, meteor=exact_meteor)["map"] == 1.0


def test_a_false_positive_between_two_true_positives():
  truth = [gt(1, A, "cat"), gt(2, B, "dog")]
  dets = [det(1, A, "cat", 0.9), det(1, C, "cat", 0.8), det(2, B, "dog", 0.7)]
  r = dc.densecap_map(dets, truth, meteor=exact_meteor)
  # Ranks: TP, FP (overlaps nothing), TP. Precision 1, 1/2, 2/3; recall 1/2, 1/2, 1.
  # Levels k/100 for k = 0..50 reach recall 1/2 (best precision 1), k = 51..99
  # need recall 1 (precision 2/3): AP = (51 * 1 + 49 * 2/3) / 100.
  expected = (51 + 49 * 2 / 3) / 100
  assert r["map"] == pytest.approx(expected, abs=1e-12)
  assert r["detmap"] == pytest.approx(expected, abs=1e-12)


def test_average_precision_edge_cases():
  assert dc.average_precision(np.zeros((0,), bool), 3) == 0.0
  assert dc.average_precision(np.array([False, False]), 3) == 0.0
  # One hit of 4 positives at rank 2: recall 1/4 reaches levels 0..25 with precision 1/2.
  assert dc.average_precision(np.array([False, True]), 4) == pytest.approx(26 * 0.5 / 100)


def test_input_errors_name_the_entry():
  truth = [gt(1, A, "cat")]
  with pytest.raises(ValueError, match=r"detections\[0\]: needs 'score'"):
    dc.densecap_map([{"image_id": 1, "bbox": list(A), "caption": "cat"}], truth,
                    meteor=exact_meteor)
  with pytest.raises(ValueError, match=r"ground_truth\[0\]: 'bbox' must be"):
    dc.densecap_map([], [gt(1, (5, 0, 1, 9), "cat")], meteor=exact_meteor)
  with pytest.raises(ValueError, match="image_id 7"):
    dc.densecap_map([det(7, A, "cat", 1.0)], truth, meteor=exact_meteor)
  with pytest.raises(ValueError, match="no ground truth"):
    dc.densecap_map([], [], meteor=exact_meteor)
  with pytest.raises(ValueError, match="returned 1 scores for 2"):
    dc.densecap_map([det(1, A, "cat", 1.0), det(1, B, "dog", 1.0)],
                    [gt(1, A, "cat"), gt(1, B, "dog")], meteor=lambda c, r: [1.0])


# ------------------------------------------------------------------ loop-by-loop reference


def _ref_iou(a, b, one):
  iw = min(a[2], b[2]) - max(a[0], b[0]) + one
  ih = min(a[3], b[3]) - max(a[1], b[1]) + one
  if iw <= 0 or ih <= 0:
    return 0.0
  ua = (a[2] - a[0] + one) * (a[3] - a[1] + one) + (b[2] - b[0] + one) * (b[3] - b[1] + one)
  return iw * ih / (ua - iw * ih)


def reference_map(detections, ground_truth, meteor, one=1.0,
                  ious=dc.IOU_THRESHOLDS, meteors=dc.METEOR_THRESHOLDS):
  """The protocol written out with plain loops, one detection at a time."""
  images = []
  for g in ground_truth:
    if g["image_id"] not in images:
      images.append(g["image_id"])
  records, npos = [], 0
  for image in images:
    boxes = [g["bbox"] for g in ground_truth if g["image_id"] == image]
    texts = [g["caption"] for g in ground_truth if g["image_id"] == image]
    n = len(boxes)
    overlap = [[1.0 if i == j else _ref_iou(boxes[i], boxes[j], one) for j in range(n)]
               for i in range(n)]
    alive = [True] * n
    merged, pooled = [], []
    while True:
      counts = [sum(1 for i in range(n) if alive[i] and alive[j] and overlap[i][j] >= 0.7)
                for j in range(n)]
      top = max(range(n), key=lambda j: (counts[j], -j))
      if counts[top] == 0:
        break
      group = [i for i in range(n) if alive[i] and overlap[top][i] >= 0.7]
      merged.append([sum(boxes[i][c] for i in group) / len(group) for c in range(4)])
      pooled.append([texts[i] for i in group])
      for i in group:
        alive[i] = False
    npos += len(merged)
    mine = [d for d in detections if d["image_id"] == image]
    mine = sorted(mine, key=lambda d: -d["score"])
    used = [False] * len(merged)
    for d in mine:
      ovmax, jmax = 0.0, -1
      for j, m in enumerate(merged):
        ov = _ref_iou(d["bbox"], m, one)
        if ov > ovmax:
          ovmax, jmax = ov, j
      ok = False
      if jmax >= 0 and not used[jmax]:
        used[jmax], ok = True, True
      refs = pooled[jmax] if jmax >= 0 else []
      score = meteor([d["caption"]], [refs])[0] if refs else 0.0
      records.append({"score": d["score"], "ov": ovmax, "ok": ok, "meteor": score})
  records.sort(key=lambda r: -r["score"])

  def ap(m_threshold, t):
    tp = fp = 0
    prec, rec = [], []
    for r in records:
      if r["ok"] and r["ov"] >= t and (m_threshold is None or r["meteor"] > m_threshold):
        tp += 1
      else:
        fp += 1
      prec.append(tp / (tp + fp))
      rec.append(tp / npos)
    total = 0.0
    for k in range(100):
      total += max([p for p, q in zip(prec, rec) if q >= k / 100], default=0.0)
    return total / 100

  grid = [ap(m, t) for t in ious for m in meteors]
  det_grid = [ap(None, t) for t in ious]
  return sum(grid) / len(grid), sum(det_grid) / len(det_grid)


def hashed_meteor(candidates, references):
  """Deterministic, spread over [0, 0.3): exercises every METEOR threshold."""
  out = []
  for c, r in zip(candidates, references):
    h = zlib.crc32("|".join([c] + sorted(r)).encode()) % 1000 / 1000
    out.append(0.3 * h if c in r else 0.1 * h)
  return out


def _random_problem(seed, num_images=12):
  rng = random.Random(seed)
  words = ["cat", "dog", "tree", "car", "man"]
  truth, dets = [], []
  for image in range(num_images):
    base = []
    for _ in range(rng.randint(1, 6)):
      x, y = rng.randint(0, 60), rng.randint(0, 60)
      box = [x, y, x + rng.randint(2, 30), y + rng.randint(2, 30)]
      if base and rng.random() < 0.4:   # a near-duplicate region, to merge
        b = rng.choice(base)
        box = [b[0] + rng.randint(-1, 1), b[1], b[2], b[3] + rng.randint(0, 2)]
      base.append(box)
      truth.append(gt(image, box, rng.choice(words)))
    if image == num_images - 1:
      continue                          # an image without detections
    for _ in range(rng.randint(0, 8)):
      b = rng.choice(base)
      jitter = [rng.uniform(-4, 4) for _ in range(4)]
      box = [b[0] + jitter[0], b[1] + jitter[1], b[2] + jitter[2], b[3] + jitter[3]]
      box = [min(box[0], box[2]), min(box[1], box[3]), max(box[0], box[2]),
             max(box[1], box[3])]
      if rng.random() < 0.15:
        box = [200, 200, 210, 210]      # overlaps nothing
      # Scores from a small set: ties across images keep the input image order.
      dets.append(det(image, box, rng.choice(words), rng.choice([0.1, 0.5, 0.7, 0.9])
                      if rng.random() < 0.3 else rng.random()))
  return dets, truth


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("convention", ["plus_one", "continuous"])
def test_agrees_with_the_loop_by_loop_reference(seed, convention):
  dets, truth = _random_problem(seed)
  got = dc.densecap_map(dets, truth, meteor=hashed_meteor, iou_convention=convention)
  want_map, want_det = reference_map(dets, truth, hashed_meteor,
                                     one=1.0 if convention == "plus_one" else 0.0)
  assert got["map"] == pytest.approx(want_map, abs=1e-12)
  assert got["detmap"] == pytest.approx(want_det, abs=1e-12)
  assert 0 < got["detmap"] < 1 and 0 < got["map"] < got["detmap"]


# ------------------------------------------------------------------ the real METEOR jar


def test_real_meteor_jar_end_to_end_in_one_jvm():
  truth = [gt(1, A, "a man riding a brown horse"), gt(2, B, "red car parked on the street")]
  dets = [det(1, A, "a man riding a brown horse", 0.9),
          det(2, B, "zebra grazing", 0.8),   # perfect box, caption sharing no word
          det(2, C, "red car", 0.7)]         # overlaps nothing
  with dc.MeteorScorer(batch_size=1) as scorer:
    r = dc.densecap_map(dets, truth, meteor=scorer)
    pid = scorer._meteor.meteor_p.pid   # pylint: disable=protected-access
    again = dc.densecap_map(dets, truth, meteor=scorer)
    assert scorer._meteor.meteor_p.pid == pid   # pylint: disable=protected-access
    scores = scorer(["a man riding a brown horse", "zebra grazing"],
                    [["a man riding a brown horse"], ["red car parked on the street"]])
  assert scorer._meteor is None   # pylint: disable=protected-access
  assert scores[0] > 0.9 and scores[1] == 0.0
  # Ranks: right caption (TP), wrong caption on a free box (FP for map, TP for
  # detmap), no overlap (FP). npos = 2.
  assert r["map"] == pytest.approx(51 / 100)             # recall 1/2 at precision 1
  assert r["detmap"] == pytest.approx(1.0)               # recall 1 at rank 2, precision 1
  assert r["num_meteor_scored"] == 2 and again == r
