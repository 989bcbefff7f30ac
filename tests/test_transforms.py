"""Box clipping, view cropping and the target box in view pixels, checked by hand."""
from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from aligncap_jax.data import transforms


def test_clip_box():
  np.testing.assert_array_equal(transforms.clip_box([10, 20, 30, 40], 100, 50), [10, 20, 30, 40])
  np.testing.assert_array_equal(transforms.clip_box([-5, 10, 120, 60], 100, 50), [0, 10, 100, 50])
  assert transforms.clip_box([110, 10, 130, 20], 100, 50) is None   # wholly outside
  assert transforms.clip_box([10, 10, 10, 20], 100, 50) is None     # zero width
  assert transforms.clip_box([10, 30, 20, 20], 100, 50) is None     # inverted
  assert transforms.clip_box([0, 0, np.nan, 5], 100, 50) is None


def test_box_in_views_by_hand():
  # View (10, 20)-(50, 100) is 40 x 80 pixels; with S = 20 the scales are 0.5 and 0.25.
  # Target (20, 40)-(30, 60) -> ((20-10)*0.5, (40-20)*0.25, (30-10)*0.5, (60-20)*0.25).
  views = np.array([[20, 40, 30, 60], [10, 20, 50, 100]], np.float32)
  got = transforms.box_in_views([20, 40, 30, 60], views, 20)
  np.testing.assert_allclose(got, [[0, 0, 20, 20], [5, 5, 10, 10]])
  with pytest.raises(ValueError, match="positive area"):
    transforms.box_in_views([0, 0, 1, 1], [[5, 5, 5, 9]], 8)


def test_crop_resize_maps_box_to_view():
  # A white square at (20, 40)-(30, 60) on black: in the view of (10, 20)-(50, 100) at
  # S = 40 (scales 1 and 0.5) it must land at (10, 10)-(20, 20).
  img = np.zeros((120, 80, 3), np.uint8)
  img[40:60, 20:30] = 255
  view = transforms.crop_resize(img, [10, 20, 50, 100], 40)
  assert view.shape == (40, 40, 3) and view.dtype == np.uint8
  assert view[12:18, 12:18].min() > 240
  assert view[:8].max() < 20 and view[22:].max() < 20
  assert view[:, :8].max() < 20 and view[:, 22:].max() < 20
  box = transforms.box_in_views([20, 40, 30, 60], [[10, 20, 50, 100]], 40)[0]
  np.testing.assert_allclose(box, [10, 10, 20, 20])
  with pytest.raises(ValueError, match="no area"):
    transforms.crop_resize(img, [90, 10, 100, 20], 8)


def test_crop_views_stacks_and_matches_single_crops():
  rng = np.random.default_rng(0)
  img = rng.integers(0, 256, (50, 60, 3), dtype=np.uint8)
  views = np.array([[5, 5, 25, 30], [0, 0, 60, 50], [5, 5, 25, 30]], np.float32)
  out = transforms.crop_views(img, views, 16)
  assert out.shape == (3, 16, 16, 3)
  np.testing.assert_array_equal(out[0], transforms.crop_resize(img, views[0], 16))
  np.testing.assert_array_equal(out[0], out[2])
  # The full-image view equals a plain bicubic resize.
  ref = np.asarray(Image.fromarray(img).resize((16, 16), Image.Resampling.BICUBIC))
  np.testing.assert_array_equal(out[1], ref)


@pytest.mark.parametrize("mode", ["L", "RGBA", "RGB", "P"])
def test_decode_image_modes(mode):
  img = Image.new(mode, (7, 5))
  buf = io.BytesIO()
  img.save(buf, format="PNG")
  arr = transforms.decode_image(buf.getvalue(), name="x.png")
  assert arr.shape == (5, 7, 3) and arr.dtype == np.uint8


def test_decode_image_arrays_and_rgba_composite():
  grey = np.full((4, 6), 9, np.uint8)
  np.testing.assert_array_equal(transforms.decode_image(grey, name="g"), np.full((4, 6, 3), 9))
  rgba = np.zeros((2, 2, 4), np.uint8)   # fully transparent black -> white
  np.testing.assert_array_equal(transforms.decode_image(rgba, name="a"), np.full((2, 2, 3), 255))
  with pytest.raises(ValueError, match="rec 7"):
    transforms.decode_image(np.zeros((2, 2, 3), np.float32), name="rec 7")


def test_corrupt_and_missing_files_are_named(tmp_path):
  bad = tmp_path / "broken.jpg"
  bad.write_bytes(b"\xff\xd8\xff not a jpeg")
  with pytest.raises(ValueError, match="broken.jpg"):
    transforms.load_image_file(str(bad))
  with pytest.raises(FileNotFoundError, match="nope.png"):
    transforms.load_image_file(str(tmp_path / "nope.png"))


def test_box_in_views_outside_keeps_where_the_box_lies():
  # The target (0, 0)-(10, 10) left of and above an object view (20, 20)-(40, 40),
  # S = 20 (scale 1): inside-only coordinates pin it to the corner; `outside` keeps
  # (-20, -20)-(-10, -10), clipped to [-3S, 4S].
  views = np.array([[0, 0, 10, 10], [20, 20, 40, 40], [100, 0, 102, 10]], np.float32)
  np.testing.assert_allclose(transforms.box_in_views([0, 0, 10, 10], views[:2], 20),
                             [[0, 0, 20, 20], [0, 0, 0, 0]])
  got = transforms.box_in_views([0, 0, 10, 10], views, 20, outside=True)
  np.testing.assert_allclose(got, [[0, 0, 20, 20], [-20, -20, -10, -10], [-60, 0, -60, 20]])
