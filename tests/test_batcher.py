import asyncio
import threading
import weakref
from types import SimpleNamespace

import numpy as np
import pytest

from sidecar.config import BatchingConfig
from sidecar.errors import InferenceCancelled, InferenceError, InferenceTimeout, Overloaded
from sidecar.inference.batcher import Batcher, PassCost, WindowResult, pad, plan_batches, summarize
from tests.inference_fakes import Fingerprint, fingerprint_logits

LABELS = 3


def row(*ids: int) -> np.ndarray:
    return np.array(ids, dtype=np.int64)


def expected(ids: np.ndarray) -> np.ndarray:
    return fingerprint_logits(ids[None, :], np.ones((1, len(ids)), dtype=np.int64), LABELS)[0]


@pytest.fixture
def make():
    made: list[Batcher] = []

    def build(backend, **config) -> Batcher:
        settings = {"max_wait_ms": 5.0, **config}
        batcher = Batcher("category", backend, BatchingConfig(**settings), pad_id=0)
        made.append(batcher)
        return batcher

    yield build
    for b in made:
        if b._backend.gate is not None:
            b._backend.gate.set()
        b.close()


async def until(predicate, timeout_s: float = 10.0) -> None:
    """Wait for another thread to reach a state (never a timing assertion: the condition is exact)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not predicate():
        assert loop.time() < deadline, "condition never became true"
        await asyncio.sleep(0.001)


async def hold_worker(batcher: Batcher, backend: Fingerprint) -> asyncio.Task:
    """Start a request and wait until the worker is inside the backend, blocked on the gate."""
    task = asyncio.create_task(batcher.infer([row(99, 99, 99)]))
    await asyncio.to_thread(backend.entered.wait, 10)
    return task


def test_plan_sorts_by_length_and_bounds_rows_and_padded_tokens():
    lengths = [5, 2, 9, 2, 5, 9]
    assert [g.tolist() for g in plan_batches(lengths, max_rows=2, max_tokens=100)] == [[1, 3], [0, 4], [2, 5]]
    groups = plan_batches(lengths, max_rows=32, max_tokens=12)
    assert [[lengths[i] for i in g] for g in groups] == [[2, 2], [5, 5], [9], [9]]
    assert sorted(i for g in groups for i in g.tolist()) == list(range(6))


def test_plan_does_not_pad_many_short_rows_to_one_long_row_unless_a_pass_costs_more():
    lengths = [12] * 20 + [480] + [14] * 11
    groups = plan_batches(lengths, max_rows=32, max_tokens=16384, pass_cost=64)
    assert [sorted({lengths[i] for i in g.tolist()}) for g in groups] == [[12, 14], [480]]
    assert len(plan_batches(lengths, max_rows=32, max_tokens=16384, pass_cost=100_000)) == 1
    assert len(plan_batches([30] * 32, max_rows=32, max_tokens=16384, pass_cost=0)) == 1  # equal rows never split


def test_a_row_longer_than_the_token_budget_runs_alone():
    assert [g.tolist() for g in plan_batches([40, 3], max_rows=8, max_tokens=16)] == [[1], [0]]


def test_pad_right_pads_to_the_longest_row_with_a_mask():
    ids, mask = pad([row(5, 6), row(7, 8, 9)], pad_id=3)
    assert ids.tolist() == [[5, 6, 3], [7, 8, 9]]
    assert mask.tolist() == [[1, 1, 0], [1, 1, 1]]
    assert ids.dtype == mask.dtype == np.int64


async def test_requests_that_arrive_while_the_model_is_busy_share_one_forward_pass(make):
    backend = Fingerprint(LABELS, gate=threading.Event())
    batcher = make(backend)
    first = await hold_worker(batcher, backend)
    inputs = [row(i, i + 1) for i in range(1, 6)]
    tasks = [asyncio.create_task(batcher.infer([ids])) for ids in inputs]
    await until(lambda: batcher.queued == 5)
    backend.gate.set()
    results = await asyncio.gather(*tasks)
    await first
    assert [len(c) for c in backend.calls] == [1, 5]
    for ids, [result] in zip(inputs, results, strict=True):
        assert np.allclose(result.logits, expected(ids))
        assert result.batch_size == 5


async def test_windows_queued_in_one_loop_step_share_one_pass_without_a_timer(make):
    backend = Fingerprint(LABELS)
    batcher = make(backend, max_wait_ms=0)
    inputs = [row(i, i + 1) for i in range(1, 6)]
    results = await asyncio.gather(*(batcher.infer([ids]) for ids in inputs))
    assert [len(c) for c in backend.calls] == [5]  # the worker waited for the step to end, not for a clock
    for ids, [result] in zip(inputs, results, strict=True):
        assert np.allclose(result.logits, expected(ids))


async def test_a_window_whose_loop_never_releases_it_still_runs(make):
    backend = Fingerprint(LABELS)
    batcher = make(backend, max_wait_ms=0)
    batcher._release = lambda items: None  # as if the loop stopped before the end of its step
    [result] = await batcher.infer([row(4, 5)])
    assert np.allclose(result.logits, expected(row(4, 5)))


async def test_sub_batches_are_padded_only_to_their_own_longest_row(make):
    backend = Fingerprint(LABELS, gate=threading.Event())
    batcher = make(backend, max_batch_tokens=16)
    first = await hold_worker(batcher, backend)
    inputs = [row(1, 2), row(*range(1, 9)), row(3, 4), row(*range(2, 10))]
    task = asyncio.create_task(batcher.infer(inputs))
    await until(lambda: batcher.queued == 4)
    backend.gate.set()
    results = await task
    await first
    assert [c.shape for c in backend.calls[1:]] == [(2, 2), (2, 8)]
    for ids, result in zip(inputs, results, strict=True):
        assert np.allclose(result.logits, expected(ids))


async def test_a_full_queue_refuses_at_once_with_overloaded(make):
    backend = Fingerprint(LABELS, gate=threading.Event())
    batcher = make(backend, max_queue=2)
    first = await hold_worker(batcher, backend)
    queued = [asyncio.create_task(batcher.infer([row(i)])) for i in (1, 2)]
    await until(lambda: batcher.queued == 2)
    with pytest.raises(Overloaded, match="queue is full"):
        await batcher.infer([row(3)])
    backend.gate.set()
    await asyncio.gather(first, *queued)
    assert len(await batcher.infer([row(4)])) == 1  # admitted again once the queue drained


async def test_a_request_with_more_windows_than_the_queue_holds_is_refused_with_the_reason(make):
    batcher = make(Fingerprint(LABELS), max_queue=2)
    with pytest.raises(Overloaded, match="needs 3 windows, more than batching.max_queue"):
        await batcher.infer([row(1), row(2), row(3)])


async def test_a_cancelled_request_is_not_run(make):
    backend = Fingerprint(LABELS, gate=threading.Event())
    batcher = make(backend)
    first = await hold_worker(batcher, backend)
    doomed = asyncio.create_task(batcher.infer([row(7, 7, 7, 7)]))
    await until(lambda: batcher.queued == 1)
    doomed.cancel()
    with pytest.raises(asyncio.CancelledError):
        await doomed
    backend.gate.set()
    await first
    await batcher.infer([row(8)])
    assert (7, 7, 7, 7) not in backend.rows_seen()
    assert (8,) in backend.rows_seen()


async def test_a_backend_failure_fails_that_batch_with_inference_error_and_the_worker_keeps_serving(make):
    backend = Fingerprint(LABELS)
    batcher = make(backend)
    backend.fail_next = 1
    with pytest.raises(InferenceError, match="simulated device failure"):
        await batcher.infer([row(1, 2)])
    [result] = await batcher.infer([row(3, 4)])
    assert np.allclose(result.logits, expected(row(3, 4)))


async def test_close_fails_queued_requests_and_refuses_new_ones(make):
    backend = Fingerprint(LABELS, gate=threading.Event())
    batcher = make(backend)
    running = await hold_worker(batcher, backend)
    queued = asyncio.create_task(batcher.infer([row(5)]))
    await until(lambda: batcher.queued == 1)
    closing = asyncio.create_task(asyncio.to_thread(batcher.close))
    await until(lambda: batcher.queued == 0)
    backend.gate.set()
    await closing
    assert len(await running) == 1  # the pass already under way finishes
    with pytest.raises(InferenceError, match="closed before this request ran"):
        await queued
    with pytest.raises(InferenceError, match="closed"):
        await batcher.infer([row(6)])


async def test_on_batch_sees_every_forward_pass_with_real_token_counts():
    seen = []
    batcher = Batcher(
        "pii", Fingerprint(LABELS), BatchingConfig(max_wait_ms=0), pad_id=0, on_batch=lambda *a: seen.append(a)
    )
    try:
        await batcher.infer([row(1, 2, 3)])
    finally:
        batcher.close()
    [(name, size, tokens, infer_ms)] = seen
    assert (name, size, tokens) == ("pii", 1, 3) and infer_ms >= 0


async def test_a_failing_on_batch_callback_does_not_fail_inference():
    def broken(*_):
        raise ValueError("metrics backend down")

    batcher = Batcher("pii", Fingerprint(LABELS), BatchingConfig(max_wait_ms=0), pad_id=0, on_batch=broken)
    try:
        [result] = await batcher.infer([row(1, 2)])
    finally:
        batcher.close()
    assert np.allclose(result.logits, expected(row(1, 2)))


def test_synchronous_path_packs_by_length_and_answers_in_input_order(make):
    backend = Fingerprint(LABELS)
    batcher = make(backend, max_batch_size=2)
    inputs = [row(1, 2, 3), row(4), row(5, 6), row(7)]
    out = batcher.infer_sync(inputs)
    assert [c.shape for c in backend.calls] == [(2, 1), (2, 3)]
    for ids, logits in zip(inputs, out, strict=True):
        assert np.allclose(logits, expected(ids))


def test_summary_counts_each_shared_pass_once_and_the_rest_as_queueing():
    results = [WindowResult(np.zeros(1), 0.0, 4.0, 8, pass_id=1), WindowResult(np.zeros(1), 0.0, 4.0, 8, pass_id=1),
               WindowResult(np.zeros(1), 0.0, 3.0, 2, pass_id=2)]
    queue_ms, infer_ms, batch_size = summarize(results, waited_ms=10.0)
    assert (queue_ms, infer_ms, batch_size) == (3.0, 7.0, 8)


class Truncating(Fingerprint):
    """Returns one row fewer than it was given: malformed output, not an exception."""

    def logits(self, input_ids, attention_mask):
        return super().logits(input_ids, attention_mask)[:-1]


async def test_malformed_backend_output_is_an_inference_error_and_the_worker_survives(make):
    backend = Truncating(LABELS)
    batcher = make(backend)
    with pytest.raises(InferenceError, match="returned 0 rows for a batch of 1"):
        await batcher.infer([row(1, 2)])
    with pytest.raises(InferenceError, match="returned 0 rows"):
        await batcher.infer([row(3)])
    assert batcher._thread.is_alive()


async def test_a_failure_while_logging_a_model_error_still_answers_the_caller(make, monkeypatch):
    from sidecar.inference import batcher as batcher_module

    class BrokenLog:
        def error(self, *_args, **_kwargs):
            raise ValueError("I/O operation on closed file")

    monkeypatch.setattr(batcher_module, "log", BrokenLog())
    backend = Fingerprint(LABELS)
    batcher = make(backend)
    backend.fail_next = 1
    with pytest.raises(InferenceError):
        await asyncio.wait_for(batcher.infer([row(1, 2)]), 5.0)
    [result] = await asyncio.wait_for(batcher.infer([row(3, 4)]), 5.0)
    assert np.allclose(result.logits, expected(row(3, 4)))


# Deadlines, admission, the taking order and stopping passes.


def slow(per_token_s: float) -> PassCost:
    """A cost model that prices every token at `per_token_s` (and a pass at 32 tokens) and learns nothing
    from the fake's instant passes while a test reads it."""
    cost = PassCost(32, per_token_s)
    cost.observe = lambda *_: None
    return cost


async def test_a_request_whose_deadline_cannot_be_met_is_refused_at_once_and_queues_nothing():
    backend = Fingerprint(LABELS, gate=threading.Event())
    shed = []
    batcher = Batcher("pii", backend, BatchingConfig(max_wait_ms=0), pad_id=0, cost=slow(0.01),
                      on_shed=lambda *a: shed.append(a))
    try:
        first = await hold_worker(batcher, backend)
        ahead = asyncio.create_task(batcher.infer([row(*range(1, 9))] * 4))  # 32 tokens, taken first
        await until(lambda: batcher.queued == 4)
        loop = asyncio.get_running_loop()
        refused = r"cannot meet the deadline \(estimated \d+ ms, \d+ ms available\)"
        with pytest.raises(Overloaded, match=refused):  # it needs (32 + 40 + 32) x 10 ms and more
            await batcher.infer([row(*range(1, 41))], deadline=loop.time() + 0.5)
        assert batcher.queued == 4 and shed == [("pii", "deadline")] and batcher.shed == 1
        backend.gate.set()
        await asyncio.gather(first, ahead)
    finally:
        backend.gate.set()
        batcher.close()
    assert tuple(range(1, 41)) not in backend.rows_seen()


async def test_admission_refuses_only_past_the_estimate_itself():
    batcher = Batcher("pii", Fingerprint(LABELS), BatchingConfig(max_wait_ms=0), pad_id=0, cost=slow(0.001))
    try:
        loop = asyncio.get_running_loop()
        assert batcher.estimate_s(8, 1) == pytest.approx((8 + 32) * 0.001)  # idle: its own pass only
        [result] = await batcher.infer([row(*range(1, 9))], deadline=loop.time() + 0.040 + 0.005)
        assert np.allclose(result.logits, expected(row(*range(1, 9))))
        with pytest.raises(Overloaded):
            await batcher.infer([row(*range(1, 9))], deadline=loop.time() + 0.040 - 0.005)
    finally:
        batcher.close()


async def test_at_light_load_nothing_is_refused(make):
    backend = Fingerprint(LABELS)
    batcher = make(backend, max_wait_ms=0)
    loop = asyncio.get_running_loop()
    for i in range(20):  # one at a time, then bursts, each with the router's 250 ms
        await batcher.infer([row(i + 1, i + 2)], deadline=loop.time() + 0.25)
    for _ in range(5):
        burst = [batcher.infer([row(*range(1, 60 + i))], deadline=loop.time() + 0.25) for i in range(32)]
        await asyncio.gather(*burst)
    assert batcher.shed == 0


async def test_a_short_request_queued_after_a_long_one_runs_before_the_long_ones_remaining_windows(make):
    backend = Fingerprint(LABELS, gate=threading.Event())
    batcher = make(backend, max_batch_tokens=16, max_wait_ms=0)  # one 16-token window per pass
    long = [row(*range(20 * i + 1, 20 * i + 17)) for i in range(5)]
    long_task = asyncio.create_task(batcher.infer(long))
    await asyncio.to_thread(backend.entered.wait, 10)  # the long request's first window is running
    short = asyncio.create_task(batcher.infer([row(7, 7, 7)]))
    await until(lambda: batcher.queued == 5)
    backend.gate.set()
    await asyncio.gather(long_task, short)
    passes = [c[0].tolist() for c in backend.calls]
    assert len(passes) == 6 and passes[0] == long[0].tolist()
    assert passes[1][:3] == [7, 7, 7]  # next, before the long request's four other windows


async def test_equal_requests_are_taken_oldest_first(make):
    backend = Fingerprint(LABELS, gate=threading.Event())
    batcher = make(backend, max_batch_size=1)
    first = await hold_worker(batcher, backend)
    tasks: list[asyncio.Task] = []
    for i in (5, 3, 4):  # same size, queued in this order
        tasks.append(asyncio.create_task(batcher.infer([row(i, i)])))
        queued = len(tasks)
        await until(lambda: batcher.queued == queued)  # noqa: B023 (awaited before `queued` changes)
    backend.gate.set()
    await asyncio.gather(first, *tasks)
    assert [c[0].tolist() for c in backend.calls[1:]] == [[5, 5], [3, 3], [4, 4]]


async def test_a_request_whose_deadline_passes_in_the_queue_fails_with_timeout_and_never_runs(make):
    backend = Fingerprint(LABELS, gate=threading.Event())
    batcher = make(backend)
    first = await hold_worker(batcher, backend)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 0.02
    doomed = asyncio.create_task(batcher.infer([row(6, 6, 6)], deadline=deadline))
    await until(lambda: batcher.queued == 1 and loop.time() > deadline)  # a clock condition, not a sleep
    backend.gate.set()
    with pytest.raises(InferenceTimeout, match="deadline passed before this request ran"):
        await doomed
    await first
    assert (6, 6, 6) not in backend.rows_seen()


class Stoppable(Fingerprint):
    """A backend whose passes can be stopped: each pass waits until it is stopped (it then raises, as ONNX
    Runtime does) or the test opens the backend, and the stops it obeyed are counted."""

    stoppable = True

    def __init__(self, num_labels: int):
        super().__init__(num_labels)
        self.gate = SimpleNamespace(set=self.open)  # what the `make` fixture opens at teardown
        self.stopped = 0
        self._opened = threading.Event()
        self._wakes: list[threading.Event] = []

    def open(self) -> None:
        self._opened.set()
        for wake in list(self._wakes):
            wake.set()

    def run(self, input_ids, attention_mask, stop):
        self.calls.append(input_ids.copy())
        self.masks.append(attention_mask.copy())
        wake = threading.Event()
        self._wakes.append(wake)
        stop.on_stop(wake.set)
        if self._opened.is_set():
            wake.set()
        self.entered.set()
        if not wake.wait(10):
            raise TimeoutError("the test never opened the backend")
        if stop.stopped:
            self.stopped += 1
            raise InferenceCancelled("forward pass stopped")
        return self.logits(input_ids, attention_mask)


async def test_a_caller_cancelled_mid_pass_has_its_pass_stopped_and_the_worker_serves_the_next_request(make):
    backend = Stoppable(LABELS)
    batcher = make(backend)
    doomed = asyncio.create_task(batcher.infer([row(9, 9, 9)]))
    await asyncio.to_thread(backend.entered.wait, 10)
    doomed.cancel()
    with pytest.raises(asyncio.CancelledError):
        await doomed
    await until(lambda: backend.stopped == 1)
    backend.open()
    [result] = await batcher.infer([row(4, 5)])
    assert np.allclose(result.logits, expected(row(4, 5)))
    assert batcher._thread.is_alive() and backend.stopped == 1


async def test_a_pass_shared_with_a_caller_still_waiting_is_not_stopped(make):
    backend = Stoppable(LABELS)
    batcher = make(backend, max_wait_ms=0)
    gone = asyncio.ensure_future(batcher.infer([row(9, 9, 9)]))
    staying = asyncio.ensure_future(batcher.infer([row(2, 3)]))  # same loop step: same pass
    await asyncio.to_thread(backend.entered.wait, 10)
    gone.cancel()
    with pytest.raises(asyncio.CancelledError):
        await gone
    backend.open()
    [result] = await staying
    assert np.allclose(result.logits, expected(row(2, 3)))
    assert backend.stopped == 0 and len(backend.calls) == 1


async def test_a_finished_requests_windows_are_not_kept_by_the_batcher(make):
    batcher = make(Fingerprint(LABELS), max_wait_ms=0)
    ids = row(1, 2, 3)
    kept = weakref.ref(ids)
    await batcher.infer([ids])
    del ids
    await until(lambda: kept() is None)


def test_pass_cost_replaces_its_seed_with_what_it_measures_then_averages():
    cost = PassCost(pass_tokens=32, per_token_s=1.0, weight=0.5)
    cost.observe(96, 0.128)  # (96 + 32) tokens in 128 ms: 1 ms per token, the seed forgotten
    assert cost.per_token_s == pytest.approx(0.001)
    cost.observe(96, 0.384)  # 3 ms per token, weighted by a half
    assert cost.per_token_s == pytest.approx(0.002)
    assert cost.seconds(100, 2) == pytest.approx(0.002 * (100 + 64))
