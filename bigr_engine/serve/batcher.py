"""Dynamic batching (the vocabulary of Triton's dynamic batcher): jobs with the same key merge into one model call of
at most `max_batch` images, waiting at most `max_wait_s` for company; a bounded queue sheds load; jobs past their
deadline or cancelled by their client are dropped before they run.

One worker thread runs the model, so the model sees one call at a time and the event loop never blocks on it.
"""
from __future__ import annotations

import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field


class QueueFull(Exception):
    """The queue holds `max_queue` images already: answer 429."""


class DeadlineExceeded(Exception):
    """The job's deadline passed before it ran: answer 504."""


class ShuttingDown(Exception):
    """The server stopped accepting work: answer 503."""


@dataclass
class Job:
    """Part of a request: `size` images of one compatibility `key`. `payload` is what run_batch needs for them."""
    key: tuple
    size: int
    payload: object
    deadline: float                      # time.monotonic() after which the job is dropped
    enqueued: float = field(default_factory=time.monotonic)
    future: Future = field(default_factory=Future)


class Batcher:
    """run_batch(key, [payload, ...]) -> [result per payload] runs on the worker thread; its exception fails only
    that batch's jobs. `metrics` (serve.metrics.Metrics) gets queue depth, batch sizes, queue wait and compute time."""

    def __init__(self, run_batch, max_batch: int, max_wait_s: float, max_queue: int, metrics=None,
                 batchable=lambda key: True):
        self.run_batch, self.max_batch, self.max_wait_s, self.max_queue = run_batch, max_batch, max_wait_s, max_queue
        self.metrics, self.batchable = metrics, batchable
        self._queue: list[Job] = []
        self._cond = threading.Condition()
        self._closing = False
        self._queued_images = 0
        self._free_since = 0.0   # when the worker finished its last batch
        self._worker = threading.Thread(target=self._loop, name="bigr-batcher", daemon=True)
        self._worker.start()

    # ---- the clients' side ------------------------------------------------------------------------------------------
    def submit(self, job: Job) -> Future:
        with self._cond:
            if self._closing:
                raise ShuttingDown("the server is shutting down and takes no new work")
            if self._queued_images + job.size > self.max_queue:
                raise QueueFull(f"the queue is full ({self._queued_images} images waiting, limit {self.max_queue})")
            self._queue.append(job)
            self._queued_images += job.size
            self._gauge()
            self._cond.notify()
        return job.future

    @property
    def queued_images(self) -> int:
        return self._queued_images

    def close(self, timeout: float | None = None) -> None:
        """Refuse new jobs, finish the queued ones, stop the worker."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        self._worker.join(timeout)

    # ---- the worker -------------------------------------------------------------------------------------------------
    def _gauge(self):
        if self.metrics is not None:
            self.metrics.set("queue_images", self._queued_images)

    def _take(self) -> list[Job] | None:
        """The next batch: the oldest job and the later ones of its key, up to max_batch images. A batch that is not
        full waits up to max_wait_s for company, counted from the later of the oldest job's arrival and the end of the
        previous batch: jobs that queued while the worker was busy still give the clients just answered (who send
        their next request within a few milliseconds) a chance to join. None when closing and the queue is empty."""
        with self._cond:
            while not self._queue:
                if self._closing:
                    return None
                self._cond.wait()
            first = self._queue[0]
            while True:
                same = [j for j in self._queue if j.key == first.key] if self.batchable(first.key) else [first]
                if sum(j.size for j in same) >= self.max_batch or self._closing or not self.batchable(first.key):
                    break
                left = max(first.enqueued, self._free_since) + self.max_wait_s - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(left)
            batch, n = [], 0
            for j in same:
                if batch and n + j.size > self.max_batch:
                    break
                batch.append(j)
                n += j.size
            for j in batch:
                self._queue.remove(j)
                self._queued_images -= j.size
            self._gauge()
            return batch

    def _loop(self):
        while True:
            batch = self._take()
            if batch is None:
                return
            now = time.monotonic()
            live = []
            for j in batch:
                if not j.future.set_running_or_notify_cancel():     # the client went away: drop its work
                    self._count("jobs_dropped_total", reason="cancelled")
                elif now > j.deadline:
                    j.future.set_exception(DeadlineExceeded("the request passed its deadline while queued"))
                    self._count("jobs_dropped_total", reason="deadline")
                else:
                    live.append(j)
            if not live:
                continue
            if self.metrics is not None:
                for j in live:
                    self.metrics.observe("queue_wait_seconds", now - j.enqueued)
                self.metrics.observe("batch_images", sum(j.size for j in live))
            t = time.monotonic()
            try:
                results = self.run_batch(live[0].key, [j.payload for j in live])
            except BaseException as e:  # fail this batch only; the worker keeps serving
                for j in live:
                    j.future.set_exception(e)
                self._count("batches_failed_total")
                continue
            finally:
                if self.metrics is not None:
                    self.metrics.observe("compute_seconds", time.monotonic() - t)
            for j, r in zip(live, results):
                j.future.set_result(r)
            self._free_since = time.monotonic()

    def _count(self, name, **labels):
        if self.metrics is not None:
            self.metrics.inc(name, **labels)
