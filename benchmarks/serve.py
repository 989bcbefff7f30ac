"""HTTP service throughput: batching across clients vs one region per device batch.

  python benchmarks/serve.py [--workdir DIR --config configs/tiny.py] [--rounds 5]

Starts two `--mode serve` processes on 127.0.0.1 over the same checkpoint, one
with `serve.max_batch=1` (every region its own device batch) and one with the
default `serve.max_batch`; each compiles its buckets before it listens. Then
16 client threads send 25 requests each (1-8 boxes on a synthetic test image,
the same seeded workload for both) to one server at a time, alternating
A B A B ... for `--rounds` rounds so that both sides see the same machine.
Prints, per side, the median throughput (requests/s, regions/s) with its
spread over rounds, p50 and p99 latency over all requests, errors, and the
ratio of median throughputs, with the load average and thread settings
(benchmarks/interleave.py). Loopback only; every request has a timeout.

Without `--workdir` it first trains configs/tiny.py for `--steps` steps into a
temporary folder (through `main`, like a user).
"""
from __future__ import annotations

import argparse
import base64
import concurrent.futures
import http.client
import io
import json
import os
import queue
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from aligncap_jax.data import synthetic  # noqa: E402

import interleave  # noqa: E402  (benchmarks/, the script's folder)


def _main_cmd(config: str, overrides: list[str]) -> list[str]:
  return [sys.executable, "-m", "aligncap_jax.main", "--config", config, *overrides]


class Server:
  """One `--mode serve` subprocess; `url` once it printed where it listens."""

  def __init__(self, name: str, cmd: list[str], log_dir: str):
    self.name = name
    self._log = open(os.path.join(log_dir, f"serve_{name}.log"), "w")
    self.proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=self._log,
                                 text=True)
    self._lines: queue.Queue = queue.Queue()
    threading.Thread(target=self._read, daemon=True).start()
    self.url = None

  def _read(self) -> None:
    for line in self.proc.stdout:
      self._lines.put(line)

  def wait(self, timeout_s: float) -> str:
    deadline = time.monotonic() + timeout_s
    while self.url is None:
      if self.proc.poll() is not None:
        raise RuntimeError(f"server {self.name} exited with {self.proc.returncode}; "
                           f"see {self._log.name}")
      try:
        line = self._lines.get(timeout=1.0)
      except queue.Empty:
        if time.monotonic() > deadline:
          raise RuntimeError(f"server {self.name} not ready after {timeout_s:.0f} s") from None
        continue
      m = re.match(r"serving on http://(127\.0\.0\.1):(\d+)/", line)
      if m:
        self.url = (m.group(1), int(m.group(2)))
        print(f"  {self.name}: {line.strip()}", flush=True)
    return self.url

  def health(self) -> dict:
    conn = http.client.HTTPConnection(*self.url, timeout=30)
    try:
      conn.request("GET", "/healthz")
      return json.loads(conn.getresponse().read())
    finally:
      conn.close()

  def stop(self) -> None:
    if self.proc.poll() is None:
      self.proc.terminate()
      try:
        self.proc.wait(timeout=30)
      except subprocess.TimeoutExpired:
        self.proc.kill()
    self._log.close()


def workload(clients: int, per_client: int, image_size: int, seed: int) -> list[list[bytes]]:
  """Each client's request bodies: 1-8 random boxes on one of 16 synthetic images."""
  rng = np.random.default_rng(seed)
  images = []
  for i in range(16):
    buf = io.BytesIO()
    Image.fromarray(synthetic.generate_scene(seed, "test", i, image_size).image).save(buf, "PNG")
    images.append(base64.b64encode(buf.getvalue()).decode())
  out = []
  for _ in range(clients):
    bodies = []
    for _ in range(per_client):
      n = int(rng.integers(1, 9))
      lo = rng.uniform(0, image_size * 0.7, (n, 2))
      size = rng.uniform(image_size * 0.1, image_size * 0.3, (n, 2))
      boxes = np.concatenate([lo, np.minimum(lo + size, image_size)], -1).round(1)
      bodies.append(json.dumps({"image": images[int(rng.integers(16))],
                                "boxes": boxes.tolist()}).encode())
    out.append(bodies)
  return out


def run_round(server: Server, bodies: list[list[bytes]]) -> dict:
  """All clients at once against one server; latencies, wall time, errors."""
  barrier = threading.Barrier(len(bodies))

  def client(mine: list[bytes]):
    conn = http.client.HTTPConnection(*server.url, timeout=120)
    lat, errors, regions = [], 0, 0
    barrier.wait(60)
    for body in mine:
      t = time.perf_counter()
      try:
        conn.request("POST", "/v1/caption", body=body,
                     headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        answer = json.loads(resp.read())
        want = len(json.loads(body)["boxes"])
        if resp.status != 200 or len(answer.get("results", [])) != want:
          errors += 1
        regions += want
      except (OSError, http.client.HTTPException, ValueError):
        errors += 1
        conn.close()
        conn = http.client.HTTPConnection(*server.url, timeout=120)
      lat.append(time.perf_counter() - t)
    conn.close()
    return lat, errors, regions

  start = time.perf_counter()
  with concurrent.futures.ThreadPoolExecutor(len(bodies)) as pool:
    parts = list(pool.map(client, bodies))
  wall = time.perf_counter() - start
  lat = [x for p in parts for x in p[0]]
  return {"wall": wall, "latencies": lat, "errors": sum(p[1] for p in parts),
          "requests": len(lat), "regions": sum(p[2] for p in parts)}


def main() -> None:
  parser = argparse.ArgumentParser()
  parser.add_argument("--config", default=os.path.join(ROOT, "configs", "tiny.py"))
  parser.add_argument("--workdir", default=None, help="trained workdir (default: train one)")
  parser.add_argument("--steps", type=int, default=60, help="training steps without --workdir")
  parser.add_argument("--override", action="append", default=[],
                      help="extra --config.x=y for both servers (e.g. data.data_dir=DIR)")
  parser.add_argument("--clients", type=int, default=16)
  parser.add_argument("--requests", type=int, default=25, help="per client")
  parser.add_argument("--rounds", type=int, default=5)
  parser.add_argument("--max_batch", type=int, default=None,
                      help="the batching side's serve.max_batch (default: the config's)")
  parser.add_argument("--ready_timeout_s", type=float, default=900)
  args = parser.parse_args()
  overrides = [f"--config.{o}" for o in args.override]
  tmp = tempfile.mkdtemp(prefix="aligncap_bench_serve_")
  workdir = args.workdir
  if workdir is None:
    workdir = os.path.join(tmp, "run")
    if not any(o.startswith("--config.data.data_dir=") for o in overrides):
      overrides.append(f"--config.data.data_dir={os.path.join(tmp, 'tfds')}")
    print(f"training {args.config} for {args.steps} steps into {workdir}", flush=True)
    subprocess.run(_main_cmd(args.config, overrides) + [
        "--mode", "train", "--workdir", workdir, f"--config.train.total_steps={args.steps}",
        "--config.train.eval_every_steps=-1",
        f"--config.train.checkpoint_every_steps={args.steps}"],
        cwd=ROOT, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=3600)
  serve = ["--mode", "serve", "--workdir", workdir, "--port", "0"]
  batched = [f"--config.serve.max_batch={args.max_batch}"] if args.max_batch else []
  sides = {"max_batch=1": Server("max_batch=1", _main_cmd(args.config, overrides) + serve + [
               "--config.serve.max_batch=1"], tmp),
           "batched": Server("batched", _main_cmd(args.config, overrides) + serve + batched, tmp)}
  try:
    print("starting both servers (each compiles its batch buckets first)", flush=True)
    for s in sides.values():
      s.wait(args.ready_timeout_s)
    sides["batched"].name = f"max_batch={sides['batched'].health()['max_batch']}"
    bodies = workload(args.clients, args.requests, _image_size(args.config, overrides), seed=0)
    for s in sides.values():   # warm the HTTP path and the threads once
      run_round(s, [b[:1] for b in bodies])
    results = {k: [] for k in sides}
    load_before = os.getloadavg()
    for r in range(args.rounds):
      for k, s in sides.items():
        res = run_round(s, bodies)
        results[k].append(res)
        print(f"  round {r + 1} {s.name:>12}: {res['requests'] / res['wall']:7.2f} req/s, "
              f"{res['regions'] / res['wall']:7.1f} regions/s, {res['errors']} errors",
              flush=True)
    stats = {k: s.health() for k, s in sides.items()}
    timings = interleave.Timings(
        {k: [r["wall"] for r in runs] for k, runs in results.items()})
    timings.load_before, timings.load_after = load_before, os.getloadavg()
  finally:
    for s in sides.values():
      s.stop()
  _report(args, sides, results, stats)
  print(interleave.environment(timings))


def _image_size(config_path: str, overrides: list[str]) -> int:
  """The synthetic image size of the config (after overrides)."""
  import importlib.util  # pylint: disable=g-import-not-at-top
  for o in overrides:
    if o.startswith("--config.data.synthetic.image_size="):
      return int(o.split("=", 1)[1])
  spec = importlib.util.spec_from_file_location("bench_config", config_path.split(":")[0])
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  arg = config_path.split(":", 1)[1] if ":" in config_path else None
  return int(module.get_config(arg).data.synthetic.image_size)


def _report(args, sides, results, stats) -> None:
  rows, med = [], {}
  for k, runs in results.items():
    rps = [r["requests"] / r["wall"] for r in runs]
    regs = [r["regions"] / r["wall"] for r in runs]
    lat = np.asarray([x for r in runs for x in r["latencies"]]) * 1000
    med[k] = statistics.median(rps)
    st = stats[k]
    rows.append((sides[k].name, med[k], min(rps), max(rps), statistics.median(regs),
                 np.percentile(lat, 50), np.percentile(lat, 99),
                 sum(r["errors"] for r in runs), st["regions"] / max(st["device_batches"], 1)))
  print(f"\n{args.clients} clients x {args.requests} requests of 1-8 boxes, "
        f"{args.rounds} interleaved rounds, loopback")
  print("| server | requests/s (median, min-max) | regions/s | p50 latency | p99 latency "
        "| errors | regions per device batch |")
  print("|---|---|---|---|---|---|---|")
  for name, m, lo, hi, reg, p50, p99, err, per in rows:
    print(f"| {name} | {m:.2f} ({lo:.2f}-{hi:.2f}) | {reg:.1f} | {p50:.0f} ms | {p99:.0f} ms "
          f"| {err} | {per:.1f} |")
  one, many = results["max_batch=1"], results["batched"]
  ratios = [(b["requests"] / b["wall"]) / (a["requests"] / a["wall"]) for a, b in zip(one, many)]
  print(f"\nthroughput ratio, batched / max_batch=1: {med['batched'] / med['max_batch=1']:.2f}x "
        f"(per round pair {min(ratios):.2f}x-{max(ratios):.2f}x); target >= 2x, 0 errors")


if __name__ == "__main__":
  main()
