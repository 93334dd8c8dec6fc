"""One model, one worker thread, a bounded first-come-first-served queue in front of it.

llama.cpp and onnxruntime-genai run one generation at a time on a model here (no continuous
batching), so requests queue: a full queue answers 503 at once (with Retry-After) instead of
making clients wait behind work they cannot see. Every job carries a cancel flag and a
deadline that the runtime checks before each token (`stop_when`), so a client that goes away,
a request past its time limit or a shutting-down server stops its generation within a token.
Events cross from the worker thread to the event loop through `loop.call_soon_threadsafe`.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

from edgekit.errors import EdgekitError


@dataclass
class Job:
    """One request's generation. `work(stop_when)` runs in the worker thread and returns
    the whole text or an iterator of pieces; events reach `events` on the loop:
    ("piece", text), ("done", whole text or None, finish reason, usage), ("error", status, message).
    A request past its deadline ends like one that reached max_tokens: finish reason "length"."""
    work: Callable
    loop: asyncio.AbstractEventLoop
    deadline: float  # time.monotonic() past which the generation stops
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)
    timed_out: bool = False

    def emit(self, *event) -> None:
        self.loop.call_soon_threadsafe(self.events.put_nowait, event)

    def should_stop(self) -> bool:
        if time.monotonic() > self.deadline:
            self.timed_out = True
        return self.cancelled.is_set() or self.timed_out


class Worker:
    def __init__(self, model, queue_size: int):
        self.model, self.size = model, queue_size
        self.pending: deque[Job] = deque()  # waiting jobs, first come first served
        self.cond = threading.Condition()
        self.current: Job | None = None
        self.stopping = threading.Event()
        self.stats = {"done": 0, "cancelled": 0, "timed_out": 0, "failed": 0, "tokens": 0}  # for /health
        self.thread = threading.Thread(target=self._loop, name="edgekit-generate", daemon=True)
        self.thread.start()

    def queued(self) -> int:
        with self.cond:
            return len(self.pending)

    def submit(self, job: Job) -> bool:
        """Queue the job; False when `queue_size` jobs already wait or the server is stopping."""
        with self.cond:
            if self.stopping.is_set() or len(self.pending) >= self.size:
                return False
            self.pending.append(job)
            self.cond.notify()
            return True

    def cancel(self, job: Job) -> None:
        """The job's client is gone: a waiting job gives its place up at once; a running one
        stops within a token."""
        job.cancelled.set()
        with self.cond:
            if job in self.pending:
                self.pending.remove(job)
                self.stats["cancelled"] += 1

    def stop(self) -> None:
        """Shutdown: the running generation stops within a token, waiting jobs fail with 503."""
        self.stopping.set()
        with self.cond:
            if self.current is not None:
                self.current.cancelled.set()
            while self.pending:
                self.pending.popleft().emit("error", 503, "the server is shutting down")
            self.cond.notify_all()

    def _loop(self) -> None:
        while True:
            with self.cond:
                while not self.pending and not self.stopping.is_set():
                    self.cond.wait()
                if self.stopping.is_set():
                    return
                job = self.current = self.pending.popleft()
            try:
                self._run(job)
            finally:
                with self.cond:
                    self.current = None

    def _run(self, job: Job) -> None:
        if job.should_stop():  # its client left, or its time ran out, while it waited
            self.stats["timed_out" if job.timed_out else "cancelled"] += 1
            job.emit("error", 503 if job.timed_out else 499, "timed out waiting in the queue" if job.timed_out
                     else "the client went away")
            return
        try:
            result = job.work(job.should_stop)
            if not isinstance(result, str):  # a stream: pieces as they come
                for piece in result:
                    if job.should_stop():
                        break
                    self.stats["tokens"] += 1
                    job.emit("piece", piece)
                result = None
            else:
                self.stats["tokens"] += (self.model.last_usage or {}).get("completion_tokens", 0)
        except EdgekitError as e:  # a prompt that does not fit, a model without a chat template
            job.emit("error", 400, str(e))
            return
        except Exception as e:  # noqa: BLE001  the runtime failed: this client gets a 500, the server goes on
            self.stats["failed"] += 1
            job.emit("error", 500, f"generation failed: {type(e).__name__}: {str(e)[:300]}")
            return
        key = "cancelled" if job.cancelled.is_set() else "timed_out" if job.timed_out else "done"
        self.stats[key] += 1
        if self.stopping.is_set():
            job.emit("error", 503, "the server is shutting down")
            return
        finish = "length" if job.timed_out else (self.model.last_finish_reason or "stop")
        job.emit("done", result, finish, self.model.last_usage or {})
