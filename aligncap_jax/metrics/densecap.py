"""DenseCap mAP: the dense-captioning metric of Johnson et al. (CVPR 2016).

The protocol of jcjohnson/densecap `eval/eval_utils.lua` (`DenseCaptioningEvaluator`
and `box_utils.merge_boxes`), step by step:

1. Per image, ground-truth boxes are merged greedily: the box that overlaps the
   most others at IoU >= 0.7 (itself included; first on ties) takes all of
   them into one group, which leaves the pool; repeat until no box is left. A
   group becomes one box (the mean of its boxes) whose references are all its
   captions. The number of positives is the number of merged boxes.
2. Per image, detections in descending score take their best-IoU merged box
   (the first of equal IoUs; none when nothing overlaps). The first detection
   to take a box marks it used, whatever its caption; a later detection whose
   best box is used cannot be a true positive.
3. One METEOR 1.5 score per detection against its box's references.
4. Over all images, sorted by score: a detection is a true positive at
   (IoU t, METEOR m) iff its box was free, IoU >= t and METEOR > m. AP is the
   mean over recall levels 0, 0.01, ..., 0.99 of the best precision at recall
   >= that level. `map` is the mean AP over the IoU x METEOR grid; `detmap`
   drops the METEOR condition and averages over IoU thresholds.

Where this differs from the Lua code, on purpose:
- METEOR thresholds: the Lua code's `map` grid is (0.05, ..., 0.25); the
  Python ports in GRiT and the ControlCap/DynRefer code add 0
  (`min_scores = [-1, 0, 0.05, ...]`), which is this module's default; pass
  `meteor_thresholds=LUA_METEOR_THRESHOLDS` for the original grid.
- Recall levels are exact hundredths (`100 * tp >= k * npos` in integers). The
  Lua loop `for t=0,1,0.01` accumulates the step in floating point, so most of
  its levels lie a hair above k/100 and a recall of exactly k/100 (1/2 with two
  positives) misses level k there.
- A detection that overlaps no merged box takes none. In both the Lua code and
  its Python ports the "no box" index -1 wraps to the last merged box, which
  such a detection then marks used (and an image without ground truth
  crashes); that side effect is not reproduced.
- METEOR is computed only where it can matter (a free box at IoU >= the
  lowest threshold); every other detection is a false positive at every grid
  point whatever its METEOR.

IoU: by default the reference's +1-pixel convention (`w = x2 - x1 + 1`, boxes
touching or overlapping by less than a pixel still intersect), as in
`eval_utils.lua`; `iou_convention="continuous"` is the plain area ratio that
the Python ports compute with torchvision's `box_iou`.

METEOR is pycocoevalcap's METEOR 1.5 jar (`-l en -norm`), one JVM for the whole
evaluation, fed in batches (`MeteorScorer`); any callable
`(candidates, references) -> scores` can stand in for it.
"""
from __future__ import annotations

from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np

IOU_THRESHOLDS = (0.3, 0.4, 0.5, 0.6, 0.7)
METEOR_THRESHOLDS = (0.0, 0.05, 0.1, 0.15, 0.2, 0.25)
LUA_METEOR_THRESHOLDS = (0.05, 0.1, 0.15, 0.2, 0.25)
MERGE_IOU = 0.7
IOU_CONVENTIONS = ("plus_one", "continuous")
RECALL_LEVELS = 100

MeteorFn = Callable[[Sequence[str], Sequence[Sequence[str]]], Sequence[float]]


# ------------------------------------------------------------------ boxes


def pairwise_iou(a: np.ndarray, b: np.ndarray, convention: str = "plus_one") -> np.ndarray:
  """IoU of every box in `a` with every box in `b`.

  Args:
    a: float[N, 4] boxes x1, y1, x2, y2.
    b: float[M, 4].
    convention: "plus_one" (pixel-inclusive sides, `x2 - x1 + 1`, as the
      reference) or "continuous" (`x2 - x1`).

  Returns:
    float64[N, M]; 0 where the boxes do not intersect or the union is empty.
  """
  if convention not in IOU_CONVENTIONS:
    raise ValueError(f"iou_convention must be one of {IOU_CONVENTIONS}, got {convention!r}")
  one = 1.0 if convention == "plus_one" else 0.0
  a = np.asarray(a, np.float64).reshape(-1, 4)
  b = np.asarray(b, np.float64).reshape(-1, 4)
  iw = np.minimum(a[:, None, 2], b[None, :, 2]) - np.maximum(a[:, None, 0], b[None, :, 0]) + one
  ih = np.minimum(a[:, None, 3], b[None, :, 3]) - np.maximum(a[:, None, 1], b[None, :, 1]) + one
  inter = np.where((iw > 0) & (ih > 0), iw * ih, 0.0)
  area_a = (a[:, 2] - a[:, 0] + one) * (a[:, 3] - a[:, 1] + one)
  area_b = (b[:, 2] - b[:, 0] + one) * (b[:, 3] - b[:, 1] + one)
  union = area_a[:, None] + area_b[None, :] - inter
  with np.errstate(divide="ignore", invalid="ignore"):
    return np.where(inter > 0, inter / np.where(union > 0, union, 1.0), 0.0)


def merge_groups(boxes: np.ndarray, threshold: float = MERGE_IOU,
                 convention: str = "plus_one") -> list[np.ndarray]:
  """`box_utils.merge_boxes`: greedy groups of boxes overlapping at IoU >= threshold.

  Args:
    boxes: float[N, 4] ground-truth boxes of one image.
    threshold: merge IoU (0.7 in the protocol).
    convention: IoU convention (see `pairwise_iou`).

  Returns:
    Index arrays (ascending), one per group, in the order they were formed:
    each time, the remaining box with the most remaining boxes at IoU >=
    threshold (counting itself; the first on ties) takes all of those.
  """
  if not threshold > 0:
    raise ValueError(f"merge threshold must be > 0, got {threshold}")
  d = pairwise_iou(boxes, boxes, convention)
  np.fill_diagonal(d, 1.0)
  good = d >= threshold
  groups = []
  while True:
    counts = good.sum(axis=0)
    top = int(np.argmax(counts)) if counts.size else 0
    if not counts.size or counts[top] == 0:
      return groups
    members = np.flatnonzero(good[top])
    groups.append(members)
    good[members, :] = False
    good[:, members] = False


# ------------------------------------------------------------------ inputs


def _box(value: Any, where: str) -> list[float]:
  try:
    box = [float(v) for v in value]
  except (TypeError, ValueError):
    box = []
  if len(box) != 4 or not all(np.isfinite(box)) or box[2] < box[0] or box[3] < box[1]:
    raise ValueError(f"{where}: 'bbox' must be 4 finite numbers x1, y1, x2, y2 with "
                     f"x2 >= x1 and y2 >= y1, got {value!r}")
  return box


def _field(entry: Mapping, key: str, where: str) -> Any:
  if not isinstance(entry, Mapping) or key not in entry:
    raise ValueError(f"{where}: needs '{key}' (image_id, bbox [x1, y1, x2, y2], caption"
                     f"{', score' if where.startswith('detections') else ''}), got {entry!r}")
  return entry[key]


def _caption(entry: Mapping, where: str) -> str:
  text = _field(entry, "caption", where)
  if not isinstance(text, str):
    raise ValueError(f"{where}: 'caption' must be a string, got {text!r}")
  return text


def _group_by_image(entries: Sequence[Mapping], name: str, with_score: bool
                    ) -> dict[Any, dict[str, Any]]:
  """{image_id: {"boxes" float[n, 4], "captions" [str], "scores" float[n]}}, input order."""
  out: dict[Any, dict[str, list]] = {}
  for i, e in enumerate(entries):
    where = f"{name}[{i}]"
    image = _field(e, "image_id", where)
    box = _box(_field(e, "bbox", where), where)
    caption = _caption(e, where)
    g = out.setdefault(image, {"boxes": [], "captions": [], "scores": []})
    g["boxes"].append(box)
    g["captions"].append(caption)
    if with_score:
      score = _field(e, "score", where)
      try:
        score = float(score)
      except (TypeError, ValueError):
        score = float("nan")
      if not np.isfinite(score):
        raise ValueError(f"{where}: 'score' must be a finite number, got {e['score']!r}")
      g["scores"].append(score)
  return {k: {"boxes": np.asarray(v["boxes"], np.float64).reshape(-1, 4),
              "captions": v["captions"], "scores": np.asarray(v["scores"], np.float64)}
          for k, v in out.items()}


# ------------------------------------------------------------------ METEOR


def _clean(text: str) -> str:
  """One line for the METEOR jar's stdio protocol ('|||' separates fields)."""
  return " ".join(text.replace("|||", " ").split())


class MeteorScorer:
  """METEOR 1.5 through pycocoevalcap's jar: one JVM, reused for every call.

  `scorer(candidates, references) -> float64[N]`, one score per candidate
  against its list of references, sent to the JVM `batch_size` at a time;
  `scorer.corpus_score(gts, res)` is pycocoevalcap's corpus-level score of
  tokenised captions. Use as a context manager or call `close()`; the JVM is
  started on the first call, and again if it has exited. A call that fails
  closes the JVM (the next call starts a fresh one) and raises.
  """

  def __init__(self, batch_size: int = 20000):
    self.batch_size = batch_size
    self._meteor = None

  def _compute(self, gts: dict, res: dict):
    """pycocoevalcap's `compute_score(gts, res)` on this scorer's JVM."""
    if self._meteor is not None and self._meteor.meteor_p.poll() is not None:
      self.close()
    if self._meteor is None:
      from pycocoevalcap.meteor.meteor import Meteor  # pylint: disable=g-import-not-at-top
      self._meteor = Meteor()
    try:
      return self._meteor.compute_score(gts, res)
    except Exception:
      if self._meteor.lock.locked():   # compute_score does not release it on errors
        self._meteor.lock.release()
      self.close()
      raise

  def corpus_score(self, gts: dict[int, list[str]], res: dict[int, list[str]]) -> float:
    """Corpus METEOR of tokenised captions ({id: [caption]} each), as pycocoevalcap."""
    return self._compute(gts, res)[0]

  def __call__(self, candidates: Sequence[str],
               references: Sequence[Sequence[str]]) -> np.ndarray:
    if len(candidates) != len(references):
      raise ValueError(f"{len(candidates)} candidates for {len(references)} reference lists")
    out = np.zeros((len(candidates),), np.float64)
    if not candidates:
      return out
    for lo in range(0, len(candidates), self.batch_size):
      hi = min(lo + self.batch_size, len(candidates))
      res = {i: [_clean(candidates[i])] for i in range(lo, hi)}
      gts = {i: [_clean(r) for r in references[i]] for i in range(lo, hi)}
      _, scores = self._compute(gts, res)
      out[lo:hi] = scores
    return out

  def close(self) -> None:
    if self._meteor is not None:
      p = self._meteor.meteor_p
      p.stdin.close()
      p.kill()
      p.wait()
      for stream in (p.stdout, p.stderr):
        stream.close()
      self._meteor = None

  def __enter__(self) -> MeteorScorer:
    return self

  def __exit__(self, *exc) -> None:
    self.close()


# ------------------------------------------------------------------ matching and AP


def match_image(det_boxes: np.ndarray, det_scores: np.ndarray, merged_boxes: np.ndarray,
                convention: str = "plus_one") -> dict[str, np.ndarray]:
  """Step 2 for one image: each detection's box, IoU and whether it took the box first.

  Args:
    det_boxes: float[D, 4].
    det_scores: float[D].
    merged_boxes: float[K, 4] merged ground truth.
    convention: IoU convention.

  Returns:
    In descending score order (stable): "order" int[D] (indices into the
    inputs), "box" int[D] (merged box index, -1 for none), "iou" float[D]
    (0 without a box), "free" bool[D] (took a box nobody had taken).
  """
  order = np.argsort(-det_scores, kind="stable")
  n = len(order)
  if n == 0 or len(merged_boxes) == 0:
    return {"order": order, "box": np.full((n,), -1), "iou": np.zeros((n,)),
            "free": np.zeros((n,), bool)}
  iou = pairwise_iou(det_boxes[order], merged_boxes, convention)
  best = np.argmax(iou, axis=1)
  best_iou = iou[np.arange(n), best]
  has_box = best_iou > 0
  best = np.where(has_box, best, -1)
  free = np.zeros((n,), bool)
  taken = np.flatnonzero(has_box)
  _, first = np.unique(best[taken], return_index=True)
  free[taken[first]] = True
  return {"order": order, "box": best, "iou": np.where(has_box, best_iou, 0.0), "free": free}


def average_precision(tp: np.ndarray, num_positives: int) -> float:
  """100-point interpolated AP of a ranked list.

  Args:
    tp: bool[N], true positive flags in descending score order.
    num_positives: positives in the ground truth (> 0).

  Returns:
    mean over k = 0..99 of max{precision@i : recall@i >= k/100} (0 when no
    rank reaches that recall), recall compared exactly (`100 tp >= k npos`).
  """
  tp = np.asarray(tp, bool)
  if tp.size == 0:
    return 0.0
  hits = np.cumsum(tp, dtype=np.int64)
  precision = hits / np.arange(1, tp.size + 1)
  best_after = np.maximum.accumulate(precision[::-1])[::-1]
  levels = np.arange(RECALL_LEVELS, dtype=np.int64) * num_positives
  first = np.searchsorted(RECALL_LEVELS * hits, levels, side="left")
  reached = first < tp.size
  return float(np.where(reached, best_after[np.minimum(first, tp.size - 1)], 0.0).mean())


def _check_thresholds(values: Iterable[float], name: str) -> tuple[float, ...]:
  out = tuple(float(v) for v in values)
  if not out or not all(np.isfinite(out)):
    raise ValueError(f"{name} must be a non-empty sequence of finite numbers, got {values!r}")
  return out


def densecap_map(detections: Sequence[Mapping], ground_truth: Sequence[Mapping], *,
                 iou_thresholds: Sequence[float] = IOU_THRESHOLDS,
                 meteor_thresholds: Sequence[float] = METEOR_THRESHOLDS,
                 iou_convention: str = "plus_one",
                 meteor: MeteorFn | None = None) -> dict[str, Any]:
  """DenseCap mAP and detection mAP of captioned detections (see the module doc).

  Args:
    detections: `{"image_id", "bbox": [x1, y1, x2, y2], "caption", "score"}`
      per detection (pixel boxes).
    ground_truth: `{"image_id", "bbox": [x1, y1, x2, y2], "caption"}` per
      ground-truth region; the evaluated images are those that appear here.
    iou_thresholds: IoU thresholds t (true positive iff IoU >= t).
    meteor_thresholds: METEOR thresholds m (true positive iff METEOR > m).
    iou_convention: "plus_one" (the reference's) or "continuous".
    meteor: `(candidates, references) -> scores` callable; None starts one
      METEOR 1.5 JVM (`MeteorScorer`) for this call.

  Returns:
    {"map", "detmap": float in [0, 1], "ap": {"iou{t}_meteor{m}": AP},
     "det_ap": {"iou{t}": AP}, "iou_thresholds", "meteor_thresholds",
     "iou_convention", "num_images", "num_ground_truth" (regions),
     "num_positives" (merged boxes), "num_detections", "num_meteor_scored"}.

  Raises:
    ValueError: a malformed entry (names it), no ground truth, or a detection
      on an image without ground truth (names the image).
  """
  ious = _check_thresholds(iou_thresholds, "iou_thresholds")
  meteors = _check_thresholds(meteor_thresholds, "meteor_thresholds")
  if iou_convention not in IOU_CONVENTIONS:
    raise ValueError(f"iou_convention must be one of {IOU_CONVENTIONS}, got {iou_convention!r}")
  gt = _group_by_image(ground_truth, "ground_truth", with_score=False)
  if not gt:
    raise ValueError("no ground truth: densecap_map needs at least one ground-truth region")
  dets = _group_by_image(detections, "detections", with_score=True)
  unknown = [k for k in dets if k not in gt]
  if unknown:
    raise ValueError(f"detections on image_id {unknown[0]!r} ({len(unknown)} image(s) in all), "
                     "which has no ground-truth region")

  scores, box_iou, free, candidates, references = [], [], [], [], []
  num_positives = 0
  for image, g in gt.items():
    groups = merge_groups(g["boxes"], MERGE_IOU, iou_convention)
    merged = np.stack([g["boxes"][m].mean(axis=0) for m in groups])
    pooled = [[g["captions"][i] for i in m] for m in groups]
    num_positives += len(groups)
    d = dets.get(image)
    if d is None:
      continue
    m = match_image(d["boxes"], d["scores"], merged, iou_convention)
    scores.append(d["scores"][m["order"]])
    box_iou.append(m["iou"])
    free.append(m["free"])
    candidates.extend(d["captions"][i] for i in m["order"])
    references.extend(pooled[b] if b >= 0 else [] for b in m["box"])

  n = sum(len(s) for s in scores)
  cat = lambda parts, dtype: np.concatenate(parts) if parts else np.zeros((0,), dtype)
  scores, box_iou, free = cat(scores, np.float64), cat(box_iou, np.float64), cat(free, bool)
  # Only a free box at IoU >= the lowest threshold can be a true positive.
  need = np.flatnonzero(free & (box_iou >= min(ious)))
  meteor_scores = np.full((n,), np.nan)
  if need.size:
    scorer = MeteorScorer() if meteor is None else meteor
    try:
      got = np.asarray(scorer([candidates[i] for i in need], [references[i] for i in need]),
                       np.float64)
    finally:
      if meteor is None:
        scorer.close()
    if got.shape != need.shape:
      raise ValueError(f"the METEOR scorer returned {got.shape[0] if got.ndim else got} "
                       f"scores for {need.size} detections")
    meteor_scores[need] = got

  ranked = np.argsort(-scores, kind="stable")
  free, box_iou, meteor_scores = free[ranked], box_iou[ranked], meteor_scores[ranked]
  ap, det_ap = {}, {}
  for t in ious:
    located = free & (box_iou >= t)
    det_ap[f"iou{t:g}"] = average_precision(located, num_positives)
    for mt in meteors:
      ap[f"iou{t:g}_meteor{mt:g}"] = average_precision(
          located & (np.nan_to_num(meteor_scores, nan=-np.inf) > mt), num_positives)
  return {
      "map": float(np.mean(list(ap.values()))),
      "detmap": float(np.mean(list(det_ap.values()))),
      "ap": ap, "det_ap": det_ap,
      "iou_thresholds": list(ious), "meteor_thresholds": list(meteors),
      "iou_convention": iou_convention,
      "num_images": len(gt), "num_ground_truth": len(ground_truth),
      "num_positives": int(num_positives), "num_detections": int(n),
      "num_meteor_scored": int(need.size),
  }
