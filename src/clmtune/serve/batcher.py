"""Requests that arrive together run together: an asyncio queue in front of one worker thread that owns the model.

The event loop never runs the model: the decode loop runs in a single-thread executor (torch releases the GIL),
so ``/health`` and new requests are answered while it runs. Generation is continuously batched: the decode loop
takes waiting requests (up to ``max_batch`` rows in all) before every token, so a request that arrives while
others are being decoded joins them at the next step. Classification requests wait for the decode loop to drain
and are scored together. The number of requests waiting or running is bounded
(``max_queue``): one more is refused at once with ``QueueFull`` (HTTP 429), never left to hang. A request whose
client goes away is cancelled: dropped from the queue, or from its running batch at the next token, and its
place is freed.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from clmtune.decoding import Row, Sampling
from clmtune.serve.engine import Engine

log = logging.getLogger("clmtune")


class QueueFull(Exception):
    """More requests are waiting or running than the server takes."""


class Job:
    """One request: its rows (prompts x choices) for generation, or its prompts for classification. Events come
    out of ``events``: ``("text", choice, delta)``, ``("done", choice, finish_reason)``, ``("result", value)``,
    ``("error", message)``; every row sends exactly one ``done``."""

    def __init__(self, kind: str, size: int):
        self.kind, self.size = kind, size
        self.events: asyncio.Queue = asyncio.Queue()
        self.rows: list[Row] = []
        self.prompts: list[list[int]] = []
        self.cancelled = False
        self.released = False
        self._open = size

    def cancel(self) -> None:
        self.cancelled = True
        for r in self.rows:
            r.cancelled.set()


class Batcher:
    def __init__(self, engine: Engine, max_batch: int = 16, max_queue: int = 64, window_s: float = 0.002):
        self.engine, self.max_batch, self.max_queue, self.window_s = engine, max_batch, max_queue, window_s
        self._waiting: collections.deque[Job] = collections.deque()  # shared with the worker: under _lock
        self._lock = threading.Lock()
        self._running: list[Job] = []  # generate jobs handed to the decode loop, until their rows end
        self._wake = asyncio.Event()
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="clmtune-model")
        self._task: asyncio.Task | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.in_flight = 0
        self.stats = {"requests": 0, "batches": 0, "rows": 0, "cancelled": 0, "refused": 0, "generated_tokens": 0,
                      "max_batch_rows": 0}

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._task = asyncio.create_task(self._run_forever())

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        self._executor.shutdown(wait=True, cancel_futures=True)

    # ---- submitting (event loop) ----
    def _admit(self, job: Job) -> Job:
        if self.in_flight >= self.max_queue:
            self.stats["refused"] += 1
            raise QueueFull(f"the server is busy: {self.in_flight} requests are waiting or running (limit "
                            f"{self.max_queue}); retry later")
        self.in_flight += 1
        self.stats["requests"] += 1
        with self._lock:
            self._waiting.append(job)
        self._wake.set()
        return job

    def submit_generate(self, prompts: list[list[int]], sampling: Sampling, n: int) -> Job:
        """A job with ``len(prompts) * n`` rows; choice ``i * n + j`` is the j-th continuation of prompt i."""
        job = Job("generate", len(prompts) * n)
        loop = self._loop

        def on_text(row: Row, delta: str) -> None:
            loop.call_soon_threadsafe(job.events.put_nowait, ("text", row.tag, delta))

        def on_done(row: Row) -> None:
            loop.call_soon_threadsafe(self._row_done, job, row)

        for i, ids in enumerate(prompts):
            for j in range(n):
                job.rows.append(Row(self.engine, ids, sampling, j, on_text, on_done, tag=i * n + j))
        return self._admit(job)

    def submit_classify(self, prompts: list[list[int]]) -> Job:
        job = Job("classify", len(prompts))
        job.prompts = prompts
        return self._admit(job)

    def cancel(self, job: Job) -> None:
        """The client went away: drop the job if it still waits, else stop its rows at their next token."""
        if job.released:
            return
        self.stats["cancelled"] += 1
        job.cancel()
        with self._lock:
            waiting = job in self._waiting
            if waiting:
                self._waiting.remove(job)
        if waiting:
            self._release(job)

    def _row_done(self, job: Job, row: Row) -> None:
        self.stats["generated_tokens"] += len(row.new_ids)
        job.events.put_nowait(("done", row.tag, row.finish_reason))
        job._open -= 1
        if job._open == 0:
            self._release(job)

    def _release(self, job: Job) -> None:
        if not job.released:
            job.released = True
            self.in_flight -= 1
            if job in self._running:
                self._running.remove(job)

    # ---- running ----
    def _intake(self, room: int) -> list[Row]:
        """Worker thread: the rows of the generate jobs at the head of the queue that fit in ``room`` rows (FIFO: a
        classification job at the head stops the intake, so the decode loop drains and it gets its turn)."""
        taken: list[Job] = []
        with self._lock:
            while self._waiting and self._waiting[0].kind == "generate" and self._waiting[0].size <= room:
                job = self._waiting.popleft()
                taken.append(job)
                room -= job.size
        if taken:
            self._loop.call_soon_threadsafe(self._running.extend, taken)
        rows = [r for job in taken for r in job.rows]
        self.stats["rows"] += len(rows)
        return rows

    def _note_batch(self, rows: int) -> None:
        self.stats["max_batch_rows"] = max(self.stats["max_batch_rows"], rows)

    def _take_classify(self) -> list[Job]:
        with self._lock:
            jobs = [j for j in self._waiting if j.kind == "classify"]
            for job in jobs:
                self._waiting.remove(job)
        return jobs

    async def _run_forever(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            with self._lock:
                head = self._waiting[0].kind if self._waiting else None
            if head is None:
                self._wake.clear()
                await self._wake.wait()
                await asyncio.sleep(self.window_s)  # let requests sent together arrive together
                continue
            self.stats["batches"] += 1
            batch: list[Job] = []
            try:
                if head == "generate":
                    await loop.run_in_executor(self._executor, lambda: self.engine.run(
                        intake=self._intake, max_rows=self.max_batch, on_batch=self._note_batch))
                    await asyncio.sleep(0)  # let the rows' last callbacks run
                else:
                    batch = self._take_classify()
                    prompts = [p for job in batch for p in job.prompts]
                    result = await loop.run_in_executor(self._executor, self.engine.classify, prompts)
                    start = 0
                    for job in batch:
                        job.events.put_nowait(("result", result[start:start + job.size]))
                        start += job.size
                        self._release(job)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # a failing batch fails its requests, never the server
                log.exception("serve: a batch failed")
                await asyncio.sleep(0)
                for job in batch + list(self._running):
                    if not job.released:
                        job.events.put_nowait(("error", f"{type(exc).__name__}: {exc}"))
                        self._release(job)

    def health(self) -> dict[str, Any]:
        return {"in_flight": self.in_flight, "waiting": len(self._waiting), "max_queue": self.max_queue,
                "max_batch": self.max_batch, **self.stats}
