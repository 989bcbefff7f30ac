"""GOD view proposals, pHash distances and slot selection (DESIGN.md section 5)."""
from __future__ import annotations

import imagehash
import numpy as np
import pytest
from PIL import Image

from aligncap_jax.data import god


def _obj(label, bbox, score=1.0):
  return {"label": label, "bbox": bbox, "score": score}


def test_paper_example_person_unions():
  target = [40, 40, 60, 60]
  people = [[0, 0, 10, 10], [90, 0, 100, 10], [0, 90, 10, 100], [90, 90, 100, 100]]
  objects = ([_obj("dog", [45, 0, 50, 5]) for _ in range(3)]
             + [_obj("person", b) for b in people]
             + [_obj("mouse", [50, 50, 70, 70]) for _ in range(2)])
  views = god.propose_views(target, objects, top_k=1, image_size=(100, 100))
  expected = [[0, 0, 60, 60], [40, 0, 100, 60], [0, 40, 60, 100], [40, 40, 100, 100]]
  np.testing.assert_array_equal(views, np.array(expected, np.float32))
  assert views.dtype == np.float32


def test_top_k_order_by_class_rank_then_input_order():
  target = [10, 10, 20, 20]
  objects = [_obj("cat", [0, 0, 1, 1]), _obj("dog", [30, 30, 31, 31]),
             _obj("dog", [0, 30, 1, 31]), _obj("cat", [30, 0, 31, 1]),
             _obj("dog", [25, 25, 26, 26])]
  views = god.propose_views(target, objects, top_k=2)
  expected = [[10, 10, 31, 31], [0, 10, 20, 31], [10, 10, 26, 26],  # dog (3)
              [0, 0, 20, 20], [10, 0, 31, 20]]                       # cat (2)
  np.testing.assert_array_equal(views, expected)


def test_ties_by_total_score_then_name():
  objs = [_obj("b", [0, 0, 1, 1], 0.5), _obj("a", [0, 0, 2, 2], 0.5),
          _obj("c", [0, 0, 3, 3], 0.9)]
  assert god.rank_classes(objs) == ["c", "a", "b"]
  views = god.propose_views([5, 5, 6, 6], objs, top_k=1)
  np.testing.assert_array_equal(views, [[0, 0, 6, 6]])
  views = god.propose_views([5, 5, 6, 6], objs[:2], top_k=1)
  np.testing.assert_array_equal(views, [[0, 0, 6, 6]])  # "a" before "b"
  views = god.propose_views([5, 5, 9, 9], [_obj("b", [0, 0, 1, 1]), _obj("a", [8, 8, 12, 12])],
                            top_k=1)
  np.testing.assert_array_equal(views, [[5, 5, 12, 12]])


def test_score_threshold_neither_counts_nor_makes_views():
  objs = [_obj("cat", [0, 0, 1, 1], 0.9), _obj("dog", [30, 30, 31, 31], 0.2),
          _obj("dog", [0, 30, 1, 31], 0.2), _obj("cat", [30, 0, 31, 1], 0.1),
          _obj("dog", [30, 30, 31, 31], 0.2)]
  # At 0.5 only one cat counts, and the 0.1 cat makes no view.
  views = god.propose_views([10, 10, 20, 20], objs, top_k=1, score_threshold=0.5)
  np.testing.assert_array_equal(views, [[0, 0, 20, 20]])
  # At 0.0 the three dogs win (the repeated dog box gives one view).
  views = god.propose_views([10, 10, 20, 20], objs, top_k=1, score_threshold=0.0)
  np.testing.assert_array_equal(views, [[10, 10, 31, 31], [0, 10, 20, 31]])


def test_no_objects_and_top_k_zero():
  assert god.propose_views([0, 0, 5, 5], [], top_k=3).shape == (0, 4)
  assert god.propose_views([0, 0, 5, 5], [_obj("a", [6, 6, 7, 7])], top_k=0).shape == (0, 4)


def test_objects_outside_image_clipped_and_equal_target_dropped():
  objs = [_obj("a", [120, 20, 150, 40]),   # right of a 100x100 image
          _obj("a", [12, 12, 14, 14]),     # inside the target: union == target
          _obj("a", [110, 10, 130, 50]),   # clips to the same box as the first
          _obj("a", [-30, -30, -10, -10])]  # above-left of the image
  views = god.propose_views([10, 10, 50, 50], objs, top_k=1, image_size=(100, 100))
  np.testing.assert_array_equal(views, [[10, 10, 100, 50], [0, 0, 50, 50]])
  # A target reaching past the image is clipped before the comparison.
  views = god.propose_views([90, 90, 130, 130], [_obj("a", [95, 95, 120, 120])],
                            top_k=1, image_size=(100, 100))
  assert views.shape == (0, 4)


def test_bad_box_names_field():
  with pytest.raises(ValueError, match=r"objects\[0\].bbox"):
    god.propose_views([0, 0, 1, 1], [_obj("a", [0, 0, 1])], top_k=1)


def _random_image(rng, h, w, kind):
  if kind == 0:
    return np.full((h, w, 3), rng.integers(0, 256), np.uint8)
  if kind == 1:
    small = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
    return np.array(Image.fromarray(small).resize((w, h), Image.Resampling.NEAREST))
  return rng.integers(0, 256, (h, w, 3), dtype=np.uint8)


def test_phash_equals_imagehash_on_random_crops():
  rng = np.random.default_rng(0)
  for i in range(60):
    h, w = rng.integers(1, 80, size=2)
    crop = Image.fromarray(_random_image(rng, h, w, i % 3))
    assert int(god.phash(crop)) == int(str(imagehash.phash(crop)), 16), i


def test_view_distances_equal_imagehash_hamming():
  rng = np.random.default_rng(1)
  image = _random_image(rng, 64, 80, 1)
  image[10:30, 20:50] = rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)
  target = [20.5, 10.2, 49.7, 29.9]
  views = np.array([[0, 0, 50, 30], [20, 10, 80, 64], [3.3, 4.6, 70.1, 60.2]], np.float32)
  dist = god.view_distances(image, target, views)
  pil = Image.fromarray(image)

  def ref_hash(box):
    x1, y1, x2, y2 = box
    window = (int(np.floor(x1)), int(np.floor(y1)), int(np.ceil(x2)), int(np.ceil(y2)))
    return imagehash.phash(pil.crop(window))

  expected = [ref_hash(target) - ref_hash(v) for v in views]
  np.testing.assert_array_equal(dist, expected)
  assert dist.dtype == np.int32
  assert god.view_distances(image, target, np.zeros((0, 4))).shape == (0,)


def test_hamming_counts_bits():
  a = np.array([0, 2**64 - 1, 0b1011], np.uint64)
  b = np.array([0, 0, 0b0110], np.uint64)
  np.testing.assert_array_equal(god.hamming(a, b), [0, 64, 3])


def test_select_views_eval_greatest_distances_ties_by_order():
  views = np.arange(20, dtype=np.float32).reshape(5, 4)
  dist = np.array([3, 9, 3, 9, 1], np.int32)
  out = god.select_views(views, dist, 3, train=False, target_box=[0, 0, 1, 1])
  np.testing.assert_array_equal(out, views[[1, 3, 0]])


def test_select_views_fills_with_target():
  views = np.arange(8, dtype=np.float32).reshape(2, 4)
  target = [1, 2, 3, 4]
  out = god.select_views(views, [5, 7], 4, train=False, target_box=target)
  np.testing.assert_array_equal(out, [views[1], views[0], target, target])
  out = god.select_views(np.zeros((0, 4)), [], 2, train=True,
                         rng=np.random.default_rng(0), target_box=target)
  np.testing.assert_array_equal(out, [target, target])
  out = god.select_views(views, [5, 7], 3, train=True, rng=np.random.default_rng(0),
                         target_box=target)
  assert sorted(map(tuple, out[:2].tolist())) == sorted(map(tuple, views.tolist()))
  np.testing.assert_array_equal(out[2], target)


def test_select_views_train_samples_without_replacement_seeded():
  views = np.arange(40, dtype=np.float32).reshape(10, 4)
  dist = np.arange(10)
  a = god.select_views(views, dist, 4, train=True, rng=np.random.default_rng(7), target_box=[0] * 4)
  b = god.select_views(views, dist, 4, train=True, rng=np.random.default_rng(7), target_box=[0] * 4)
  np.testing.assert_array_equal(a, b)
  idx = np.random.default_rng(7).choice(10, size=4, replace=False)
  np.testing.assert_array_equal(a, views[idx])
  assert len({tuple(r) for r in a.tolist()}) == 4
  seen = set()
  rng = np.random.default_rng(3)
  for _ in range(200):
    seen.update(tuple(r) for r in god.select_views(views, dist, 2, train=True, rng=rng,
                                                    target_box=[0] * 4).tolist())
  assert len(seen) == 10
  with pytest.raises(ValueError, match="rng"):
    god.select_views(views, dist, 2, train=True, target_box=[0] * 4)


def test_objects_of_views_recovers_each_union_views_object():
  target = [10, 10, 20, 20]
  objects = [{"label": "cup", "bbox": [30, 12, 40, 18], "score": 0.9},
             {"label": "cup", "bbox": [-5, 0, 5, 5], "score": 0.8},   # partly outside
             {"label": "dog", "bbox": [12, 40, 18, 50], "score": 0.7}]
  views = god.propose_views(target, objects, top_k=2, image_size=(64, 64))
  assert len(views) == 3
  got = god.objects_of_views(views, target, objects, image_size=(64, 64))
  np.testing.assert_allclose(got, [[30, 12, 40, 18], [0, 0, 5, 5], [12, 40, 18, 50]])
  # Slots filled with the target stay the target; eval's order is kept.
  slots = god.select_views(views[:1], [3], 3, train=False, target_box=target)
  np.testing.assert_allclose(god.objects_of_views(slots, target, objects, image_size=(64, 64)),
                             [[30, 12, 40, 18], target, target])
  with pytest.raises(ValueError, match="view 0 .* not the union of the target"):
    god.objects_of_views([[0, 0, 60, 60]], target, objects, image_size=(64, 64))


def test_nearest_first_orders_by_centre_distance_fillers_last():
  target = [10, 10, 20, 20]                       # centre (15, 15)
  boxes = [[40, 10, 50, 20],                      # d^2 = 900
           target,                                # filler
           [10, 22, 20, 32],                      # d^2 = 144
           [0, 0, 10, 10],                        # d^2 = 200
           [-5, 10, 5, 20]]                       # d^2 = 225
  np.testing.assert_array_equal(god.nearest_first(target, boxes), [2, 3, 4, 0, 1])
  # Ties keep slot order; no boxes is an empty order.
  np.testing.assert_array_equal(god.nearest_first(target, [[0, 10, 10, 20], [20, 10, 30, 20]]),
                                [0, 1])
  assert god.nearest_first(target, np.zeros((0, 4))).shape == (0,)


def test_drop_target_detections_drops_the_targets_own_detection():
  target = [10, 10, 20, 20]
  objects = [{"label": "cup", "bbox": [11, 10, 21, 21], "score": 0.9},   # the target, noisy
             {"label": "cup", "bbox": [30, 12, 40, 18], "score": 0.8},
             {"label": "cup", "bbox": [14, 10, 24, 20], "score": 0.7}]   # IoU 6/14 = 0.43
  views = god.propose_views(target, objects, top_k=1, image_size=(64, 64))
  assert len(views) == 3              # GOD keeps all three (no union equals the target)
  dist = np.asarray([5, 9, 7])
  kept, kd = god.drop_target_detections(views, dist, target, objects, iou=0.5,
                                        image_size=(64, 64))
  np.testing.assert_allclose(kept, views[1:])
  np.testing.assert_array_equal(kd, [9, 7])
  kept, kd = god.drop_target_detections(views, dist, target, objects, iou=0.4,
                                        image_size=(64, 64))
  np.testing.assert_allclose(kept, views[1:2])
  # 0 keeps everything (the paper's rule), as does an empty pool.
  kept, kd = god.drop_target_detections(views, dist, target, objects, iou=0.0)
  np.testing.assert_allclose(kept, views)
  kept, kd = god.drop_target_detections(np.zeros((0, 4)), [], target, objects, iou=0.5)
  assert kept.shape == (0, 4) and kd.shape == (0,)
