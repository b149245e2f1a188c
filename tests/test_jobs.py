"""The job queue's order, kept once per change: after any run of submits, starts, ends and
cancels, the order it shows (and every position and lookup) is the order the jobs then start in."""

from __future__ import annotations

from collections import deque

from hypothesis import given, settings
from hypothesis import strategies as st

from engine.serve.jobs import DONE, Job, JobQueue

CLIENTS = (b"a", b"b", b"c")
OPS = st.lists(
    st.tuples(st.sampled_from(["add", "start", "finish", "cancel"]), st.sampled_from(CLIENTS)),
    max_size=40,
)


def _drained(queue: JobQueue) -> list[Job]:
    """The order the waiting jobs start in, on a copy of the queue with slots for them all."""
    copy = JobQueue(slots=len(queue) + 1)
    copy.lines = {c: deque(line) for c, line in queue.lines.items()}
    copy.served, copy.starts = dict(queue.served), queue.starts
    return list(iter(copy.start_next, None))


@settings(deadline=None, max_examples=200)
@given(ops=OPS, slots=st.integers(1, 3))
def test_the_order_shown_is_the_order_jobs_start_in(ops, slots):
    queue, made = JobQueue(slots), 0
    for op, client in ops:
        if op == "add":
            made += 1
            queue.add(Job(client, f"j{made}", "p", None, None, None))
        elif op == "start":
            queue.start_next()
        elif op == "finish" and queue.running:
            queue.finish(queue.running[0], DONE)
        elif op == "cancel" and queue.lines.get(client):
            queue.remove(queue.lines[client][-1])
        order = queue.waiting
        assert order == _drained(queue)
        for i, job in enumerate(order):
            assert queue.position(job) == max(0, i + len(queue.running) - slots + 1)
        for job in queue.active():
            assert queue.find(job.client, job.id) is job
            assert queue.find(b"z" if job.client != b"z" else b"y", job.id) is None
        assert queue.find(client, "never") is None
