"""GOD job throughput: the fast and exact pHash side by side, 1 and 2 worker processes.

Visual-Genome-sized records (800x600, 50 regions, 35 objects: VG v1.2
averages), per-image work (`annotate_record`: decode, views, pHash distances,
tags), timed in interleaved rounds (fast, exact, fast, exact, ...; medians,
benchmarks/interleave.py):

- `data.god_hash="fast"` (PIL's Lanczos arithmetic compiled with numba) against
  `"exact"` (PIL crop + resize per box, as imagehash), one process, and the
  regions whose selected views (evaluation order: the j-1 greatest distances)
  are equal under both;
- fast with 2 worker processes (a pool started once and warmed, as the job's
  pool lives for the whole split) against 1, and the projected wall time of VG
  v1.2's 108,077 images;
- the whole build of a small synthetic dataset (`god_tfds.build`, 1 and 2
  processes, start-up included) and the views' agreement on its records.

The last line is the VG-sized figure (checks rely on it):
  god: fast F images/s, exact E images/s (R.Rx), views agree on P% of regions

  python benchmarks/god.py [--vg_records 10] [--images 300] [--rounds 5]
"""
from __future__ import annotations

import argparse
import io
import os
import shutil
import sys
import tempfile

import numpy as np
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import interleave  # noqa: E402  (benchmarks/, the script's folder)

VG_IMAGES = 108_077


def vg_like_record(rng: np.random.Generator) -> tuple[dict, list[dict]]:
  """One VG-sized base record (JPEG bytes) and its objects."""
  w, h = 800, 600
  small = rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)
  img = np.asarray(Image.fromarray(small).resize((w, h), Image.Resampling.BILINEAR))
  buf = io.BytesIO()
  Image.fromarray(img).save(buf, format="JPEG", quality=90)

  def boxes(n):
    xy = rng.uniform(0, [w - 40, h - 40], (n, 2))
    wh = rng.uniform(20, 300, (n, 2))
    return np.concatenate([xy, np.minimum(xy + wh, [w, h])], 1).astype(np.float32)

  labels = ["man", "shirt", "tree", "window", "building", "sign", "car", "hand"]
  objects = [{"label": labels[i % len(labels)], "bbox": b, "score": 1.0}
             for i, b in enumerate(boxes(35))]
  record = {"image": buf.getvalue(), "image_id": 1, "width": w, "height": h,
            "regions": {"id": np.arange(50), "bbox": boxes(50),
                        "caption": ["a man wearing a white shirt near a tree"] * 50}}
  return record, objects


def selected_views(out: dict, num_slots: int) -> list[np.ndarray]:
  """Each region's evaluation-order views (`god.select_views`) of a GOD record."""
  from aligncap_jax.data import god
  ends = np.cumsum(out["regions"]["view_count"])
  starts = ends - out["regions"]["view_count"]
  return [god.select_views(out["views"][s:e], out["view_distance"][s:e], num_slots,
                           train=False, target_box=box)
          for s, e, box in zip(starts, ends, out["regions"]["bbox"])]


def agreement(fast: list[dict], exact: list[dict], num_slots: int) -> tuple[int, int]:
  """(regions whose selected views are equal, regions) over paired GOD records."""
  same = total = 0
  for a, b in zip(fast, exact):
    for va, vb in zip(selected_views(a, num_slots), selected_views(b, num_slots)):
      same += int(np.array_equal(va, vb))
      total += 1
  return same, total


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--vg_records", type=int, default=10, help="distinct VG-sized records")
  parser.add_argument("--images", type=int, default=300, help="synthetic train images")
  parser.add_argument("--image_size", type=int, default=128)
  interleave.add_args(parser)
  args = parser.parse_args()

  import tensorflow_datasets as tfds

  from aligncap_jax import config as config_lib
  from aligncap_jax.data import god_tfds, synthetic, tags
  from aligncap_jax.data.builders.god import god_builder

  tfds.disable_progress_bar()
  num_slots = config_lib.base_config().data.num_views - 1
  rng = np.random.default_rng(0)
  items = [vg_like_record(rng) for _ in range(args.vg_records)]
  matcher = tags.TagMatcher(tags.build_vocab(items[0][0]["regions"]["caption"], 100))
  params = {m: god_builder.GodParams(top_k=1, hash_method=m) for m in ("fast", "exact")}
  runs = {m: (lambda m=m: [god_builder.annotate_record(r, o, params[m], matcher)
                           for r, o in items]) for m in params}
  vg_same, vg_total = agreement(runs["fast"](), runs["exact"](), num_slots)
  print(f"VG-sized records ({args.vg_records} x 800x600, 50 regions, 35 objects), "
        "per-image work, 1 process, fast vs exact pHash:", flush=True)
  vg = interleave.run(runs, rounds=args.rounds, warmup=args.warmup)
  print(interleave.environment(vg))
  print(interleave.table(vg, unit="images/s", work=len(items)))
  print(interleave.ratio_line(vg, "fast", "exact"))

  vocab = tags.build_vocab(items[0][0]["regions"]["caption"], 100)
  god_builder.init_worker(params["fast"], vocab)
  with god_builder.worker_pool(2, params["fast"], vocab) as pool:
    pool.map(god_builder.annotate_item, items[:2], chunksize=1)  # start and warm both workers
    procs = interleave.run({
        "1 process": lambda: list(map(god_builder.annotate_item, items)),
        "2 processes": lambda: list(pool.imap(god_builder.annotate_item, items, chunksize=1)),
    }, rounds=args.rounds, warmup=args.warmup)
  print("VG-sized records, fast pHash, 1 vs 2 worker processes (pool started once):")
  print(interleave.environment(procs))
  print(interleave.table(procs, unit="images/s", work=len(items)))
  print(interleave.ratio_line(procs, "2 processes", "1 process"))
  for name, ts in procs.items():
    hours = VG_IMAGES * interleave.stats(ts).median / len(items) / 3600
    print(f"  projected VG v1.2 ({VG_IMAGES:,} images), {name}: {hours:.2f} h")

  root = tempfile.mkdtemp(prefix="god_bench_")
  try:
    synthetic.SyntheticRegions(
        data_dir=root, file_format="array_record", num_train_images=args.images,
        num_validation_images=2, num_test_images=2, image_size=args.image_size,
        seed=0).download_and_prepare()
    total = args.images + 4

    def build(procs):
      shutil.rmtree(os.path.join(root, "synthetic_regions_god"), ignore_errors=True)
      god_tfds.build("synthetic_regions", data_dir=root, top_k=1, score_threshold=0.0,
                     tag_vocab_size=4585, num_processes=procs)

    syn = interleave.run({"1 process": lambda: build(1), "2 processes": lambda: build(2)},
                         rounds=args.rounds, warmup=args.warmup)
    base = god_builder.open_base("synthetic_regions", root)
    source = base.as_data_source("train", decoders={"image": tfds.decode.SkipDecoding()})
    records = [(rec, god_builder.objects_list(rec["objects"])) for rec in source]
    syn_vocab = tags.TagMatcher(["circle"])
    syn_same, syn_total = agreement(
        [god_builder.annotate_record(r, o, params["fast"], syn_vocab) for r, o in records],
        [god_builder.annotate_record(r, o, params["exact"], syn_vocab) for r, o in records],
        num_slots)
  finally:
    shutil.rmtree(root, ignore_errors=True)
  print(f"GOD job, synthetic ({total} images of {args.image_size} px, whole build, "
        "worker start-up included), fast pHash:")
  print(interleave.environment(syn))
  print(interleave.table(syn, unit="images/s", work=total))
  print(interleave.ratio_line(syn, "2 processes", "1 process"))
  print(f"  synthetic train records: views agree on {100 * syn_same / syn_total:.1f}% of "
        f"{syn_total} regions (fast vs exact, {num_slots} slots)")

  fast_rate = len(items) / interleave.stats(vg["fast"]).median
  exact_rate = len(items) / interleave.stats(vg["exact"]).median
  print(f"god: fast {fast_rate:.1f} images/s, exact {exact_rate:.1f} images/s "
        f"({fast_rate / exact_rate:.1f}x), views agree on {100 * vg_same / vg_total:.1f}% "
        "of regions")


if __name__ == "__main__":
  main()
