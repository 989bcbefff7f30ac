"""GOD job throughput: images/s with 1 and 2 worker processes, side by side.

Builds a synthetic base dataset, runs `god_tfds.build` on it with 1 and then 2
worker processes (whole job: reading, views, pHash, tags, writing), and prints
images/s and the ratio. Synthetic scenes are small (few regions, 128 px), so it
also times `annotate_record` (the per-image work the workers do) on a
Visual-Genome-sized record (800x600, 50 regions, 35 objects: VG v1.2 averages)
and projects the wall time of VG v1.2's 108,077 images from it.

  python benchmarks/god.py [--images 300] [--image_size 128]
"""
from __future__ import annotations

import argparse
import io
import os
import shutil
import tempfile
import time

import numpy as np
from PIL import Image

VG_IMAGES = 108_077


def _vg_like_record(rng: np.random.Generator) -> tuple[dict, list[dict]]:
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


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--images", type=int, default=300, help="synthetic train images")
  parser.add_argument("--image_size", type=int, default=128)
  parser.add_argument("--vg_records", type=int, default=20)
  args = parser.parse_args()

  from aligncap_jax.data import god_tfds, synthetic, tags
  from aligncap_jax.data.builders.god import god_builder

  root = tempfile.mkdtemp(prefix="god_bench_")
  try:
    synthetic.SyntheticRegions(
        data_dir=root, file_format="array_record", num_train_images=args.images,
        num_validation_images=2, num_test_images=2, image_size=args.image_size,
        seed=0).download_and_prepare()
    total = args.images + 4
    rate = {}
    for procs in (1, 2):
      shutil.rmtree(os.path.join(root, "synthetic_regions_god"), ignore_errors=True)
      t0 = time.perf_counter()
      god_tfds.build("synthetic_regions", data_dir=root, top_k=1, score_threshold=0.0,
                     tag_vocab_size=4585, num_processes=procs)
      rate[procs] = total / (time.perf_counter() - t0)
  finally:
    shutil.rmtree(root, ignore_errors=True)

  rng = np.random.default_rng(0)
  record, objects = _vg_like_record(rng)
  params = god_builder.GodParams(top_k=1)
  vocab = tags.build_vocab(record["regions"]["caption"], 100)
  items = [(record, objects)] * args.vg_records
  vg_rate = {}
  god_builder.init_worker(params, vocab)
  god_builder.annotate_item(items[0])  # warm caches
  t0 = time.perf_counter()
  out = list(map(god_builder.annotate_item, items))[0]
  vg_rate[1] = len(items) / (time.perf_counter() - t0)
  with god_builder.worker_pool(2, params, vocab) as pool:
    pool.map(god_builder.annotate_item, items[:2], chunksize=1)  # start and warm workers
    t0 = time.perf_counter()
    list(pool.imap(god_builder.annotate_item, items, chunksize=1))
    vg_rate[2] = len(items) / (time.perf_counter() - t0)
  views = len(out["views"]) / 50

  print(f"machine: {os.cpu_count()} CPU cores, load average {os.getloadavg()[0]:.1f} "
        "(other jobs on the same cores lower the 2-process ratio)")
  print(f"GOD job, synthetic ({total} images of {args.image_size} px, whole build):")
  for procs in (1, 2):
    print(f"  {procs} process{'es' if procs > 1 else ''}: {rate[procs]:8.1f} images/s")
  print(f"  ratio 2/1: {rate[2] / rate[1]:.2f}x")
  print(f"VG-sized records (800x600, 50 regions, 35 objects, {views:.1f} views/region), "
        "per-image work only, warm workers:")
  for procs in (1, 2):
    hours = VG_IMAGES / vg_rate[procs] / 3600
    print(f"  {procs} process{'es' if procs > 1 else ''}: {vg_rate[procs]:6.2f} images/s"
          f" -> projected VG v1.2 ({VG_IMAGES:,} images): {hours:.1f} h")
  print(f"  ratio 2/1: {vg_rate[2] / vg_rate[1]:.2f}x")

if __name__ == "__main__":
  main()
