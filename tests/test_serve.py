"""Using a trained model as a user would: `--mode predict` with a detections file,
the `Captioner` API (loaded from an export folder), and `--mode serve` tested as
a client (malformed requests, 32 concurrent requests) and as a person (Chromium
driven by Playwright: upload an image, drag boxes, read the captions).

One tiny AlignCap (configs/tiny.py, real model and pipeline) is trained once per
module through `main` in a subprocess on one CPU device; the server runs on it in
another subprocess, started right after training so that it compiles while the
in-process tests run.
"""
from __future__ import annotations

import base64
import concurrent.futures
import contextlib
import http.client
import io
import json
import os
import queue
import re
import shutil
import subprocess
import sys
import threading
import time
import types
from unittest import mock

from absl.testing import flagsaver
import numpy as np
from PIL import Image
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "configs"))

import tiny  # noqa: E402

from aligncap_jax import captioner as captioner_lib  # noqa: E402
from aligncap_jax.data import synthetic  # noqa: E402
from aligncap_jax.serve import batcher as batcher_lib  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "configs", "tiny.py")
STEPS = 60            # enough for caption-like output from the tiny model
MAX_BATCH = 4         # server buckets 1, 2, 4 (each compiled at start-up)
MAX_BOXES = 6
MAX_BYTES = 60_000
IMAGE_SIZE = 64       # tiny.py's synthetic image size


def _one_device_env() -> dict[str, str]:
  """The environment for subprocesses: one CPU device (conftest fakes 8)."""
  env = dict(os.environ, JAX_PLATFORMS="cpu", HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
  env["XLA_FLAGS"] = " ".join(f for f in env.get("XLA_FLAGS", "").split()
                              if not f.startswith("--xla_force_host_platform_device_count"))
  return env


def _scene(index: int) -> synthetic.Scene:
  return synthetic.generate_scene(0, "test", index, IMAGE_SIZE)


def _png_bytes(image: np.ndarray) -> bytes:
  buf = io.BytesIO()
  Image.fromarray(image).save(buf, format="PNG")
  return buf.getvalue()


def _coco(scene: synthetic.Scene) -> list[dict]:
  """The scene's simulated detections in COCO results format (x, y, w, h)."""
  return [{"image_id": 1, "category_name": d["label"], "score": float(d["score"]),
           "bbox": [float(d["bbox"][0]), float(d["bbox"][1]),
                    float(d["bbox"][2] - d["bbox"][0]), float(d["bbox"][3] - d["bbox"][1])]}
          for d in scene.detections]


class _Server:
  """`--mode serve` in a subprocess; `url` once it printed its address."""

  def __init__(self, args: list[str], log_dir: str):
    self.stderr_path = os.path.join(log_dir, "serve.stderr")
    self._stderr = open(self.stderr_path, "w")
    self.proc = subprocess.Popen(args, cwd=ROOT, env=_one_device_env(), text=True,
                                 stdout=subprocess.PIPE, stderr=self._stderr)
    self._lines: queue.Queue[str | None] = queue.Queue()
    threading.Thread(target=self._read, daemon=True).start()
    self.url = None

  def _read(self):
    for line in self.proc.stdout:
      self._lines.put(line)
    self._lines.put(None)

  def wait_ready(self, timeout_s: float = 600) -> str:
    deadline = time.monotonic() + timeout_s
    while self.url is None:
      try:
        line = self._lines.get(timeout=max(deadline - time.monotonic(), 0.01))
      except queue.Empty:
        pytest.fail(f"the server did not say it was serving within {timeout_s:.0f} s; "
                    f"stderr tail:\n{self._tail()}")
      if line is None:
        pytest.fail(f"the server exited with {self.proc.wait()}; stderr tail:\n{self._tail()}")
      m = re.match(r"serving on (http://127\.0\.0\.1:\d+)/", line)
      if m:
        self.url = m.group(1)
    return self.url

  def _tail(self) -> str:
    with open(self.stderr_path) as f:
      return f.read()[-3000:]

  def stop(self):
    if self.proc.poll() is None:
      self.proc.terminate()
      try:
        self.proc.wait(timeout=30)
      except subprocess.TimeoutExpired:
        self.proc.kill()
        self.proc.wait()
    self._stderr.close()


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """A tiny model trained through `main`, and `--mode serve` starting on it."""
  root = tmp_path_factory.mktemp("use")
  data_dir, workdir = str(root / "tfds"), str(root / "run")
  base = [sys.executable, "-m", "aligncap_jax.main", "--config", TINY,
          f"--config.data.data_dir={data_dir}"]
  proc = subprocess.run(
      base + ["--mode", "train", "--workdir", workdir, f"--config.train.total_steps={STEPS}",
              "--config.train.eval_every_steps=-1",
              f"--config.train.checkpoint_every_steps={STEPS}"],
      cwd=ROOT, env=_one_device_env(), capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stderr[-3000:]
  server = _Server(base + ["--mode", "serve", "--workdir", workdir, "--port", "0",
                           f"--config.serve.max_batch={MAX_BATCH}",
                           f"--config.serve.max_boxes={MAX_BOXES}",
                           f"--config.serve.max_bytes={MAX_BYTES}",
                           "--config.serve.max_wait_ms=20"], str(root))
  config = tiny.get_config()
  config.data.data_dir = data_dir
  yield types.SimpleNamespace(root=root, data_dir=data_dir, workdir=workdir, config=config,
                              server=server)
  server.stop()


# ------------------------------------------------------------------ predict (issue 15 §2)


def _main(args: list[str]) -> int:
  """Runs `main` in this process with `args`; returns its exit code."""
  from aligncap_jax import main as main_lib
  argv = ["aligncap_jax.main", *args]
  # ml_collections reads `--config.x` overrides from sys.argv.
  with flagsaver.flagsaver(), mock.patch.object(sys, "argv", argv):
    rest = main_lib._parse_flags(argv)  # pylint: disable=protected-access
    try:
      main_lib.main(rest)
    except SystemExit as e:
      return int(e.code or 0)
  return 0


@pytest.fixture(scope="module")
def predicted(trained, tmp_path_factory):
  """`--mode predict --detections FILE` through `main`, with the real pipeline's batch."""
  from aligncap_jax.data import pipeline
  tmp = tmp_path_factory.mktemp("predict")
  scene = _scene(0)
  image, dets = tmp / "scene.png", tmp / "dets.json"
  image.write_bytes(_png_bytes(scene.image))
  dets.write_text(json.dumps(_coco(scene)))
  boxes = [[round(float(v), 2) for v in b] for b in scene.region_boxes]
  batches, real = [], pipeline.make_predict_batch

  def spy(*args, **kwargs):   # the real function; its batch is kept for the checks
    batch, warnings = real(*args, **kwargs)
    batches.append((kwargs.get("detections"), batch))
    return batch, warnings

  pipeline.make_predict_batch = spy
  out = io.StringIO()
  try:
    with contextlib.redirect_stdout(out):
      code = _main(["--config", TINY, f"--config.data.data_dir={trained.data_dir}",
                    "--mode", "predict", "--workdir", trained.workdir, "--image", str(image),
                    "--detections", str(dets)] + [f"--box={','.join(map(str, b))}" for b in boxes])
  finally:
    pipeline.make_predict_batch = real
  return types.SimpleNamespace(code=code, stdout=out.getvalue(), batches=batches, boxes=boxes,
                               image=str(image), detections=_coco(scene))


def test_predict_reads_the_detections_file_for_context_views(predicted):
  assert predicted.code == 0, predicted.stdout
  assert "no detections given" not in predicted.stdout
  lines = [x for x in predicted.stdout.splitlines() if x.startswith("[")]
  assert len(lines) == len(predicted.boxes)
  for line, box in zip(lines, predicted.boxes):
    assert line.startswith(f"[{','.join(f'{v:g}' for v in box)}] ")
    assert len(line.split("] ", 1)[1].split("  [tags:")[0].split()) >= 2   # a caption
  (detections, batch), = predicted.batches
  assert detections == predicted.detections     # the file's entries, not its path
  s = tiny.get_config().data.view_size
  views, view_boxes = batch["views"], batch["view_boxes"]
  assert views.shape[:2] == (len(predicted.boxes), 3)
  for r in range(len(predicted.boxes)):
    np.testing.assert_allclose(view_boxes[r, 0], [0, 0, s, s], atol=1e-4)  # view 0 = target
    for k in (1, 2):   # context views: the target fills only part of them, pixels differ
      assert not np.array_equal(views[r, k], views[r, 0])
    areas = np.prod(view_boxes[r, 1:, 2:] - view_boxes[r, 1:, :2], axis=-1) / s**2
    assert areas.min() < 0.9, (r, view_boxes[r])


@pytest.mark.parametrize("content, message", [
    (None, "file not found"),
    ("[{\"bbox\": [1, 2, 3, 4]", "not a JSON file"),
    ("{\"bbox\": [1, 2, 3, 4], \"score\": 0.9}", "expected a JSON list of COCO-results "
                                                 "detections, got a JSON dict"),
    ("[{\"bbox\": [1, 2, 3, 4]}, {\"score\": 0.5, \"category_id\": 3}]",
     "entry 1: needs 'bbox' [x, y, w, h]"),
    ("[{\"bbox\": [1, 2, 0, 4]}]", "entry 0: 'bbox' [x, y, w, h] needs finite values and w, h > 0"),
])
def test_bad_detections_file_is_one_line_exit_2(tmp_path, capsys, content, message):
  image, dets = tmp_path / "a.png", tmp_path / "dets.json"
  image.write_bytes(_png_bytes(_scene(1).image))
  if content is not None:
    dets.write_text(content)
  # No checkpoint in the workdir: the file is checked before anything is restored.
  code = _main(["--config", TINY, "--mode", "predict", "--workdir", str(tmp_path / "none"),
                "--image", str(image), "--box", "1,1,20,20", "--detections", str(dets)])
  err = [x for x in capsys.readouterr().err.splitlines() if x.startswith("error: ")]
  assert code == 2 and len(err) == 1
  assert err[0].startswith(f"error: --detections {dets}: ") and message in err[0], err[0]


# ------------------------------------------------------------------ Python API


@pytest.fixture(scope="module")
def exported(trained):
  """`Captioner.load` of an `--mode export` folder of the trained model (bucket 8)."""
  import jax
  from aligncap_jax import hf_export
  export = hf_export.export(trained.config, trained.workdir)
  compiles = []

  def on_event(event, secs, **kwargs):
    del secs, kwargs
    if event == "/jax/core/compile/backend_compile_duration":
      compiles.append(event)

  jax.monitoring.register_event_duration_secs_listener(on_event)
  try:
    captioner = captioner_lib.Captioner.load(export, batch_sizes=[8])
    yield types.SimpleNamespace(captioner=captioner, compiles=compiles)
  finally:
    jax.monitoring.unregister_event_duration_listener(on_event)


def test_captioner_from_an_export_folder_matches_predict(trained, predicted, exported):
  captioner, compiles = exported.captioner, exported.compiles
  assert captioner.buckets == [8]
  compiled_at_load = len(compiles)
  image = Image.open(predicted.image)
  got = captioner.caption(image, predicted.boxes, predicted.detections)
  # Same checkpoint, same inputs, same bucket: what --mode predict printed.
  lines = [f"[{','.join(f'{v:g}' for v in r['box'])}] {r['caption']}"
           + (f"  [tags: {', '.join(r['tags'])}]" if r["tags"] else "") for r in got]
  assert lines == [x for x in predicted.stdout.splitlines() if x.startswith("[")]
  assert all(set(r) == {"box", "caption", "score", "tags"} for r in got)
  assert all(set(r["tags"]) <= set(captioner.assets.tag_vocab) for r in got)
  assert captioner.caption(predicted.image, predicted.boxes, predicted.detections) == got

  # Arrays, encoded bytes and PIL images; several images' regions share device batches.
  scenes = [_scene(i) for i in range(3)]
  requests = [(scenes[0].image, scenes[0].region_boxes[:3].tolist()),
              (_png_bytes(scenes[1].image), scenes[1].region_boxes.tolist(), _coco(scenes[1])),
              {"image": Image.fromarray(scenes[2].image), "boxes": [[0, 0, 70, 30]]}]
  many = captioner.caption_many(requests)   # 3 + 4 + 1 regions: two device batches of 8
  assert [len(m) for m in many] == [3, len(scenes[1].region_boxes), 1]
  alone = [captioner.caption(*r) if isinstance(r, tuple) else captioner.caption(**r)
           for r in requests]
  for a, b in zip(many, alone):
    assert [(r["box"], r["caption"], r["tags"]) for r in a] == [
        (r["box"], r["caption"], r["tags"]) for r in b]
    np.testing.assert_allclose([r["score"] for r in a], [r["score"] for r in b], rtol=1e-4)
  assert many[2][0]["box"] == [0.0, 0.0, 64.0, 30.0]   # clipped to the image
  assert len(compiles) == compiled_at_load, "a call compiled"

  with pytest.raises(captioner_lib.InputError, match=r"boxes\[1\] \(1,1,1,5\): needs x2 > x1"):
    captioner.caption(scenes[0].image, [[1, 1, 9, 9], [1, 1, 1, 5]])
  with pytest.raises(captioner_lib.InputError, match="lies outside the 64x64 image"):
    captioner.caption(scenes[0].image, [[70, 70, 90, 90]])
  with pytest.raises(captioner_lib.InputError, match="image: not a readable image"):
    captioner.caption(b"not an image", [[1, 1, 9, 9]])
  with pytest.raises(captioner_lib.InputError, match=r"detections\[0\]: needs 'bbox'"):
    captioner.caption(scenes[0].image, [[1, 1, 9, 9]], [{"box": [1, 1, 2, 2]}])
  with pytest.raises(FileNotFoundError, match="missing.png: file not found"):
    captioner.caption(str(trained.root / "missing.png"), [[1, 1, 9, 9]])


def test_full_queue_answers_503_and_the_service_recovers(exported):
  """The app in this process over the exported Captioner, its batcher held at a gate."""
  import uvicorn
  from aligncap_jax import serve
  from aligncap_jax.serve import app as app_lib
  captioner = exported.captioner
  gate, entered = threading.Event(), threading.Event()

  def gated_run(rows, max_rows):   # the real Captioner.run, once the gate opens
    entered.set()
    assert gate.wait(120)
    return captioner.run(rows, max_rows)

  settings = captioner.config.serve
  batcher = serve.Batcher(gated_run, max_batch=8, max_wait_ms=0, max_queue=1)
  sock = app_lib._bind("127.0.0.1", 0)  # pylint: disable=protected-access
  server = uvicorn.Server(uvicorn.Config(serve.make_app(captioner, batcher, settings),
                                         log_level="warning"))
  thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
  thread.start()
  url = f"http://127.0.0.1:{sock.getsockname()[1]}"
  scene = _scene(4)
  doc = {"image": _b64(scene.image), "boxes": scene.region_boxes[:1].tolist()}
  try:
    for _ in range(600):
      if server.started:
        break
      time.sleep(0.1)
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
      first = pool.submit(_caption, url, doc)
      assert entered.wait(120)                      # request 1 is on the device
      second = pool.submit(_caption, url, doc)
      for _ in range(1200):                         # request 2 waits in the queue
        if batcher.stats["queued"] == 1:
          break
        time.sleep(0.05)
      assert batcher.stats["queued"] == 1
      status, answer = _caption(url, doc)
      assert status == 503 and answer["field"] is None and "queue is full" in answer["error"]
      gate.set()
      want = captioner.caption(scene.image, doc["boxes"])
      for future in (first, second):
        status, answer = future.result(120)
        assert status == 200 and answer["results"][0]["caption"] == want[0]["caption"]
    status, answer = _caption(url, doc)
    assert status == 200 and answer["results"][0]["box"] == want[0]["box"]
    assert batcher.stats["rejected"] == 1
  finally:
    gate.set()
    server.should_exit = True
    thread.join(60)
    batcher.close()


# ------------------------------------------------------------------ batcher


def test_batcher_routes_each_job_its_rows_and_bounds_its_queue():
  batches, gate, entered = [], threading.Event(), threading.Event()

  def run(rows, max_rows):
    entered.set()
    gate.wait(30)
    batches.append(len(rows["id"]))
    assert max_rows == 4
    return [int(i) * 10 for i in rows["id"]]

  b = batcher_lib.Batcher(run, max_batch=4, max_wait_ms=50, max_queue=3)
  try:
    first = b.submit({"id": np.array([0])})
    assert entered.wait(30)                     # the worker holds job 0
    jobs = [b.submit({"id": np.arange(10 * k, 10 * k + n)}) for k, n in ((1, 3), (2, 2), (3, 1))]
    with pytest.raises(batcher_lib.QueueFull, match="queue is full"):
      b.submit({"id": np.array([99])})
    gate.set()
    assert first.result(30) == [0]
    assert jobs[0].result(30) == [100, 110, 120]
    assert jobs[1].result(30) == [200, 210]
    assert jobs[2].result(30) == [300]
    # 3 rows, then 2 + 1 together: a job never overflows a batch of 4.
    assert batches == [1, 3, 3]
    assert b.stats == {"requests": 4, "regions": 7, "device_batches": 3, "rejected": 1,
                       "queued": 0}
  finally:
    gate.set()
    b.close()


def test_batcher_failure_reaches_only_that_batch():
  def run(rows, max_rows):
    del max_rows
    if (rows["id"] < 0).any():
      raise RuntimeError("bad row")
    return list(rows["id"])

  b = batcher_lib.Batcher(run, max_batch=4, max_wait_ms=0, max_queue=4)
  try:
    with pytest.raises(RuntimeError, match="bad row"):
      b.submit({"id": np.array([-1])}).result(30)
    assert b.submit({"id": np.array([5, 6])}).result(30) == [5, 6]
  finally:
    b.close()


# ------------------------------------------------------------------ the service


@pytest.fixture(scope="module")
def server(trained):
  trained.server.wait_ready()
  return trained.server


def _request(url: str, method: str, path: str, body: bytes | None = None,
             headers: dict | None = None, chunked: bool = False):
  host, port = url.removeprefix("http://").split(":")
  conn = http.client.HTTPConnection(host, int(port), timeout=120)
  try:
    if chunked:
      conn.request(method, path, body=iter([body[i:i + 8192] for i in range(0, len(body), 8192)]),
                   headers=headers or {}, encode_chunked=True)
    else:
      conn.request(method, path, body=body, headers=headers or {})
    resp = conn.getresponse()
    data = resp.read()
    kind = resp.getheader("content-type", "")
    return resp.status, (json.loads(data) if "json" in kind else data.decode())
  finally:
    conn.close()


def _caption(url: str, doc: dict):
  return _request(url, "POST", "/v1/caption", json.dumps(doc).encode(),
                  {"Content-Type": "application/json"})


def _b64(image: np.ndarray) -> str:
  return base64.b64encode(_png_bytes(image)).decode()


def test_health_and_page(server):
  status, health = _request(server.url, "GET", "/healthz")
  assert status == 200 and health["status"] == "ready"
  assert health["buckets"] == [1, 2, 4] and health["max_batch"] == MAX_BATCH
  status, page = _request(server.url, "GET", "/")
  assert status == 200 and '<canvas id="canvas"' in page and "/v1/caption" in page
  assert "http://" not in page and "https://" not in page    # nothing from a CDN


def test_malformed_requests_get_4xx_naming_the_field_and_the_server_keeps_serving(server):
  scene = _scene(2)
  img = _b64(scene.image)
  good = {"image": img, "boxes": scene.region_boxes[:2].tolist()}
  big = json.dumps({"image": "A" * MAX_BYTES, "boxes": [[1, 1, 5, 5]]}).encode()
  cases = [
      ("not JSON", b"{\"image\": ", {}, 400, "body"),
      ("a JSON list", b"[1, 2]", {}, 400, "body"),
      ("no image", {"boxes": [[1, 1, 5, 5]]}, {}, 422, "image"),
      ("image not a string", {"image": 7, "boxes": [[1, 1, 5, 5]]}, {}, 422, "image"),
      ("image not base64", {"image": "@@@@", "boxes": [[1, 1, 5, 5]]}, {}, 422, "image"),
      ("undecodable image", {"image": base64.b64encode(b"GIF89a?").decode(),
                             "boxes": [[1, 1, 5, 5]]}, {}, 422, "image"),
      ("no boxes", {"image": img}, {}, 422, "boxes"),
      ("boxes not a list", {"image": img, "boxes": "1,1,5,5"}, {}, 422, "boxes"),
      ("empty boxes", {"image": img, "boxes": []}, {}, 422, "boxes"),
      ("box of 3 numbers", {"image": img, "boxes": [[1, 1, 5]]}, {}, 422, "boxes"),
      ("box of strings", {"image": img, "boxes": [["a", "b", "c", "d"]]}, {}, 422, "boxes"),
      ("box outside", {"image": img, "boxes": [[70, 70, 90, 90]]}, {}, 422, "boxes"),
      ("zero-area box", {"image": img, "boxes": [[10, 10, 10, 20]]}, {}, 422, "boxes"),
      ("too many boxes", {"image": img, "boxes": [[1, 1, 5, 5]] * (MAX_BOXES + 1)}, {}, 422,
       "boxes"),
      ("detections not a list", {**good, "detections": {"bbox": [1, 1, 2, 2]}}, {}, 422,
       "detections"),
      ("detection without bbox", {**good, "detections": [{"score": 1}]}, {}, 422, "detections"),
      ("unknown field", {**good, "box": [1, 1, 5, 5]}, {}, 422, "box"),
      ("body over max_bytes", big, {}, 413, "body"),
      ("chunked body over max_bytes", big, {"chunked": True}, 413, "body"),
  ]
  for name, doc, opts, want_status, want_field in cases:
    body = doc if isinstance(doc, bytes) else json.dumps(doc).encode()
    status, answer = _request(server.url, "POST", "/v1/caption", body,
                              {"Content-Type": "application/json"}, **opts)
    assert (status, answer.get("field")) == (want_status, want_field), (name, status, answer)
    assert isinstance(answer["error"], str) and answer["error"].startswith(want_field), name
    status, answer = _caption(server.url, good)
    assert status == 200 and len(answer["results"]) == 2, (name, status, answer)


def test_32_concurrent_requests_each_get_their_own_answer(server):
  rng = np.random.default_rng(0)
  requests = []
  for k in range(32):
    scene = _scene(k % 8)
    n = int(rng.integers(1, 4))
    boxes = [[float(v) for v in scene.region_boxes[(k + i) % len(scene.region_boxes)]]
             for i in range(n)]
    doc = {"image": _b64(scene.image), "boxes": boxes}
    if k % 3 == 0:
      doc["detections"] = _coco(scene)
    requests.append(doc)
  want = [_caption(server.url, doc) for doc in requests]     # one at a time
  assert all(status == 200 for status, _ in want)
  before = _request(server.url, "GET", "/healthz")[1]
  barrier = threading.Barrier(32)

  def send(doc):
    barrier.wait(60)
    return _caption(server.url, doc)

  with concurrent.futures.ThreadPoolExecutor(32) as pool:
    got = list(pool.map(send, requests))
  after = _request(server.url, "GET", "/healthz")[1]
  for k, ((status, answer), (_, expected)) in enumerate(zip(got, want)):
    assert status == 200, (k, answer)
    res, exp = answer["results"], expected["results"]
    assert [r["box"] for r in res] == requests[k]["boxes"], k
    assert [(r["caption"], r["tags"]) for r in res] == [(r["caption"], r["tags"]) for r in exp], k
    np.testing.assert_allclose([r["score"] for r in res], [r["score"] for r in exp], rtol=1e-4)
  regions = sum(len(d["boxes"]) for d in requests)
  assert after["regions"] - before["regions"] == regions
  # Requests shared device batches: fewer batches than requests.
  assert after["device_batches"] - before["device_batches"] < len(requests), (before, after)


def test_page_in_chromium_draws_boxes_and_shows_their_captions(server, tmp_path):
  chromium = shutil.which("chromium") or "/usr/bin/chromium"
  if not os.path.exists(chromium):
    pytest.fail("chromium is not installed and the browser test needs it: launch/test.sh "
                "installs it with `apt-get install -y chromium` (its output: "
                "/tmp/aligncap_chromium_install.log); that step failed or was skipped")
  from playwright.sync_api import sync_playwright
  scene = _scene(3)
  image = tmp_path / "scene.png"
  image.write_bytes(_png_bytes(scene.image))
  boxes = scene.region_boxes[:2]
  with sync_playwright() as p:
    browser = p.chromium.launch(executable_path=chromium, headless=True)
    try:
      page = browser.new_page(viewport={"width": 1100, "height": 620})
      page.goto(server.url + "/", timeout=60_000)
      page.set_input_files("#file", str(image))
      page.wait_for_selector('#canvas[data-ready="1"]', timeout=30_000)
      rect = page.locator("#canvas").bounding_box()
      scale = rect["width"] / IMAGE_SIZE
      answers = []
      for x1, y1, x2, y2 in boxes.tolist():
        with page.expect_response(lambda r: r.url.endswith("/v1/caption")) as response:
          page.mouse.move(rect["x"] + x1 * scale, rect["y"] + y1 * scale)
          page.mouse.down()
          page.mouse.move(rect["x"] + x2 * scale, rect["y"] + y2 * scale, steps=8)
          page.mouse.up()
        answers.append(response.value.json())
      for i, answer in enumerate(answers, start=1):
        item = page.locator(f'#result-{i}[data-state="done"]')
        item.wait_for(timeout=60_000)
        result = answer["results"][0]
        assert item.locator(".num").inner_text() == str(i)
        assert item.locator(".caption").inner_text() == result["caption"] != ""
        np.testing.assert_allclose(result["box"], boxes[i - 1], atol=1.0)   # what was dragged
        meta = item.locator(".meta").inner_text()
        assert meta.startswith("tags: " + (", ".join(result["tags"]) or "none"))
      shot = tmp_path / "page.png"
      page.screenshot(path=str(shot))
    finally:
      browser.close()
  with Image.open(shot) as im:
    assert im.size == (1100, 620)
  if os.environ.get("ALIGNCAP_SCREENSHOT_TO"):   # how docs/serve_page.png was made
    shutil.copy(shot, os.environ["ALIGNCAP_SCREENSHOT_TO"])
