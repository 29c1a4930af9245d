"""The serving core without HTTP: queue bounds, cancelling, owners, batching, error statuses."""

import threading
import time

import pytest

from kiln.errors import InvalidRequestError
from kiln.serve.jobs import Job, JobBoard, JobQueue, JobState, QueueFullError, ShuttingDownError
from kiln.serve.models import NonFiniteOutputError


def _board(runner, **options):
    board = JobBoard()
    board.add_queue(JobQueue("m", runner, **{"max_queue": 2, **options}))
    return board


def _wait(job, timeout=10):
    return job.future.result(timeout)


def test_jobs_run_in_order_and_a_full_queue_refuses_with_retry_after():
    gate, order = threading.Event(), []

    def runner(jobs):
        gate.wait(10)
        order.append(jobs[0].params["n"])
        jobs[0].finish(JobState.DONE, jobs[0].params["n"])

    board = _board(runner)
    first = board.submit(Job("t", "m", "a", {"n": 1}))
    while first.state is not JobState.RUNNING:
        time.sleep(0.001)
    waiting = [board.submit(Job("t", "m", "a", {"n": n})) for n in (2, 3)]
    assert [board.position(j) for j in (first, *waiting)] == [0, 1, 2]
    with pytest.raises(QueueFullError) as full:
        board.submit(Job("t", "m", "a", {"n": 4}))
    assert full.value.retry_after >= 1
    gate.set()
    assert [_wait(j).result for j in (first, *waiting)] == [1, 2, 3] and order == [1, 2, 3]


def test_a_job_cancelled_while_waiting_never_runs_and_one_running_stops_at_a_step():
    started, ran = threading.Event(), []

    def runner(jobs):
        job = jobs[0]
        ran.append(job.params["n"])
        for step in range(1000):
            started.set()
            threading.Event().wait(0.001)
            job.on_step(step + 1, 1000)
        job.finish(JobState.DONE)

    board = _board(runner)
    running = board.submit(Job("t", "m", "a", {"n": 1}))
    queued = board.submit(Job("t", "m", "a", {"n": 2}))
    started.wait(10)
    assert queued.cancel() and running.cancel(JobState.TIMED_OUT)
    assert _wait(running).state is JobState.TIMED_OUT and 0 < running.step < 1000
    assert _wait(queued).state is JobState.CANCELLED and ran == [1]
    assert not running.cancel()  # already over


def test_a_job_is_found_only_by_its_owner():
    board = _board(lambda jobs: jobs[0].finish(JobState.DONE))
    job = board.submit(Job("t", "m", "alice", {}))
    _wait(job)
    assert board.get(job.id, "alice") is job
    assert board.get(job.id, "bob") is None
    assert board.latest("bob") is None and board.latest("alice") is job


def test_jobs_with_the_same_key_share_a_batch():
    gate, batches = threading.Event(), []

    def runner(jobs):
        gate.wait(10)
        batches.append([j.params["n"] for j in jobs])
        for job in jobs:
            job.finish(JobState.DONE)

    board = _board(
        runner, max_queue=8, batch_key=lambda j: j.params["k"], max_batch=3, batch_window=0.01
    )
    jobs = [board.submit(Job("c", "m", "a", {"n": n, "k": n > 0})) for n in range(5)]
    gate.set()
    for job in jobs:
        _wait(job)
    assert batches == [[0], [1, 2, 3], [4]]


@pytest.mark.parametrize(
    ("error", "status"),
    [
        (InvalidRequestError("bad size"), 422),
        (NonFiniteOutputError("NaN latents"), 500),
        (RuntimeError("a bug"), 500),
    ],
)
def test_a_failed_job_keeps_its_message_and_status(error, status):
    def runner(jobs):
        raise error

    board = _board(runner)
    job = _wait(board.submit(Job("t", "m", "a", {})))
    assert job.state is JobState.FAILED and job.error_status == status
    assert str(error) in job.error


def test_closing_fails_waiting_jobs_and_refuses_new_ones():
    gate = threading.Event()

    def runner(jobs):
        gate.wait(10)
        jobs[0].finish(JobState.DONE)

    board = _board(runner)
    running = board.submit(Job("t", "m", "a", {}))
    while running.state is not JobState.RUNNING:
        time.sleep(0.001)
    waiting = board.submit(Job("t", "m", "a", {}))
    closer = threading.Thread(target=board.close, args=(10,))
    closer.start()
    _wait(waiting)
    assert waiting.state is JobState.CANCELLED and "shut down" in waiting.error
    with pytest.raises(ShuttingDownError):
        board.submit(Job("t", "m", "a", {}))
    gate.set()
    closer.join(10)
    assert running.state is JobState.DONE
