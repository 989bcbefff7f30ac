"""The GOD job's fast pHash (data.god_hash="fast") against PIL, imagehash and the exact path.

The fast path reimplements PIL's fixed-point Lanczos resize (coefficients,
horizontal pass rounded to uint8, then vertical), so every comparison here is
equality: a single differing pixel can flip a hash bit, and on VG-like records
most regions' selected views hinge on one bit (ties at the j-1 cutoff).
"""
from __future__ import annotations

import io

import imagehash
import numpy as np
import pytest
from PIL import Image, ImageFilter

from aligncap_jax import config as config_lib
from aligncap_jax.data import god, phash_fast, tags
from aligncap_jax.data.builders.god import god_builder


def _grey(rng, h, w):
  noise = Image.fromarray(rng.integers(0, 256, (h, w), dtype=np.uint8))
  blurred = np.asarray(noise.filter(ImageFilter.GaussianBlur(2)))
  out = blurred.copy()
  out[h // 3:h // 2] = np.asarray(noise)[h // 3:h // 2]  # a band of full-range noise
  out[:, :5] = 255                                        # saturated edge: clip8 at both ends
  out[:, 5:9] = 0
  return out


def _pil(grey, window):
  return np.asarray(Image.fromarray(grey).crop(tuple(int(v) for v in window))
                    .resize((32, 32), Image.Resampling.LANCZOS))


def _windows(rng, h, w, n):
  left = rng.integers(0, w, n)
  top = rng.integers(0, h, n)
  right = np.array([rng.integers(l + 1, w + 1) for l in left])
  bottom = np.array([rng.integers(t + 1, h + 1) for t in top])
  return np.stack([left, top, right, bottom], 1)


def test_resample_crops_equals_pil_resize():
  rng = np.random.default_rng(0)
  h, w = 250, 160
  grey = _grey(rng, h, w)
  special = [
      (0, 0, w, h), (3, 7, 35, 39), (3, 7, 35, 200), (0, 4, 150, 36),  # whole, 32x32, 32 wide/high
      (10, 10, 11, 11), (10, 10, 12, 30), (50, 0, 51, 250),            # 1 px, upsampling, tall
      (20, 10, 22, 240), (20, 5, 22, 100),                             # >100x taller than wide
      (40, 0, 140, 60), (40, 30, 140, 90), (40, 200, 140, 250),        # shared columns: overlap,
      (40, 30, 140, 90), (7, 0, 9, 210),                               # gap, repeat; tall pair
  ]
  windows = np.concatenate([np.array(special), _windows(rng, h, w, 60)])
  got = phash_fast.resample_crops(grey, windows)
  assert got.shape == (len(windows), 32, 32) and got.dtype == np.uint8
  for i, window in enumerate(windows):
    np.testing.assert_array_equal(got[i], _pil(grey, window), err_msg=f"window {window}")


def test_resample_crops_past_the_coefficient_table():
  """An image longer than the table's first capacity (1,024 px) regrows it."""
  rng = np.random.default_rng(1)
  grey = _grey(rng, 40, 1300)
  windows = np.array([(0, 0, 1300, 40), (100, 3, 1250, 37), (5, 0, 70, 40)])
  got = phash_fast.resample_crops(grey, windows)
  for i, window in enumerate(windows):
    np.testing.assert_array_equal(got[i], _pil(grey, window))


def test_resample_crops_rejects_bad_input():
  grey = np.zeros((10, 10), np.uint8)
  with pytest.raises(ValueError, match="inside the 10x10 image"):
    phash_fast.resample_crops(grey, [(0, 0, 11, 5)])
  with pytest.raises(ValueError, match="inside the 10x10 image"):
    phash_fast.resample_crops(grey, [(3, 0, 3, 5)])
  with pytest.raises(ValueError, match=r"uint8\[H, W\]"):
    phash_fast.resample_crops(np.zeros((10, 10, 3), np.uint8), [(0, 0, 5, 5)])


def test_crop_windows_equals_crop_pixels():
  rng = np.random.default_rng(2)
  boxes = np.concatenate([rng.uniform(-20, 120, (40, 4)),
                          [[3.0, 4.0, 3.0, 4.0], [99.5, 0, 140, 1e-3], [10, 10, 10.5, 90]]])
  got = god.crop_windows(boxes, 100, 80)
  assert got.dtype == np.int64
  np.testing.assert_array_equal(got, [god.crop_pixels(b, 100, 80) for b in boxes])
  with pytest.raises(ValueError, match="finite"):
    god.crop_windows([[0, 0, np.nan, 1]], 100, 80)


def test_box_hashes_fast_equals_exact_and_imagehash():
  rng = np.random.default_rng(3)
  image = np.stack([_grey(rng, 90, 120)] * 3, -1)
  image[..., 1] = 255 - image[..., 1]
  boxes = np.concatenate([rng.uniform(0, 120, (20, 4)), [[0, 0, 120, 90], [5.5, 6.2, 6.1, 7.9]]])
  boxes[:, 2:] = np.maximum(boxes[:, 2:], boxes[:, :2] + 0.5)
  fast = god.box_hashes(image, boxes, method="fast")
  np.testing.assert_array_equal(fast, god.box_hashes(image, boxes, method="exact"))
  pil = Image.fromarray(image)
  for b, h in zip(boxes, fast):
    ref = imagehash.phash(pil.crop(god.crop_pixels(b, 120, 90)))
    assert int(h) == int(str(ref), 16)
  with pytest.raises(ValueError, match="pHash method"):
    god.box_hashes(image, boxes, method="approximate")


def test_propose_views_batch_equals_per_target():
  rng = np.random.default_rng(4)
  objects = [{"label": "ab"[i % 2], "bbox": rng.uniform(-10, 110, 4).tolist(),
              "score": float(rng.uniform())} for i in range(12)]
  objects.append(dict(objects[0]))  # a repeated object: one view
  targets = rng.uniform(-5, 105, (15, 4)).astype(np.float32)
  targets[3] = objects[0]["bbox"]   # a candidate equal to its target is dropped
  for kw in (dict(top_k=1), dict(top_k=2, score_threshold=0.4), dict(top_k=0),
             dict(top_k=2, image_size=(100, 90))):
    got = god.propose_views_batch(targets, objects, **kw)
    assert len(got) == len(targets)
    for target, views in zip(targets, got):
      want = god.propose_views(target, objects, **kw)
      np.testing.assert_array_equal(views, want)
      assert views.dtype == np.float32 and views.shape == want.shape
  assert god.propose_views_batch(np.zeros((0, 4)), objects, top_k=1) == []
  with pytest.raises(ValueError, match=r"target_boxes\[1\]"):
    god.propose_views_batch([[0, 0, 1, 1], [0, np.inf, 1, 1]], objects, top_k=1)


def _vg_like(rng, w=240, h=180, regions=16, objects=12):
  """A small record shaped like VG's: smooth photo-like image, many overlapping boxes."""
  small = rng.integers(0, 256, (9, 12, 3), dtype=np.uint8)
  img = np.asarray(Image.fromarray(small).resize((w, h), Image.Resampling.BILINEAR))
  buf = io.BytesIO()
  Image.fromarray(img).save(buf, format="JPEG", quality=90)

  def boxes(n):
    xy = rng.uniform(0, [w - 12, h - 12], (n, 2))
    wh = rng.uniform(6, 90, (n, 2))
    return np.concatenate([xy, np.minimum(xy + wh, [w, h])], 1).astype(np.float32)

  objs = [{"label": "abc"[i % 3], "bbox": b, "score": 1.0} for i, b in enumerate(boxes(objects))]
  record = {"image": buf.getvalue(), "image_id": 7, "width": w, "height": h,
            "regions": {"id": np.arange(regions), "bbox": boxes(regions),
                        "caption": ["a red circle left of a tree"] * regions}}
  return record, objs


def test_fast_and_exact_records_select_the_same_views():
  """The agreement floor of benchmarks/god.py: 100% of regions, because the
  hashes are equal (pinned here as equal records, then equal selections)."""
  rng = np.random.default_rng(5)
  matcher = tags.TagMatcher(["circle", "tree"])
  num_slots = config_lib.base_config().data.num_views - 1
  same = total = ties = 0
  for _ in range(3):
    record, objects = _vg_like(rng)
    out = {m: god_builder.annotate_record(record, objects,
                                          god_builder.GodParams(top_k=1, hash_method=m), matcher)
           for m in ("fast", "exact")}
    for key in ("views", "view_distance", "tag_ids"):
      np.testing.assert_array_equal(out["fast"][key], out["exact"][key])
    np.testing.assert_array_equal(out["fast"]["regions"]["view_count"],
                                  out["exact"]["regions"]["view_count"])
    ends = np.cumsum(out["exact"]["regions"]["view_count"])
    for r, (end, box) in enumerate(zip(ends, record["regions"]["bbox"])):
      start = end - out["exact"]["regions"]["view_count"][r]
      picks = [god.select_views(out[m]["views"][start:end], out[m]["view_distance"][start:end],
                                num_slots, train=False, target_box=box) for m in out]
      same += int(np.array_equal(*picks))
      total += 1
      d = np.sort(out["exact"]["view_distance"][start:end])[::-1]
      ties += int(len(d) > num_slots and d[num_slots - 1] == d[num_slots])
  assert total == 48 and same == total
  assert ties > 0  # the records do exercise a tie at the cutoff


def test_god_hash_config_field_is_checked():
  config = config_lib.base_config()
  assert config.data.god_hash == "fast"
  config.data.god_hash = "approx"
  with pytest.raises(ValueError, match="data.god_hash"):
    config_lib.validate(config)


@pytest.mark.parametrize("mode", ["RGB", "L", "P", "RGBA", "LA", "CMYK"])
def test_decode_grey_is_the_grey_of_decode_rgb(mode):
  """annotate_record decodes straight to grey; the exact path's grey is RGB then "L"."""
  rng = np.random.default_rng(6)
  img = Image.fromarray(rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)).convert(mode)
  buf = io.BytesIO()
  img.save(buf, format="TIFF" if mode == "CMYK" else "PNG")
  want = np.asarray(Image.fromarray(god_builder.decode_rgb(buf.getvalue())).convert("L"))
  np.testing.assert_array_equal(god_builder.decode_grey(buf.getvalue()), want)


def test_hash_bits_equal_imagehash_on_flat_blocky_and_random_pixels():
  """`god._hash_bits` transforms only the 8 rows it keeps in its second DCT pass;
  flat and two-level crops (DCT coefficients that tie at the median) included."""
  rng = np.random.default_rng(7)
  pixels = np.concatenate([
      rng.integers(0, 256, (40, 32, 32)),
      np.broadcast_to(rng.integers(0, 256, (20, 1, 1)), (20, 32, 32)),
      (rng.integers(0, 2, (20, 4, 4)) * 255).repeat(8, 1).repeat(8, 2),
      np.clip(np.cumsum(rng.integers(-3, 4, (21, 32, 32)), 2) + 128, 0, 255),
  ]).astype(np.uint8)
  got = god._hash_bits(pixels.astype(np.float64))
  for p, h in zip(pixels, got):
    assert int(h) == int(str(imagehash.phash(Image.fromarray(p))), 16)
