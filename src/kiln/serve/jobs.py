"""Jobs: the serving core, with no HTTP in it.

A job is one request's work (an id, the client that owns it, its parameters, progress, the
latest latents for a preview, a cancel flag, the result). Each served model has a `JobQueue`:
a bounded FIFO and one worker thread that runs its jobs one at a time (the sessions already
use every core), so the event loop stays free for health, progress and interrupt. Jobs that
arrive close together and can share a call (captions with the same options) run as one
batch. Every API dialect only translates its fields into a job and back.

A job is found by its id and its owner together: one client can never see or stop another's.
"""

from __future__ import annotations

import collections
import contextlib
import enum
import logging
import threading
import time
import uuid
from collections.abc import Callable, Hashable, Iterable
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass, field
from typing import Any

from kiln.errors import KilnError

log = logging.getLogger("kiln.serve")

FINISHED_JOBS_KEPT = 512  # finished jobs stay readable by id until this many newer ones end


class JobState(enum.Enum):
    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"
    TIMED_OUT = "timed_out"

    @property
    def finished(self) -> bool:
        return self not in (JobState.QUEUED, JobState.RUNNING)


class QueueFullError(KilnError):
    """The model's queue holds as many jobs as it may; the client should retry later."""

    def __init__(self, message: str, retry_after: int) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class ShuttingDownError(KilnError):
    """The server is stopping and takes no new jobs."""


class JobNotFoundError(KilnError):
    """No job with that id belongs to the caller (whether it exists is not revealed)."""


class JobStopped(Exception):
    """Raised inside a running job (between denoising steps) once it is cancelled."""


@dataclass(eq=False)
class Job:
    kind: str
    model: str
    owner: str
    params: dict[str, Any]
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    state: JobState = JobState.QUEUED
    created: float = field(default_factory=time.time)
    started: float | None = None
    finished: float | None = None
    step: int = 0
    steps: int = 0
    latents: Any = None  # the newest latents tensor, turned into a preview only when asked
    result: Any = None
    error: str | None = None
    error_status: int = 500  # the HTTP status its error maps to (4xx: the request's fault)
    future: Future = field(default_factory=Future, repr=False)
    _stop: JobState | None = None

    def cancel(self, reason: JobState = JobState.CANCELLED) -> bool:
        """Ask the job to stop (between steps, or before it starts); False if already over."""
        if self.state.finished:
            return False
        self._stop = reason
        return True

    @property
    def stopping(self) -> bool:
        return self._stop is not None

    def check(self) -> None:
        """Called between steps by the runner: raises `JobStopped` once cancelled."""
        if self._stop is not None:
            raise JobStopped(self._stop.value)

    def on_step(self, step: int, total: int, latents: Any = None) -> None:
        self.step, self.steps = step, total
        if latents is not None:
            self.latents = latents
        self.check()

    def finish(self, state: JobState, result: Any = None, error: str | None = None) -> None:
        self.state, self.result, self.error = state, result, error
        self.finished = time.time()
        self.latents = None
        with contextlib.suppress(InvalidStateError):  # a future already resolved stays so
            self.future.set_result(self)

    def to_dict(self, position: int | None = None) -> dict[str, Any]:
        return {
            "id": self.id,
            "kind": self.kind,
            "model": self.model,
            "state": self.state.value,
            "queue_position": position,
            "step": self.step,
            "steps": self.steps,
            "progress": self.progress,
            "created": self.created,
            "started": self.started,
            "finished": self.finished,
            "error": self.error,
        }

    @property
    def progress(self) -> float:
        if self.state is JobState.DONE:
            return 1.0
        return self.step / self.steps if self.steps else 0.0


Runner = Callable[[list[Job]], None]  # runs a batch; sets each job's result via finish()


class JobQueue:
    """One model's bounded FIFO and the worker thread that runs its jobs one batch at a time.

    `batch_key(job)` returns a key for jobs that may share one call (None: never batched);
    up to `max_batch` such jobs waiting within `batch_window` seconds of the first run together.
    """

    def __init__(
        self,
        model: str,
        runner: Runner,
        max_queue: int,
        batch_key: Callable[[Job], Hashable | None] = lambda job: None,
        max_batch: int = 1,
        batch_window: float = 0.0,
        on_finish: Callable[[Job], None] = lambda job: None,
    ) -> None:
        self.model = model
        self.runner = runner
        self.max_queue = max_queue
        self.batch_key = batch_key
        self.max_batch = max_batch
        self.batch_window = batch_window
        self.on_finish = on_finish
        self.waiting: collections.deque[Job] = collections.deque()
        self.running: list[Job] = []
        self.accepting = True
        self._lock = threading.Condition()
        self._recent_seconds: collections.deque[float] = collections.deque(maxlen=16)
        self._worker = threading.Thread(target=self._work, name=f"kiln-jobs-{model}", daemon=True)
        self._worker.start()

    def submit(self, job: Job) -> None:
        with self._lock:
            if not self.accepting:
                raise ShuttingDownError("the server is shutting down; no new jobs")
            if len(self.waiting) >= self.max_queue:
                raise QueueFullError(
                    f"the queue of {self.model} is full ({self.max_queue} waiting); retry later",
                    self.retry_after(),
                )
            self.waiting.append(job)
            self._lock.notify_all()

    def retry_after(self) -> int:
        """Seconds until a slot is likely free: the recent job time times the jobs ahead."""
        typical = (
            sum(self._recent_seconds) / len(self._recent_seconds) if self._recent_seconds else 1
        )
        return max(1, round(typical * max(1, len(self.waiting)) / max(1, self.max_batch)))

    def position(self, job: Job) -> int | None:
        """0 while running, 1 for the next to run, ...; None once finished."""
        with self._lock:
            if job in self.running:
                return 0
            for index, waiting in enumerate(self.waiting, start=1):
                if waiting is job:
                    return index
        return None

    @property
    def depth(self) -> int:
        return len(self.waiting) + len(self.running)

    def close(self, grace: float) -> None:
        """Stop taking jobs; let the running batch finish within `grace` s; fail the rest."""
        with self._lock:
            self.accepting = False
            pending = list(self.waiting)
            self.waiting.clear()
        for job in pending:
            self._finish(job, JobState.CANCELLED, error="the server shut down before it ran")
        self._worker.join(timeout=grace)
        for job in list(self.running):
            job.cancel()
        self._worker.join(timeout=5)

    # -------------------------------------------------------------------------- worker

    def _work(self) -> None:
        while True:
            batch = self._next_batch()
            if batch is None:
                return
            started = time.time()
            for job in batch:
                job.state, job.started = JobState.RUNNING, started
            try:
                self.runner(batch)
            except JobStopped:
                pass
            except KilnError as exc:
                for job in batch:
                    job.error_status = getattr(exc, "http_status", 422)
                self._finish_all(batch, JobState.FAILED, str(exc))
            except Exception as exc:  # a kiln bug: keep the server up, log the traceback
                log.exception("job %s failed", batch[0].id)
                self._finish_all(batch, JobState.FAILED, f"{type(exc).__name__}: {exc}")
            for job in batch:
                if job.state.finished:
                    self.on_finish(job)
                else:  # a runner that stopped early leaves its stopped jobs unfinished
                    self._finish(job, job._stop or JobState.CANCELLED, error="stopped")
            self._recent_seconds.append(time.time() - started)
            with self._lock:
                self.running = []

    def _next_batch(self) -> list[Job] | None:
        with self._lock:
            while True:
                while not self.waiting and self.accepting:
                    self._lock.wait(timeout=1.0)
                if not self.waiting:
                    return None
                first = self.waiting.popleft()
                if first.stopping:  # cancelled while it waited
                    self._finish(first, first._stop or JobState.CANCELLED, error="cancelled")
                    continue
                break
            key = self.batch_key(first)
            if key is not None and self.max_batch > 1 and self.batch_window > 0:
                self._lock.wait(timeout=self.batch_window)  # let close neighbours arrive
            batch = [first]
            if key is not None:
                for job in list(self.waiting):
                    if len(batch) >= self.max_batch:
                        break
                    if not job.stopping and self.batch_key(job) == key:
                        self.waiting.remove(job)
                        batch.append(job)
            self.running = batch
            return batch

    def _finish(self, job: Job, state: JobState, result: Any = None, error: str | None = None):
        job.finish(state, result, error)
        self.on_finish(job)

    def _finish_all(self, jobs: Iterable[Job], state: JobState, error: str) -> None:
        """Mark failed what the runner did not finish (on_finish comes after, in `_work`)."""
        for job in jobs:
            if not job.state.finished:
                stopped = job._stop
                job.finish(stopped or state, error=error if stopped is None else "stopped")


class JobBoard:
    """Every model's queue and every job by id, each readable only by its owner."""

    def __init__(self) -> None:
        self.queues: dict[str, JobQueue] = {}
        self._jobs: collections.OrderedDict[str, Job] = collections.OrderedDict()
        self._finished: collections.deque[str] = collections.deque()
        self._lock = threading.Lock()

    def add_queue(self, queue: JobQueue) -> None:
        previous = queue.on_finish

        def finished(job: Job) -> None:
            previous(job)
            self._retire(job)

        queue.on_finish = finished
        self.queues[queue.model] = queue

    def submit(self, job: Job) -> Job:
        with self._lock:
            if job.id in self._jobs:
                raise KilnError(f"a job with id {job.id} exists already")
            self._jobs[job.id] = job
        try:
            self.queues[job.model].submit(job)
        except KilnError:
            with self._lock:
                self._jobs.pop(job.id, None)
            raise
        return job

    def get(self, job_id: str, owner: str) -> Job | None:
        """The job, if it exists and belongs to `owner` (else None: nothing is revealed)."""
        job = self._jobs.get(job_id)
        return job if job is not None and job.owner == owner else None

    def latest(self, owner: str, *, active: bool = False) -> Job | None:
        """The owner's newest job (running or queued first when `active`)."""
        with self._lock:
            jobs = [j for j in reversed(self._jobs.values()) if j.owner == owner]
        if active:
            jobs = [j for j in jobs if not j.state.finished]
            running = [j for j in jobs if j.state is JobState.RUNNING]
            jobs = running + jobs
        return jobs[0] if jobs else None

    def position(self, job: Job) -> int | None:
        return self.queues[job.model].position(job)

    def active_count(self, owner: str | None = None) -> int:
        return sum(
            1
            for j in list(self._jobs.values())
            if not j.state.finished and (owner is None or j.owner == owner)
        )

    def close(self, grace: float) -> None:
        deadline = time.time() + grace
        for queue in self.queues.values():
            queue.accepting = False
        for queue in self.queues.values():
            queue.close(max(0.0, deadline - time.time()))

    def _retire(self, job: Job) -> None:
        with self._lock:
            self._finished.append(job.id)
            while len(self._finished) > FINISHED_JOBS_KEPT:
                self._jobs.pop(self._finished.popleft(), None)
