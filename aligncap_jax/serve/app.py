"""`--mode serve`: the HTTP service and its page (FastAPI + uvicorn).

  python -m aligncap_jax.main --config configs/synthetic.py --workdir DIR \
      --mode serve [--port 8080] [--host 127.0.0.1]

Endpoints:
  POST /v1/caption  JSON `{"image": base64 of the image file's bytes (a data URL
                    is fine), "boxes": [[x1, y1, x2, y2], ...], "detections":
                    optional COCO-results list}` -> 200 `{"results": [{"box",
                    "caption", "score", "tags"}, ...]}` in box order.
  GET  /healthz     200 `{"status": "ready", "buckets", "requests", ...}`; the
                    server only listens once every batch bucket is compiled.
  GET  /            the page: open or drop an image, draw boxes, read captions.

A malformed request gets a 4xx `{"error": message, "field": name}` and the
server keeps serving: 413 for a body over `serve.max_bytes` (field `body`), 400
for a body that is not a JSON object (`body`), 422 for a missing, unknown or
invalid field (`image`, `boxes`, `detections`), including more than
`serve.max_boxes` boxes and boxes outside the image; 503 when `serve.max_queue`
requests are already waiting. Requests from concurrent clients share device
batches (`serve.max_batch` regions, collected for up to `serve.max_wait_ms`).
"""
from __future__ import annotations

import asyncio
import base64
import binascii
import json
import os
import socket
from typing import Any

from absl import logging
import fastapi
from fastapi import responses
import ml_collections
from starlette.concurrency import run_in_threadpool

from aligncap_jax import captioner as captioner_lib
from aligncap_jax.serve import batcher as batcher_lib

PAGE_FILE = os.path.join(os.path.dirname(__file__), "page.html")
FIELDS = ("image", "boxes", "detections")


class RequestError(Exception):
  """A request the service refuses: HTTP status, offending field, message."""

  def __init__(self, status: int, field: str | None, message: str):
    super().__init__(message)
    self.status, self.field, self.message = status, field, message


def _error(status: int, field: str | None, message: str) -> responses.JSONResponse:
  return responses.JSONResponse({"error": message, "field": field}, status_code=status)


async def _read_body(request: fastapi.Request, max_bytes: int) -> bytes:
  """The body, or a 413 once it is known to exceed `max_bytes`.

  An oversized body is still read (and dropped) up to 16 x `max_bytes`, so the
  client that is still sending gets the 413 instead of a reset connection.
  """
  too_big = RequestError(413, "body", f"body: over the {max_bytes}-byte limit "
                                      "(serve.max_bytes)")
  length = request.headers.get("content-length")
  declared = int(length) if length and length.isdigit() else None
  chunks, size = [], 0
  async for chunk in request.stream():
    size += len(chunk)
    if size <= max_bytes and (declared is None or declared <= max_bytes):
      chunks.append(chunk)
    elif size > 16 * max_bytes:
      break
  if size > max_bytes or (declared is not None and declared > max_bytes):
    raise too_big
  return b"".join(chunks)


def _parse(body: bytes, max_boxes: int) -> tuple[bytes, Any, Any]:
  """(image bytes, boxes, detections) of a JSON request; RequestError otherwise."""
  try:
    doc = json.loads(body)
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise RequestError(400, "body", f"body: not valid JSON ({e})") from e
  if not isinstance(doc, dict):
    raise RequestError(400, "body", "body: expected a JSON object with 'image' and 'boxes', "
                                    f"got a JSON {type(doc).__name__}")
  unknown = sorted(set(doc) - set(FIELDS))
  if unknown:
    raise RequestError(422, unknown[0], f"{unknown[0]}: unknown field (known: "
                                        f"{', '.join(FIELDS)})")
  for field in ("image", "boxes"):
    if field not in doc:
      raise RequestError(422, field, f"{field}: missing")
  image = doc["image"]
  if not isinstance(image, str):
    raise RequestError(422, "image", "image: expected a base64 string of the image file, "
                                     f"got {type(image).__name__}")
  if image.startswith("data:") and "," in image:
    image = image.split(",", 1)[1]
  try:
    data = base64.b64decode(image, validate=True)
  except (binascii.Error, ValueError) as e:
    raise RequestError(422, "image", f"image: not valid base64 ({e})") from e
  boxes = doc["boxes"]
  if isinstance(boxes, list) and len(boxes) > max_boxes:
    raise RequestError(422, "boxes", f"boxes: {len(boxes)} boxes, at most {max_boxes} per "
                                     "request (serve.max_boxes)")
  return data, boxes, doc.get("detections")


def make_app(captioner: captioner_lib.Captioner, batcher: batcher_lib.Batcher,
             settings: ml_collections.ConfigDict) -> fastapi.FastAPI:
  """The FastAPI app over a loaded `Captioner` and its `Batcher`.

  Args:
    captioner: the compiled model.
    batcher: collects requests' rows into device batches.
    settings: the config's `serve` section (max_bytes, max_boxes).
  """
  app = fastapi.FastAPI(title="AlignCap", docs_url=None, redoc_url=None, openapi_url=None)
  with open(PAGE_FILE, encoding="utf-8") as f:
    page = f.read()

  @app.get("/", response_class=responses.HTMLResponse)
  def index() -> str:
    return page

  @app.get("/healthz")
  def healthz() -> dict[str, Any]:
    return {"status": "ready", "buckets": captioner.buckets, "max_batch": batcher.max_batch,
            **batcher.stats}

  @app.post("/v1/caption")
  async def caption(request: fastapi.Request):
    try:
      body = await _read_body(request, settings.max_bytes)
      data, boxes, detections = _parse(body, settings.max_boxes)
      try:
        prepared = await run_in_threadpool(captioner.prepare, data, boxes, detections)
      except captioner_lib.InputError as e:
        raise RequestError(422, e.field, str(e)) from e
      try:
        future = batcher.submit(prepared.rows)
      except batcher_lib.QueueFull as e:
        raise RequestError(503, None, str(e)) from e
      outputs = await asyncio.wrap_future(future)
    except RequestError as e:
      return _error(e.status, e.field, e.message)
    except Exception as e:  # pylint: disable=broad-except
      logging.exception("caption request failed")
      return _error(500, None, f"internal error: {type(e).__name__}: {e}")
    return {"results": [{"box": box, **out} for box, out in zip(prepared.boxes, outputs)]}

  return app


def _bind(host: str, port: int) -> socket.socket:
  family = socket.AF_INET6 if ":" in host else socket.AF_INET
  sock = socket.socket(family, socket.SOCK_STREAM)
  sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
  try:
    sock.bind((host, port))
  except OSError as e:
    sock.close()
    raise ValueError(f"--host {host} --port {port}: cannot listen there ({e.strerror})") from e
  return sock   # uvicorn listens on it once the app has started


def serve(config: ml_collections.ConfigDict, workdir: str, *, host: str = "127.0.0.1",
          port: int = 8080, model_lib: Any = None, pipeline_lib: Any = None) -> None:
  """`--mode serve`: loads and compiles, then answers until SIGINT/SIGTERM.

  Prints `serving on http://HOST:PORT/` once ready (with `--port 0`, the port the
  system chose).
  """
  import uvicorn  # pylint: disable=g-import-not-at-top
  sock = _bind(host, port)
  captioner = captioner_lib.Captioner.load(workdir, config, mode="serve", model_lib=model_lib,
                                           pipeline_lib=pipeline_lib)
  s = captioner.config.serve
  batcher = batcher_lib.Batcher(captioner.run, max_batch=s.max_batch,
                                max_wait_ms=s.max_wait_ms, max_queue=s.max_queue)
  app = make_app(captioner, batcher, s)
  bound = sock.getsockname()
  url_host = f"[{bound[0]}]" if sock.family == socket.AF_INET6 else bound[0]
  ready = (f"serving on http://{url_host}:{bound[1]}/ (batch buckets {captioner.buckets}, "
           f"max_batch {s.max_batch}, max_wait_ms {s.max_wait_ms:g})")

  class Server(uvicorn.Server):
    async def startup(self, sockets=None):
      await super().startup(sockets=sockets)
      print(ready, flush=True)

  server = Server(uvicorn.Config(app, log_level="warning", access_log=False))
  try:
    server.run(sockets=[sock])
  finally:
    batcher.close()
    sock.close()
