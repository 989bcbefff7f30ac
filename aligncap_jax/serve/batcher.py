"""Batching across clients: requests' regions share device batches.

Each request is a job of n batch rows (its boxes). One worker thread takes the
first waiting job, then keeps collecting jobs for up to `max_wait_ms` or until
`max_batch` rows are together, and runs them as one device batch; a job that
would overflow the batch waits for the next one (a single job larger than
`max_batch` is split over several). Each job's outputs go back to its own
future, in row order. The queue is bounded: `submit` raises `QueueFull` when
`max_queue` jobs are waiting.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import queue
import threading
import time
from typing import Any, Callable

import numpy as np

RunFn = Callable[[dict[str, np.ndarray], int], list[Any]]


class QueueFull(RuntimeError):
  """The bounded request queue is full (the service answers 503)."""


@dataclasses.dataclass
class _Job:
  rows: dict[str, np.ndarray]
  size: int
  future: concurrent.futures.Future


class Batcher:
  """Collects jobs from many threads into device batches run on one thread.

  Args:
    run_fn: `(rows, max_rows) -> outputs`, one output per row, in order
      (`Captioner.run`).
    max_batch: most rows per device batch.
    max_wait_ms: how long the first job of a batch waits for company.
    max_queue: most jobs waiting; more raise `QueueFull`.
  """

  def __init__(self, run_fn: RunFn, *, max_batch: int, max_wait_ms: float, max_queue: int):
    self._run = run_fn
    self.max_batch, self.max_wait_s = int(max_batch), float(max_wait_ms) / 1000.0
    self._queue: queue.Queue[_Job] = queue.Queue(maxsize=int(max_queue))
    self._carry: _Job | None = None
    self._stop = threading.Event()
    self._lock = threading.Lock()
    self._stats = {"requests": 0, "regions": 0, "device_batches": 0, "rejected": 0}
    self._thread = threading.Thread(target=self._loop, name="aligncap-batcher", daemon=True)
    self._thread.start()

  @property
  def stats(self) -> dict[str, int]:
    """Requests and regions served, device batches run, requests rejected (queue
    full) and requests queued now."""
    with self._lock:
      return {**self._stats, "queued": self._queue.qsize()}

  def submit(self, rows: dict[str, np.ndarray]) -> concurrent.futures.Future:
    """Queues one request's rows; the future resolves to their outputs, in order."""
    if self._stop.is_set():
      raise RuntimeError("the batcher is closed")
    job = _Job(rows, len(next(iter(rows.values()))), concurrent.futures.Future())
    try:
      self._queue.put_nowait(job)
    except queue.Full:
      with self._lock:
        self._stats["rejected"] += 1
      raise QueueFull(f"the request queue is full ({self._queue.maxsize} waiting); "
                      "retry later") from None
    return job.future

  def close(self) -> None:
    """Stops the worker; jobs still waiting fail with RuntimeError."""
    self._stop.set()
    self._thread.join()
    pending = [self._carry] if self._carry else []
    while True:
      try:
        pending.append(self._queue.get_nowait())
      except queue.Empty:
        break
    for job in pending:
      job.future.set_exception(RuntimeError("the server is shutting down"))

  def _collect(self) -> list[_Job]:
    """The next device batch's jobs ([] when nothing arrived within 0.1 s)."""
    first, self._carry = self._carry, None
    if first is None:
      try:
        first = self._queue.get(timeout=0.1)
      except queue.Empty:
        return []
    jobs, rows = [first], first.size
    deadline = time.monotonic() + self.max_wait_s
    while rows < self.max_batch:
      try:
        job = self._queue.get(timeout=max(deadline - time.monotonic(), 0.0))
      except queue.Empty:
        break
      if rows + job.size > self.max_batch:
        self._carry = job
        break
      jobs.append(job)
      rows += job.size
    return jobs

  def _loop(self) -> None:
    while not self._stop.is_set():
      jobs = self._collect()
      if not jobs:
        continue
      rows = {k: np.concatenate([j.rows[k] for j in jobs]) for k in jobs[0].rows}
      try:
        outputs = self._run(rows, self.max_batch)
        if len(outputs) != sum(j.size for j in jobs):
          raise RuntimeError(f"{len(outputs)} outputs for {sum(j.size for j in jobs)} rows")
      except Exception as e:  # pylint: disable=broad-except
        for j in jobs:
          j.future.set_exception(e)
        continue
      n = sum(j.size for j in jobs)
      with self._lock:
        self._stats["requests"] += len(jobs)
        self._stats["regions"] += n
        self._stats["device_batches"] += -(-n // self.max_batch)
      start = 0
      for j in jobs:
        j.future.set_result(outputs[start:start + j.size])
        start += j.size
