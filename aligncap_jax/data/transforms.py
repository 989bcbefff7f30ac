"""Image and box transforms shared by the train, eval and predict paths.

Boxes are float pixel coordinates `[x1, y1, x2, y2]`, continuous, clipped to
`[0, W] x [0, H]` (DESIGN.md section 10). A view is cropped at its exact float
box and resized to `S x S` with bicubic filtering in one PIL call, so the
mapping from image pixels to view pixels is the affine map of `box_in_views`.
"""
from __future__ import annotations

import io
import os

import numpy as np
from PIL import Image


def clip_box(box, width: float, height: float) -> np.ndarray | None:
  """Clips a box to the image; None when it has zero area after clipping.

  Args:
    box: [x1, y1, x2, y2] pixels.
    width: image width.
    height: image height.

  Returns:
    float32[4] clipped box, or None (wholly outside, zero area or not finite).
  """
  b = np.asarray(box, np.float64).reshape(-1)
  if b.shape != (4,) or not np.all(np.isfinite(b)):
    return None
  c = np.clip(b, 0.0, [width, height, width, height])
  if c[2] <= c[0] or c[3] <= c[1]:
    return None
  return c.astype(np.float32)


def to_rgb(image: Image.Image) -> Image.Image:
  """RGB version of any PIL image (grey, palette, RGBA composited on white)."""
  if image.mode == "RGB":
    return image
  if image.mode in ("RGBA", "LA") or (image.mode == "P" and "transparency" in image.info):
    rgba = image.convert("RGBA")
    white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(white, rgba).convert("RGB")
  return image.convert("RGB")


def decode_image(data, *, name: str) -> np.ndarray:
  """uint8[H, W, 3] from encoded bytes (PNG/JPEG/...) or an already decoded array.

  Args:
    data: bytes, or a uint8 array [H, W], [H, W, 1], [H, W, 3] or [H, W, 4].
    name: what to call the image in errors (a file or record).

  Raises:
    ValueError: naming `name` when the image cannot be decoded.
  """
  if isinstance(data, (bytes, bytearray, memoryview)):
    try:
      with Image.open(io.BytesIO(bytes(data))) as img:
        img.load()
        return np.asarray(to_rgb(img))
    except Exception as e:  # PIL raises several types for broken data
      raise ValueError(f"{name}: cannot decode image ({e})") from e
  arr = np.asarray(data)
  if arr.dtype != np.uint8 or arr.ndim not in (2, 3) or min(arr.shape[:2]) == 0:
    raise ValueError(f"{name}: expected a uint8 [H, W, C] image, got {arr.dtype}{list(arr.shape)}")
  if arr.ndim == 2:
    arr = arr[..., None]
  if arr.shape[-1] == 1:
    return np.repeat(arr, 3, axis=-1)
  if arr.shape[-1] == 4:
    return np.asarray(to_rgb(Image.fromarray(arr, "RGBA")))
  if arr.shape[-1] != 3:
    raise ValueError(f"{name}: expected 1, 3 or 4 channels, got {arr.shape[-1]}")
  return arr


def load_image_file(path: str) -> np.ndarray:
  """uint8[H, W, 3] of an image file; a missing or corrupt file raises naming it."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f"image file not found: {path}")
  with open(path, "rb") as f:
    return decode_image(f.read(), name=f"image file {path}")


def crop_resize(image: np.ndarray, box, size: int) -> np.ndarray:
  """The float box of `image` resized to `size x size`, bicubic.

  Args:
    image: uint8[H, W, 3].
    box: [x1, y1, x2, y2] inside the image, positive area.
    size: S.

  Returns:
    uint8[S, S, 3].
  """
  h, w = image.shape[:2]
  b = clip_box(box, w, h)
  if b is None:
    raise ValueError(f"view box {list(np.asarray(box).tolist())} has no area in a {w}x{h} image")
  pil = Image.fromarray(image)
  out = pil.resize((size, size), Image.Resampling.BICUBIC, box=tuple(float(v) for v in b))
  return np.asarray(out)


def crop_views(image: np.ndarray, views, size: int) -> np.ndarray:
  """uint8[j, S, S, 3]: each of the float[j, 4] view boxes cropped and resized."""
  views = np.asarray(views, np.float32).reshape(-1, 4)
  cache: dict[tuple, np.ndarray] = {}
  out = []
  for v in views:
    key = tuple(v.tolist())
    if key not in cache:
      cache[key] = crop_resize(image, v, size)
    out.append(cache[key])
  return np.stack(out)


def box_in_views(box, views, size: int, *, outside: bool = False) -> np.ndarray:
  """The box in each view's `size x size` pixels, clipped to the view.

  Args:
    box: [x1, y1, x2, y2] image pixels (the target).
    views: float[j, 4] view boxes in image pixels.
    size: S.
    outside: keep coordinates outside the view (clipped to [-3S, 4S] instead),
      for views that need not contain the box (`data.context_crop="object"`).

  Returns:
    float32[j, 4]: `(box - view_origin) * S / view_extent`, clipped to [0, S].
  """
  box = np.asarray(box, np.float64).reshape(4)
  views = np.asarray(views, np.float64).reshape(-1, 4)
  origin = np.concatenate([views[:, :2], views[:, :2]], axis=1)
  extent = np.concatenate([views[:, 2:] - views[:, :2]] * 2, axis=1)
  if np.any(extent <= 0):
    raise ValueError(f"view boxes must have positive area, got {views.tolist()}")
  lo, hi = (-3.0 * size, 4.0 * size) if outside else (0.0, size)
  return np.clip((box[None] - origin) * size / extent, lo, hi).astype(np.float32)
