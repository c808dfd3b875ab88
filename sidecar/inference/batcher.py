"""Dynamic micro-batching: many concurrent streams, one forward pass at a time per model.

Each ``infer`` call is a *job*: its token windows wait on a bounded queue, and one worker thread, which
alone drives the backend, takes them for the next pass. It takes short work first: windows in the order of
their job's size (total tokens), the oldest job first among equals, so a 200-byte request queued behind a
48 KB one rides the next pass instead of waiting for all of it. One take is bounded so that it holds the
model for about ``max_batch_tokens`` padded tokens at most (and ``max_batch_size`` windows); the planner
may cut it into length-sorted sub-batches padded only to their own longest row, where padding would cost
more than another pass. Results go back to each caller's event loop with ``call_soon_threadsafe``, so the
loop never blocks on a model.

Admission sheds what cannot be on time: a job with a deadline is refused at once (``Overloaded``, nothing
queued) when the running pass's rest, the queued work that would be taken before it and its own work,
priced by :class:`PassCost` (learned from every pass), end after the deadline. A caller that has gone
(cancelled, or its deadline passed) stops using the model: its queued windows are dropped, and a pass
whose every caller has gone is stopped mid-way where the backend can (ONNX Runtime); no later sub-batch
runs for it.

When to start a batch: a window is *released* once the event-loop step that queued it has finished, so
every window queued in that step (a request's category and PII calls, a long text's windows, requests
that arrived together) rides in the same pass, and a lone request never waits on a timer. A batch starts
when the oldest job is released and at least ``max_wait_ms`` old (0 by default: company arrives anyway
while the model is busy with the previous batch), or when ``max_batch_size`` windows wait.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import itertools
import math
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import structlog

from sidecar.config import BatchingConfig
from sidecar.errors import InferenceCancelled, InferenceError, InferenceTimeout, Overloaded
from sidecar.inference.backends import Backend, StopToken, release_freed_memory

log = structlog.get_logger(__name__)

# What one more forward pass costs beyond its tokens, in tokens: the planner splits a batch only where
# padding would waste more than this, and admission adds it per pass. Measured on 2 CPU cores with the
# bundled INT8 models, a pass costs about 0.6 ms plus 0.035-0.05 ms per token (more for long rows:
# attention), so 15-20 tokens; 32 leaves room for our own per-pass work. On a GPU a small pass costs about
# what a full one does.
CPU_PASS_COST = 32
GPU_PASS_COST = 4096

# The per-token cost admission assumes until the first pass has run: below what was measured (0.03-0.11 ms
# on 2 CPU cores), so that the first requests are never refused on a guess. Not the warm-up passes: they
# pay the runtime's lazy set-up (2-2.6 ms for 4 tokens that cost 0.5 ms after).
CPU_SEED_S_PER_TOKEN = 20e-6
GPU_SEED_S_PER_TOKEN = 0.2e-6

# A window whose event loop never finishes its step (a blocked or stopped loop) stops holding back the
# windows queued behind it after this long.
_RELEASE_CAP_S = 0.05

OnBatch = Callable[[str, int, int, float], None]
"""``on_batch(model, batch_size, tokens, infer_ms)`` after every forward pass; ``tokens`` counts real
(unpadded) tokens. Called from the worker thread (or the caller's thread on the synchronous path)."""

OnShed = Callable[[str, str], None]
"""``on_shed(model, reason)`` for every refused request: ``deadline`` (the queue cannot meet it) or
``queue_full``. Called on the caller's event loop."""


@dataclass(frozen=True, slots=True)
class WindowResult:
    """One window's logits (``[labels]``, or ``[length, labels]`` for token models) and how it got them."""

    logits: np.ndarray
    queue_ms: float
    infer_ms: float
    batch_size: int
    pass_id: int


@dataclass(eq=False, slots=True)
class _Job:
    """One ``infer`` call: its windows not yet taken (shortest first) and its place in the taking order."""

    size: int  # all its windows' tokens: short jobs are taken first
    seq: int  # arrival order among jobs of one size
    loop: asyncio.AbstractEventLoop
    futures: list[asyncio.Future]
    enqueued: float  # perf_counter
    deadline: float | None  # time.monotonic(); past it nobody waits
    items: deque[_Item] = field(default_factory=deque)
    left: int = 0  # tokens of `items`
    released: bool = False
    gone: bool = False  # the caller cancelled or failed: nothing more runs for it

    @property
    def key(self) -> tuple[int, float]:
        return (self.size, self.seq)


@dataclass(eq=False, slots=True)
class _Item:
    ids: np.ndarray
    future: asyncio.Future
    job: _Job

    @property
    def gone(self) -> bool:
        return self.job.gone or self.future.cancelled()


class PassCost:
    """What a forward pass costs, for admission: ``per_token_s`` x (padded tokens + `pass_tokens`).

    The per-pass cost is fixed, the planner's price of a pass in tokens; the cost per token is an
    exponentially weighted average over the passes run (the first passes replace the seed). Written by
    the worker thread, read by callers: a stale read only moves an estimate by one pass's worth.
    """

    def __init__(self, pass_tokens: int, per_token_s: float, weight: float = 0.1):
        self.pass_tokens = pass_tokens
        self.per_token_s = per_token_s
        self._weight = weight
        self._seen = 0

    def observe(self, padded_tokens: int, seconds: float) -> None:
        self._seen += 1
        weight = max(self._weight, 1.0 / self._seen)
        self.per_token_s += weight * (seconds / (padded_tokens + self.pass_tokens) - self.per_token_s)

    def seconds(self, tokens: int, passes: int) -> float:
        return self.per_token_s * (tokens + passes * self.pass_tokens)


def plan_batches(lengths: Sequence[int], max_rows: int, max_tokens: int, pass_cost: int = 0) -> list[np.ndarray]:
    """Indices of rows grouped into sub-batches, shortest first, each padded only to its own longest row.

    Rows are sorted by length and cut into runs that minimise the padded tokens run plus `pass_cost`
    tokens per extra forward pass (what a pass costs beyond its tokens), so 31 short questions are not
    padded to the length of one long text in their batch, nor run one by one. Each run has at most
    `max_rows` rows and ``rows x longest <= max_tokens`` (a row longer than that runs alone).
    """
    order = np.argsort(np.asarray(lengths), kind="stable")
    sizes = [int(lengths[i]) for i in order.tolist()]
    n = len(sizes)
    if n <= 1:
        return [order] if n else []
    best = [0] * (n + 1)  # best[i]: least cost of the first i rows (sorted)
    cut = [0] * (n + 1)  # cut[i]: where the last run of those rows starts
    for i in range(1, n + 1):
        longest = sizes[i - 1]
        first = max(0, i - max(1, min(max_rows, max_tokens // longest)))
        low, at = best[first] - first * longest, first
        for j in range(first + 1, i):  # a run j..i-1 costs (i - j) * longest; ties keep the longer run
            cost = best[j] - j * longest
            if cost < low:
                low, at = cost, j
        best[i] = low + i * longest + pass_cost
        cut[i] = at
    groups: list[np.ndarray] = []
    i = n
    while i > 0:
        groups.append(order[cut[i] : i])
        i = cut[i]
    groups.reverse()
    return groups


def pass_cost(providers: Sequence[str]) -> int:
    """The planner's price of one more forward pass for a backend running on `providers`."""
    return GPU_PASS_COST if _on_gpu(providers) else CPU_PASS_COST


def pad(rows: Sequence[np.ndarray], pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Right-pad to the longest row: int64 ``input_ids`` and ``attention_mask``."""
    longest = max(len(r) for r in rows)
    ids = np.full((len(rows), longest), pad_id, dtype=np.int64)
    mask = np.zeros((len(rows), longest), dtype=np.int64)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = row
        mask[i, : len(row)] = 1
    return ids, mask


class Batcher:
    """The admission queue and worker thread for one model."""

    def __init__(
        self,
        name: str,
        backend: Backend,
        config: BatchingConfig,
        pad_id: int,
        on_batch: OnBatch | None = None,
        on_shed: OnShed | None = None,
        cost: PassCost | None = None,
    ):
        self.name = name
        self._backend = backend
        self._config = config
        self._max_wait_s = config.max_wait_ms / 1000.0
        self._pad_id = pad_id
        providers = getattr(backend, "providers", ())
        self._pass_cost = pass_cost(providers)
        self._stoppable = bool(getattr(backend, "stoppable", False))
        seed = GPU_SEED_S_PER_TOKEN if _on_gpu(providers) else CPU_SEED_S_PER_TOKEN
        self.cost = cost or PassCost(self._pass_cost, seed)
        self.shed = 0
        """Requests refused so far (either reason)."""
        self._on_batch = on_batch
        self._on_shed = on_shed
        self._jobs: list[_Job] = []  # in taking order
        self._queued = 0  # windows in self._jobs
        self._seq = itertools.count()
        self._busy_until = 0.0  # time.monotonic() when the take under way should be done
        self._running: tuple[list[_Item], StopToken] | None = None  # the sub-batch in the backend
        self._cond = threading.Condition()
        self._run_lock = threading.Lock()
        self._passes = itertools.count()
        self._closed = False
        self._thread = threading.Thread(target=self._work, name=f"batcher-{name}", daemon=True)
        self._thread.start()

    @property
    def queued(self) -> int:
        return self._queued

    async def infer(self, windows: Sequence[np.ndarray], deadline: float | None = None) -> list[WindowResult]:
        """Run windows through the model with other callers' windows; all admitted or none.

        `deadline`: event-loop time (``loop.time()``) by which the caller needs the answer. Raises
        Overloaded at once, queueing nothing, when the queue is full or cannot meet the deadline (see
        :meth:`estimate_s`); InferenceTimeout when the deadline passes before its windows run;
        InferenceError when the model fails. A caller that goes (cancelled, or failed) stops using the
        model: its windows that have not run are dropped, and a pass that runs only for it is stopped.
        """
        if not windows:
            return []
        loop = asyncio.get_running_loop()
        job = self._admit(loop, windows, deadline)
        loop.call_soon(self._release, job)  # runs once this loop step (and whoever else queues in it) is done
        try:
            if len(job.futures) == 1:  # the common case: skip gather's bookkeeping
                return [await job.futures[0]]
            return list(await asyncio.gather(*job.futures))
        except BaseException:
            self._abandon(job)
            raise

    def shed_if_late(self, tokens: int, rows: int, deadline: float) -> None:
        """Raise Overloaded now if work of at least `tokens` tokens in `rows` windows cannot meet
        `deadline` (event-loop time): a caller can refuse a long text before paying to tokenize it."""
        left_s = deadline - asyncio.get_running_loop().time()
        with self._cond:
            error = self._late(tokens, rows, (tokens, math.inf), left_s)
        if error is not None:
            self._shed("deadline")
            raise error

    def admits(self, windows: Sequence[np.ndarray], deadline: float | None = None) -> bool:
        """Whether :meth:`infer` would queue `windows` now (room in the queue and, with `deadline`, time),
        counting no refusal: a caller whose windows are partly optional leaves those out instead."""
        tokens = sum(len(w) for w in windows)
        left_s = None if deadline is None else deadline - asyncio.get_running_loop().time()
        with self._cond:
            return self._refusal(len(windows), tokens, (tokens, math.inf), left_s) is None

    def estimate_s(self, tokens: int, rows: int) -> float:
        """Seconds from now until a new job of `tokens` tokens in `rows` windows would be done: the rest of
        the take under way, the queued work taken before it (jobs no bigger) and its own passes."""
        with self._cond:
            return self._estimate_s(tokens, rows, (tokens, math.inf))

    def infer_sync(self, windows: Sequence[np.ndarray]) -> list[np.ndarray]:
        """Offline path (no queue, no wait): all windows sorted by length and run in packed batches
        on the caller's thread; logits come back in input order."""
        out: list[np.ndarray] = [np.empty(0)] * len(windows)
        plan = plan_batches([len(w) for w in windows], self._config.max_batch_size, self._config.max_batch_tokens, self._pass_cost)
        for group in plan:
            rows = [windows[i] for i in group]
            logits, _ = self._forward(rows)
            for j, i in enumerate(group.tolist()):
                out[i] = _row(logits, j, len(rows[j]))
        return out

    def close(self, timeout_s: float = 10.0) -> None:
        """Stop the worker after its current pass; windows still queued fail with InferenceError."""
        with self._cond:
            if self._closed:
                return
            self._closed = True
            pending = [item for job in list(self._jobs) for item in self._unqueue(job)]
            self._cond.notify_all()
        self._thread.join(timeout_s)
        if self._thread.is_alive():
            log.warning("batcher_worker_still_running", model=self.name, waited_s=timeout_s)
        _fail(pending, InferenceError(f"{self.name} model closed before this request ran"))

    def _admit(self, loop: asyncio.AbstractEventLoop, windows: Sequence[np.ndarray],
               deadline: float | None) -> _Job:
        """Queue `windows` as one job, or raise Overloaded with nothing queued."""
        left_s = None if deadline is None else deadline - loop.time()
        futures = [loop.create_future() for _ in windows]
        size = sum(len(w) for w in windows)
        due = None if left_s is None else time.monotonic() + left_s
        job = _Job(size, next(self._seq), loop, futures, time.perf_counter(), due, left=size)
        items = (_Item(ids, f, job) for ids, f in zip(windows, futures, strict=True))
        job.items.extend(sorted(items, key=_length))
        with self._cond:
            if self._closed:
                raise InferenceError(f"{self.name} model is closed")
            refusal = self._refusal(len(job.items), job.size, job.key, left_s)
            if refusal is None:
                bisect.insort(self._jobs, job, key=_key)
                self._queued += len(windows)
                if self._queued >= self._config.max_batch_size:
                    self._cond.notify()
        if refusal is not None:
            self._shed(refusal[0])
            raise refusal[1]
        return job

    def _refusal(self, n: int, tokens: int, key: tuple[int, float], left_s: float | None
                 ) -> tuple[str, Overloaded] | None:
        """Why `n` windows of `tokens` tokens, taken in `key`'s turn, cannot be queued now, if they cannot:
        on_shed's reason and the error. Under the lock."""
        limit = self._config.max_queue
        if n > limit:
            message = f"{self.name}: text needs {n} windows, more than batching.max_queue ({limit})"
            return "queue_full", Overloaded(message)
        if self._queued + n > limit:
            return "queue_full", Overloaded(f"{self.name} queue is full ({limit} windows)")
        late = None if left_s is None else self._late(tokens, n, key, left_s)
        return None if late is None else ("deadline", late)

    def _late(self, tokens: int, rows: int, key: tuple[int, float], left_s: float) -> Overloaded | None:
        """Overloaded when work taken in `key`'s turn would end over `left_s` from now. Under the lock."""
        need_s = self._estimate_s(tokens, rows, key)
        if need_s <= left_s:
            return None
        return Overloaded(f"{self.name}: the queue cannot meet the deadline (estimated "
                          f"{need_s * 1000:.0f} ms, {max(left_s, 0.0) * 1000:.0f} ms available)")

    def _estimate_s(self, tokens: int, rows: int, key: tuple[int, float]) -> float:
        """See :meth:`estimate_s`; `key` places the work in the taking order. Under the lock."""
        for job in self._jobs:
            if job.key > key:
                break
            tokens += job.left
            rows += len(job.items)
        config = self._config
        passes = max(math.ceil(rows / config.max_batch_size), math.ceil(tokens / config.max_batch_tokens))
        return max(self._busy_until - time.monotonic(), 0.0) + self.cost.seconds(tokens, passes)

    def _shed(self, reason: str) -> None:
        self.shed += 1
        if self._on_shed is not None:
            try:
                self._on_shed(self.name, reason)
            except Exception as e:  # observability must never take admission down
                log.warning("on_shed_failed", model=self.name, error=type(e).__name__)

    def _release(self, job: _Job) -> None:
        with self._cond:
            job.released = True
            self._cond.notify()

    def _abandon(self, job: _Job) -> None:
        """The caller has gone: drop its queued windows, and stop the pass under way if it ran only for
        callers that have gone. Runs on the caller's loop."""
        with self._cond:
            job.gone = True
            self._unqueue(job)
            if self._running is not None and all(item.gone for item in self._running[0]):
                self._running[1].stop()
        for future in job.futures:
            future.cancel()  # a window still out will find nobody waiting

    def _unqueue(self, job: _Job) -> list[_Item]:
        """Take `job`'s windows off the queue; they are returned, and the job no longer holds them."""
        if not job.items:
            return []
        self._jobs.remove(job)
        self._queued -= len(job.items)
        items = list(job.items)
        job.items.clear()
        job.left = 0
        return items

    def _work(self) -> None:
        while (items := self._take()) is not None:
            try:
                self._run(items)
            except Exception as e:  # last line of defence: no caller may wait forever on a dead worker
                _fail(items, InferenceError(f"{self.name} worker failed: {type(e).__name__}"))
            finally:
                with self._cond:
                    self._busy_until = 0.0
                    self._running = None
            del items  # the finished take's arrays must not stay alive while the worker waits
            if not self._queued:  # idle: memory the passes freed can go back to the OS
                release_freed_memory()

    def _take(self) -> list[_Item] | None:
        """Block until the oldest job is released and max_wait_ms old, or max_batch_size windows wait; then
        take the next pass's windows (none when every job waiting had passed its deadline)."""
        with self._cond:
            while not self._jobs:
                if self._closed:
                    return None
                self._cond.wait(_RELEASE_CAP_S)  # a window is announced by its release; this catches one never released
            first = min(self._jobs, key=_enqueued)
            ready = first.enqueued + self._max_wait_s
            cap = first.enqueued + max(self._max_wait_s, _RELEASE_CAP_S)
            while self._queued < self._config.max_batch_size and not self._closed:
                remaining = (ready if first.released else cap) - time.perf_counter()
                if remaining <= 0:
                    break
                self._cond.wait(remaining)
            if self._closed:
                return None
            late = self._drop_late()
            items = self._pick()
        _fail(late, InferenceTimeout(f"{self.name}: the deadline passed before this request ran"))
        return items

    def _drop_late(self) -> list[_Item]:
        """Windows of jobs whose deadline has passed, off the queue: nobody will read their answer."""
        now = time.monotonic()
        late = [job for job in self._jobs if job.deadline is not None and job.deadline <= now]
        return [item for job in late for item in self._unqueue(job)]

    def _pick(self) -> list[_Item]:
        """The next take, in taking order: windows while ``rows x longest`` stays within max_batch_tokens
        (one window at least) and rows within max_batch_size. Under the lock."""
        taken: list[_Item] = []
        longest = 0
        while self._jobs and len(taken) < self._config.max_batch_size:
            job = self._jobs[0]
            item = job.items[0]
            wider = max(longest, len(item.ids))
            if taken and (len(taken) + 1) * wider > self._config.max_batch_tokens:
                break
            job.items.popleft()
            job.left -= len(item.ids)
            if not job.items:
                self._jobs.pop(0)
            taken.append(item)
            longest = wider
        self._queued -= len(taken)
        self._busy_until = time.monotonic() + self.cost.seconds(len(taken) * longest, 1)
        return taken

    def _run(self, items: list[_Item]) -> None:
        """Run one take as length-sorted sub-batches; a failure fails only its sub-batch, and nothing runs
        for callers that have gone."""
        plan = plan_batches([len(it.ids) for it in items], self._config.max_batch_size, self._config.max_batch_tokens, self._pass_cost)
        for group in plan:
            with self._cond:
                sub = [it for it in (items[i] for i in group) if not it.gone]
                stop = StopToken()
                self._running = (sub, stop) if sub else None
            if not sub:
                continue
            try:
                results = self._run_sub_batch(sub, stop)
            except Exception as e:  # the worker must outlive any model failure or malformed output
                if isinstance(e, InferenceCancelled):  # stopped: every caller of this pass had gone
                    log.info("pass_stopped", model=self.name, batch_size=len(sub))
                    continue
                _fail(sub, InferenceError(f"{self.name} model failed: {type(e).__name__}: {e}"))
                log.error("inference_failed", model=self.name, batch_size=len(sub), error=type(e).__name__)
                continue
            finally:
                with self._cond:
                    self._running = None
            _resolve(sub, results)

    def _run_sub_batch(self, sub: list[_Item], stop: StopToken) -> list[WindowResult]:
        started = time.perf_counter()
        logits, infer_ms = self._forward([it.ids for it in sub], stop)
        if len(logits) != len(sub):
            raise ValueError(f"backend returned {len(logits)} rows for a batch of {len(sub)}")
        pass_id = next(self._passes)
        return [
            WindowResult(_row(logits, j, len(it.ids)), (started - it.job.enqueued) * 1000.0, infer_ms, len(sub), pass_id)
            for j, it in enumerate(sub)
        ]

    def _forward(self, rows: Sequence[np.ndarray], stop: StopToken | None = None) -> tuple[np.ndarray, float]:
        """One pass; its cost teaches the admission estimate (a stopped pass raises and teaches nothing)."""
        ids, mask = pad(rows, self._pad_id)
        with self._run_lock:
            started = time.perf_counter()
            if stop is not None and self._stoppable:
                logits = self._backend.run(ids, mask, stop)
            else:
                logits = self._backend.run(ids, mask)
            seconds = time.perf_counter() - started
        self.cost.observe(ids.size, seconds)
        if self._on_batch is not None:
            try:
                self._on_batch(self.name, len(rows), int(mask.sum()), seconds * 1000.0)
            except Exception as e:  # observability must never take inference down
                log.warning("on_batch_failed", model=self.name, error=type(e).__name__)
        return logits, seconds * 1000.0


def summarize(results: Sequence[WindowResult], waited_ms: float) -> tuple[float, float, int]:
    """A request's (queue_ms, infer_ms, batch_size) from its windows' results and the wall time it
    waited for them: inference is the distinct passes it rode in, the rest of the wait was queueing."""
    passes = {r.pass_id: r.infer_ms for r in results}
    infer_ms = sum(passes.values())
    return max(waited_ms - infer_ms, 0.0), infer_ms, max((r.batch_size for r in results), default=0)


def _on_gpu(providers: Sequence[str]) -> bool:
    return any(p in ("CUDAExecutionProvider", "cuda") for p in providers)


def _key(job: _Job) -> tuple[int, float]:
    return job.key


def _enqueued(job: _Job) -> float:
    return job.enqueued


def _length(item: _Item) -> int:
    return len(item.ids)


def _row(logits: np.ndarray, j: int, length: int) -> np.ndarray:
    return logits[j, :length] if logits.ndim == 3 else logits[j]


def _resolve(items: Sequence[_Item], results: Sequence[WindowResult]) -> None:
    by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Future, WindowResult]]] = {}
    for item, result in zip(items, results, strict=True):
        by_loop.setdefault(item.job.loop, []).append((item.future, result))
    for loop, pairs in by_loop.items():
        _call_soon(loop, _set_results, pairs)


def _fail(items: Sequence[_Item], error: InferenceError) -> None:
    by_loop: dict[asyncio.AbstractEventLoop, list[asyncio.Future]] = {}
    for item in items:
        by_loop.setdefault(item.job.loop, []).append(item.future)
    for loop, futures in by_loop.items():
        _call_soon(loop, _set_exceptions, futures, error)


def _call_soon(loop: asyncio.AbstractEventLoop, callback, *args) -> None:
    with contextlib.suppress(RuntimeError):  # the caller's loop is closed; nobody is waiting any more
        loop.call_soon_threadsafe(callback, *args)


def _set_results(pairs: list[tuple[asyncio.Future, WindowResult]]) -> None:
    for future, result in pairs:
        if not future.done():
            future.set_result(result)


def _set_exceptions(futures: list[asyncio.Future], error: InferenceError) -> None:
    for future in futures:
        if not future.done():
            future.set_exception(type(error)(*error.args))  # one instance each: tracebacks stay apart
