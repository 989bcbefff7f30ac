"""DenseCap mAP at Visual Genome test size: 5,000 images x 50 detections.

  python benchmarks/densecap.py                   # 5,000 images, ~45 regions and 50 detections each
  python benchmarks/densecap.py --images 500      # quicker

Builds a VG-sized problem (ground-truth regions with some near-duplicates to
merge, VG-like phrases, detections jittered around the regions plus strays,
half of them with a reference caption) and times, in one run:

- matching + AP grid: `densecap_map` with an instant METEOR stand-in
  (median of `--repeats` runs);
- METEOR: the real METEOR 1.5 jar (one JVM) on exactly the detections that
  `densecap_map` sends it, start-up included;
- the whole evaluation: `densecap_map` with the real jar, as `--mode eval`
  runs it.

The target (issue 17) is under 5 minutes on 2 CPU cores for the whole evaluation.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from aligncap_jax.metrics import densecap as dc  # noqa: E402

WORDS = ("man woman boy girl dog cat horse car bus truck tree building window door sign "
         "street sidewalk grass sky cloud shirt jacket hat table chair plate cup bottle "
         "white black red blue green brown yellow large small tall wooden metal glass "
         "standing sitting walking parked holding wearing hanging").split()
BUDGET_S = 300.0


def _phrase(rng: np.random.Generator) -> str:
  n = int(rng.integers(2, 8))
  return " ".join(WORDS[i] for i in rng.integers(0, len(WORDS), n))


def make_problem(num_images: int, detections_per_image: int, regions_per_image: int,
                 seed: int = 0) -> tuple[list[dict], list[dict]]:
  """(detections, ground_truth) in `densecap_map`'s format, VG-like sizes."""
  rng = np.random.default_rng(seed)
  truth, dets = [], []
  for image in range(num_images):
    w, h = 800.0, 600.0
    n = max(1, int(rng.poisson(regions_per_image)))
    xy = rng.uniform(0, [w - 40, h - 40], (n, 2))
    wh = rng.uniform(20, 300, (n, 2))
    boxes = np.concatenate([xy, np.minimum(xy + wh, [w, h])], 1)
    dup = rng.random(n) < 0.25        # near-duplicate regions (merged at IoU 0.7)
    src = rng.integers(0, n, n)
    boxes[dup] = boxes[src[dup]] + rng.normal(0, 3, (int(dup.sum()), 4))
    boxes[:, 2:] = np.maximum(boxes[:, 2:], boxes[:, :2] + 1)
    captions = [_phrase(rng) for _ in range(n)]
    truth.extend({"image_id": image, "bbox": b.tolist(), "caption": c}
                 for b, c in zip(boxes, captions))
    pick = rng.integers(0, n, detections_per_image)
    noise = rng.normal(0, 0.1, (detections_per_image, 4)) * np.tile(
        boxes[pick, 2:] - boxes[pick, :2], 2)
    det_boxes = boxes[pick] + noise
    stray = rng.random(detections_per_image) < 0.2
    det_boxes[stray] = np.concatenate([rng.uniform(0, 700, (int(stray.sum()), 2)),
                                       rng.uniform(700, 800, (int(stray.sum()), 2))], 1)
    det_boxes = np.concatenate([det_boxes[:, :2], np.maximum(det_boxes[:, 2:],
                                                             det_boxes[:, :2] + 1)], 1)
    right = rng.random(detections_per_image) < 0.5
    for k in range(detections_per_image):
      dets.append({"image_id": image, "bbox": det_boxes[k].tolist(),
                   "caption": captions[pick[k]] if right[k] else _phrase(rng),
                   "score": float(rng.random())})
  return dets, truth


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--images", type=int, default=5000)
  ap.add_argument("--detections", type=int, default=50, help="per image")
  ap.add_argument("--regions", type=int, default=45, help="mean ground-truth regions per image")
  ap.add_argument("--repeats", type=int, default=3, help="matching-only runs (median)")
  args = ap.parse_args()

  t0 = time.perf_counter()
  dets, truth = make_problem(args.images, args.detections, args.regions)
  print(f"problem: {args.images} images, {len(dets)} detections, {len(truth)} ground-truth "
        f"regions (built in {time.perf_counter() - t0:.1f} s); {os.cpu_count()} CPU cores")

  sent: list[tuple[list[str], list[list[str]]]] = []

  def instant(cands, refs):
    sent.append((list(cands), [list(r) for r in refs]))
    return np.ones((len(cands),))

  match_s = []
  for _ in range(args.repeats):
    sent.clear()
    t = time.perf_counter()
    r = dc.densecap_map(dets, truth, meteor=instant)
    match_s.append(time.perf_counter() - t)
  cands, refs = sent[0]

  t = time.perf_counter()
  with dc.MeteorScorer() as scorer:
    scorer(cands, refs)
  meteor_s = time.perf_counter() - t

  t = time.perf_counter()
  full = dc.densecap_map(dets, truth)
  total_s = time.perf_counter() - t

  print(f"positives (merged boxes): {r['num_positives']}; detections sent to METEOR: "
        f"{len(cands)} of {len(dets)}")
  print("| part | seconds |")
  print("|---|---|")
  print(f"| matching + AP grid (median of {args.repeats}: "
        f"{', '.join(f'{s:.1f}' for s in match_s)}) | {statistics.median(match_s):.1f} |")
  print(f"| METEOR 1.5, one JVM, {len(cands)} captions (start-up included) | {meteor_s:.1f} |")
  print(f"| whole `densecap_map` with the real jar | {total_s:.1f} |")
  print(f"map {full['map']:.4f}, detmap {full['detmap']:.4f}; target: whole evaluation "
        f"< {BUDGET_S:.0f} s: {'met' if total_s < BUDGET_S else 'NOT met'}")


if __name__ == "__main__":
  main()
