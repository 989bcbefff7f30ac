"""GOD (General Object Detection) views: candidate boxes, pHash distances, slots.

DESIGN.md section 5 and section 10 ("GOD"). For one target region and the
objects detected in its image:

1. objects with `score >= score_threshold` are counted per class; classes are
   ranked by count (ties: higher total score, then name) and the top `top_k`
   classes are kept;
2. every object of those classes gives the candidate `union(target, object)`,
   clipped to the image; candidates equal to the target and repeats are dropped;
   candidates are ordered by class rank, then by the objects' input order;
3. each candidate is scored by the Hamming distance between the 64-bit DCT
   perceptual hash (pHash) of the target crop and of the candidate crop;
4. `select_views` fills the model's j-1 view slots: a seeded random sample in
   training, the greatest distances in evaluation, the target box for slots left
   over.

Boxes are float pixel coordinates `[x1, y1, x2, y2]`.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import scipy.fftpack
from PIL import Image

from aligncap_jax.metrics import densecap

_HASH_SIZE = 8
_HASH_IMAGE_SIZE = 32  # hash_size * highfreq_factor, as imagehash.phash


def _box_array(box, name: str) -> np.ndarray:
  arr = np.asarray(box, dtype=np.float64).reshape(-1)
  if arr.shape != (4,) or not np.all(np.isfinite(arr)):
    raise ValueError(f"{name} must be 4 finite numbers [x1, y1, x2, y2], got {box!r}")
  return arr


def _clip(box: np.ndarray, image_size) -> np.ndarray:
  if image_size is None:
    return box
  width, height = image_size
  return np.clip(box, 0.0, [width, height, width, height])


def _unions(targets: np.ndarray, boxes: np.ndarray, image_size) -> np.ndarray:
  """float32[R, K, 4]: `union(target r, box k)`, clipped to the image."""
  unions = np.concatenate([np.minimum(targets[:, None, :2], boxes[None, :, :2]),
                           np.maximum(targets[:, None, 2:], boxes[None, :, 2:])], axis=-1)
  return _clip(unions, image_size).astype(np.float32)


def rank_classes(objects: Sequence[Mapping], *, score_threshold: float = 0.0) -> list[str]:
  """Class names of the objects scoring >= threshold, best first.

  Args:
    objects: dicts with `label` (str) and `score` (float).
    score_threshold: objects below it are ignored.

  Returns:
    Labels ranked by object count, ties by higher total score, then by name.
  """
  counts: dict[str, int] = {}
  totals: dict[str, float] = {}
  for obj in objects:
    score = float(obj["score"])
    if score < score_threshold:
      continue
    label = str(obj["label"])
    counts[label] = counts.get(label, 0) + 1
    totals[label] = totals.get(label, 0.0) + score
  return sorted(counts, key=lambda c: (-counts[c], -totals[c], c))


def propose_views(target_box, objects: Sequence[Mapping], *, top_k: int,
                  score_threshold: float = 0.0, image_size=None) -> np.ndarray:
  """Candidate context views of one target region (DESIGN.md section 5).

  Args:
    target_box: [x1, y1, x2, y2] in pixels.
    objects: dicts `{"label": str, "bbox": [x1, y1, x2, y2], "score": float}`.
    top_k: number of top-ranked classes whose objects make views (0: none).
    score_threshold: objects scoring below it neither count nor make views.
    image_size: (width, height); when given, the target and every candidate
      are clipped to `[0, width] x [0, height]`.

  Returns:
    float32[V, 4] union boxes, V >= 0, ordered by class rank then object input
    order, without repeats and without boxes equal to the (clipped) target.
  """
  target = _box_array(target_box, "target_box")
  return propose_views_batch(target[None], objects, top_k=top_k,
                             score_threshold=score_threshold, image_size=image_size)[0]


def propose_views_batch(target_boxes, objects: Sequence[Mapping], *, top_k: int,
                        score_threshold: float = 0.0, image_size=None) -> list[np.ndarray]:
  """`propose_views` of every target box of one image (the objects ranked once).

  Args:
    target_boxes: float[R, 4] pixel boxes.
    objects, top_k, score_threshold, image_size: as `propose_views`.

  Returns:
    R arrays float32[V_r, 4], each equal to `propose_views` of its target.
  """
  if top_k < 0:
    raise ValueError(f"top_k must be >= 0, got {top_k}")
  raw = np.asarray(target_boxes, np.float64)
  if raw.ndim != 2 or raw.shape[1] != 4:
    raise ValueError(f"target_boxes must be float[R, 4], got shape {list(raw.shape)}")
  bad = np.flatnonzero(~np.isfinite(raw).all(1))
  if len(bad):
    raise ValueError(f"target_boxes[{bad[0]}] must be 4 finite numbers [x1, y1, x2, y2], "
                     f"got {raw[bad[0]].tolist()!r}")
  targets = _clip(raw, image_size).astype(np.float32)
  rank = {c: i for i, c in enumerate(
      rank_classes(objects, score_threshold=score_threshold)[:top_k])}
  chosen = []
  for order, obj in enumerate(objects):
    label = str(obj["label"])
    if label in rank and float(obj["score"]) >= score_threshold:
      chosen.append((rank[label], order, _box_array(obj["bbox"], f"objects[{order}].bbox")))
  chosen.sort(key=lambda t: (t[0], t[1]))
  if not chosen:
    return [np.zeros((0, 4), np.float32) for _ in targets]
  boxes = np.stack([box for _, _, box in chosen])                       # float64[K, 4]
  unions = _unions(targets, boxes, image_size)                          # [R, K, 4]
  out = []
  for target, cands in zip(targets.tolist(), unions):
    seen, keep = {tuple(target)}, []
    for k, key in enumerate(map(tuple, cands.tolist())):
      if key not in seen:
        seen.add(key)
        keep.append(k)
    out.append(cands[keep] if keep else np.zeros((0, 4), np.float32))
  return out


def objects_of_views(views, target_box, objects: Sequence[Mapping], *,
                     image_size=None) -> np.ndarray:
  """The detected object each union view was made from (`data.context_crop="object"`).

  `propose_views` stores `union(target, object)`; this finds, for each view, the
  first object (input order) whose clipped union with the target is that view.
  Slots that hold the target box itself (too few candidates) stay the target box.

  Args:
    views: float[n, 4] union views of one target (`select_views` output).
    target_box: [x1, y1, x2, y2] pixels.
    objects: the record's detections, as for `propose_views`.
    image_size: (width, height), as for `propose_views`.

  Returns:
    float32[n, 4] object boxes, clipped to the image.

  Raises:
    ValueError: a view that is neither the target nor the union of the target
      with any of the objects (the objects are not those GOD used).
  """
  views = np.asarray(views, np.float32).reshape(-1, 4)
  target = _clip(_box_array(target_box, "target_box"), image_size).astype(np.float32)
  if not len(objects):
    boxes = np.zeros((0, 4), np.float64)
  else:
    boxes = np.stack([_box_array(o["bbox"], f"objects[{i}].bbox") for i, o in enumerate(objects)])
  unions = _unions(target[None], boxes, image_size)[0]
  clipped = _clip(boxes, image_size).astype(np.float32)
  out = views.copy()
  for i, view in enumerate(views):
    if np.allclose(view, target, atol=1e-3):
      continue
    hit = np.flatnonzero(np.all(np.abs(unions - view[None]) <= 1e-3, axis=1))
    if not len(hit):
      raise ValueError(f"view {i} {view.tolist()} is not the union of the target "
                       f"{target.tolist()} with any of the {len(boxes)} objects")
    out[i] = clipped[hit[0]]
  return out


def drop_target_detections(views, distances, target_box, objects: Sequence[Mapping], *,
                           iou: float, image_size=None):
  """Drops the candidate views made from a detection of the target itself.

  GOD drops a candidate only when its union equals the target box; a detector's
  box of the target object, a few pixels off, survives as a view of the target
  alone (`data.context_drop_iou`, a departure). A view goes when its object
  (`objects_of_views`) overlaps the target with IoU >= `iou`; `iou` <= 0 keeps all.

  Returns:
    (views float32[V', 4], distances[V']): the kept candidates, in input order.
  """
  views = np.asarray(views, np.float32).reshape(-1, 4)
  distances = np.asarray(distances).reshape(-1)
  if iou <= 0 or not len(views):
    return views, distances
  found = objects_of_views(views, target_box, objects, image_size=image_size)
  target = _clip(_box_array(target_box, "target_box"), image_size)
  keep = densecap.pairwise_iou(found, target[None], "continuous")[:, 0] < iou
  return views[keep], distances[keep]


def nearest_first(target_box, boxes) -> np.ndarray:
  """The order (int[n]) that sorts context boxes by the squared distance between
  their centre and the target's, nearest first (`data.context_order="nearest"`);
  slots holding the target box itself (fillers) go last; ties keep slot order.

  Args:
    target_box: [x1, y1, x2, y2] pixels.
    boxes: float[n, 4] the detected objects of the selected views (or the views
      themselves where the objects are unknown).
  """
  target = _box_array(target_box, "target_box").astype(np.float64)
  boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
  centre = lambda b: np.stack([b[..., 0] + b[..., 2], b[..., 1] + b[..., 3]], -1) / 2
  d = np.sum((centre(boxes) - centre(target)[None]) ** 2, axis=-1)
  filler = np.all(np.abs(boxes - target[None]) <= 1e-3, axis=1)
  return np.lexsort((d, filler)).astype(np.int32)


def _hash_bits(pixels: np.ndarray) -> np.ndarray:
  """uint64[N] pHash of float[N, 32, 32] grey images (imagehash's algorithm)."""
  # imagehash: dct(dct(pixels, axis=0), axis=1)[:8, :8]. The second transform runs
  # on the 8 rows it keeps only: each row is transformed alone, so the values are
  # the same (tested against imagehash), at a quarter of that pass's cost.
  rows = scipy.fftpack.dct(pixels, axis=1)[:, :_HASH_SIZE]
  low = scipy.fftpack.dct(rows, axis=2)[:, :, :_HASH_SIZE].reshape(len(pixels), -1)
  bits = low > np.median(low, axis=1, keepdims=True)
  packed = np.packbits(bits, axis=1)  # 8 bytes, most significant bit first
  return packed.view(">u8").reshape(-1).astype(np.uint64)


def _grey_32(image: Image.Image) -> np.ndarray:
  small = image.convert("L").resize((_HASH_IMAGE_SIZE, _HASH_IMAGE_SIZE),
                                    Image.Resampling.LANCZOS)
  return np.asarray(small)


def phash(image_crop: Image.Image) -> np.uint64:
  """64-bit DCT perceptual hash, bit-equal to `int(str(imagehash.phash(img)), 16)`.

  Args:
    image_crop: any PIL image.

  Returns:
    The hash; bit 63 is the first (top-left) DCT coefficient's bit.
  """
  return _hash_bits(_grey_32(image_crop)[None].astype(np.float64))[0]


def crop_pixels(box, width: int, height: int) -> tuple[int, int, int, int]:
  """Integer pixel window covering a float box: floor/ceil, clipped, >= 1 pixel."""
  x1, y1, x2, y2 = _box_array(box, "box")
  left = int(np.clip(np.floor(x1), 0, width - 1))
  top = int(np.clip(np.floor(y1), 0, height - 1))
  right = int(np.clip(np.ceil(x2), left + 1, width))
  bottom = int(np.clip(np.ceil(y2), top + 1, height))
  return left, top, right, bottom


def crop_windows(boxes, width: int, height: int) -> np.ndarray:
  """int64[N, 4] `crop_pixels` of each of float[N, 4] boxes."""
  boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
  bad = ~np.isfinite(boxes).all(1)
  if bad.any():
    raise ValueError(f"boxes must be finite [x1, y1, x2, y2], got {boxes[bad][0].tolist()!r}")
  left = np.clip(np.floor(boxes[:, 0]), 0, width - 1)
  top = np.clip(np.floor(boxes[:, 1]), 0, height - 1)
  right = np.clip(np.ceil(boxes[:, 2]), left + 1, width)
  bottom = np.clip(np.ceil(boxes[:, 3]), top + 1, height)
  return np.stack([left, top, right, bottom], 1).astype(np.int64)


HASH_METHODS = ("exact", "fast")


def box_hashes(image: np.ndarray, boxes, *, method: str = "exact") -> np.ndarray:
  """pHash of each box's crop of one image.

  Args:
    image: uint8[H, W, 3] (or [H, W] grey).
    boxes: float[N, 4] pixel boxes; each is cropped with `crop_pixels`.
    method: "exact": PIL crop + Lanczos resize per box, as `imagehash.phash`;
      "fast": the same 32 x 32 pixels from `phash_fast.resample_crops` (PIL's
      fixed-point arithmetic, compiled, tested bit-equal), for the GOD job.

  Returns:
    uint64[N].
  """
  if method not in HASH_METHODS:
    raise ValueError(f"pHash method must be one of {HASH_METHODS}, got {method!r}")
  image = np.asarray(image)
  if image.dtype != np.uint8 or image.ndim not in (2, 3):
    raise ValueError(f"image must be uint8[H, W, 3], got {image.dtype}{list(image.shape)}")
  grey = Image.fromarray(image).convert("L")
  height, width = image.shape[:2]
  boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
  if len(boxes) == 0:
    return np.zeros((0,), np.uint64)
  if method == "fast":
    # Imported here: numba loads in ~0.5 s, which callers of the exact path skip.
    from aligncap_jax.data import phash_fast  # pylint: disable=g-import-not-at-top
    stack = phash_fast.resample_crops(np.asarray(grey), crop_windows(boxes, width, height))
  else:
    stack = np.stack([_grey_32(grey.crop(crop_pixels(b, width, height))) for b in boxes])
  return _hash_bits(stack.astype(np.float64))


def hamming(a: np.ndarray, b: np.ndarray) -> np.ndarray:
  """int32 bit count of `a ^ b` for uint64 arrays (broadcasting)."""
  x = np.bitwise_xor(np.asarray(a, np.uint64), np.asarray(b, np.uint64))
  as_bytes = np.ascontiguousarray(x).reshape(-1, 1).view(np.uint8)
  return np.unpackbits(as_bytes, axis=1).sum(axis=1).astype(np.int32).reshape(np.shape(x))


def view_distances(image: np.ndarray, target_box, views, *,
                   method: str = "exact") -> np.ndarray:
  """pHash Hamming distance between the target crop and each view crop.

  Args:
    image: uint8[H, W, 3].
    target_box: [x1, y1, x2, y2] pixels.
    views: float[V, 4] pixel boxes (V may be 0).
    method: see `box_hashes` (both give the same hashes).

  Returns:
    int32[V] in [0, 64].
  """
  views = np.asarray(views, np.float32).reshape(-1, 4)
  if len(views) == 0:
    return np.zeros((0,), np.int32)
  hashes = box_hashes(image, np.concatenate([_box_array(target_box, "target_box")[None], views]),
                      method=method)
  return hamming(hashes[1:], hashes[0])


def select_views(views, distances, num_slots: int, *, train: bool,
                 rng: np.random.Generator | None = None, target_box) -> np.ndarray:
  """Fills the model's j-1 view slots from one region's candidates.

  Args:
    views: float[V, 4] candidates from `propose_views` (V may be 0).
    distances: int[V] from `view_distances`.
    num_slots: j - 1.
    train: training samples `min(V, num_slots)` candidates without replacement
      with `rng`; evaluation takes the greatest distances, ties by candidate
      order.
    rng: required when `train`.
    target_box: [x1, y1, x2, y2]; fills the slots left when V < num_slots.

  Returns:
    float32[num_slots, 4].
  """
  views = np.asarray(views, np.float32).reshape(-1, 4)
  distances = np.asarray(distances).reshape(-1)
  if len(distances) != len(views):
    raise ValueError(f"{len(views)} views but {len(distances)} distances")
  if num_slots < 0:
    raise ValueError(f"num_slots must be >= 0, got {num_slots}")
  take = min(len(views), num_slots)
  if train:
    if rng is None:
      raise ValueError("select_views(train=True) needs rng (a numpy Generator)")
    idx = rng.choice(len(views), size=take, replace=False) if take else np.zeros((0,), int)
  else:
    idx = np.argsort(-distances.astype(np.int64), kind="stable")[:take]
  target = _box_array(target_box, "target_box").astype(np.float32)
  fill = np.broadcast_to(target, (num_slots - take, 4))
  return np.concatenate([views[idx], fill]).astype(np.float32)
