"""Dynamic micro-batching: many concurrent streams, one forward pass at a time per model.

Requests put token windows on a bounded queue; one worker thread, which alone drives the backend, takes
the first window together with everything queued behind it (up to ``max_batch_size`` windows), drops
windows whose caller has gone, sorts the rest by length and runs them in sub-batches padded only to their
own longest row, cut where padding would cost more than another pass, and bounded by ``max_batch_tokens``.
Results go back to each caller's event loop with ``call_soon_threadsafe``, so the loop never blocks on a
model.

When to start a batch: a window is *released* once the event-loop step that queued it has finished, so
every window queued in that step (a request's category and PII calls, a long text's windows, requests
that arrived together) rides in the same pass, and a lone request never waits on a timer. A batch starts
when its first window is released and at least ``max_wait_ms`` old (0 by default: company arrives anyway
while the model is busy with the previous batch), or when ``max_batch_size`` windows wait.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import structlog

from sidecar.config import BatchingConfig
from sidecar.errors import InferenceError, Overloaded
from sidecar.inference.backends import Backend

log = structlog.get_logger(__name__)

# What one more forward pass costs beyond its tokens, in tokens: the planner splits a batch only where
# padding would waste more than this. Measured on 2 CPU cores with the bundled INT8 models, a pass costs
# about 0.6 ms plus 0.035-0.05 ms per token (more for long rows: attention), so 15-20 tokens; 32 leaves
# room for our own per-pass work. On a GPU a small pass costs about what a full one does.
CPU_PASS_COST = 32
GPU_PASS_COST = 4096

# A window whose event loop never finishes its step (a blocked or stopped loop) stops holding back the
# windows queued behind it after this long.
_RELEASE_CAP_S = 0.05

OnBatch = Callable[[str, int, int, float], None]
"""``on_batch(model, batch_size, tokens, infer_ms)`` after every forward pass; ``tokens`` counts real
(unpadded) tokens. Called from the worker thread (or the caller's thread on the synchronous path)."""


@dataclass(frozen=True, slots=True)
class WindowResult:
    """One window's logits (``[labels]``, or ``[length, labels]`` for token models) and how it got them."""

    logits: np.ndarray
    queue_ms: float
    infer_ms: float
    batch_size: int
    pass_id: int


@dataclass(slots=True)
class _Item:
    ids: np.ndarray
    future: asyncio.Future
    loop: asyncio.AbstractEventLoop
    enqueued: float
    released: bool = False


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
    return GPU_PASS_COST if any(p in ("CUDAExecutionProvider", "cuda") for p in providers) else CPU_PASS_COST


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
    ):
        self.name = name
        self._backend = backend
        self._config = config
        self._max_wait_s = config.max_wait_ms / 1000.0
        self._pad_id = pad_id
        self._pass_cost = pass_cost(getattr(backend, "providers", ()))
        self._on_batch = on_batch
        self._queue: deque[_Item] = deque()
        self._cond = threading.Condition()
        self._run_lock = threading.Lock()
        self._passes = itertools.count()
        self._closed = False
        self._thread = threading.Thread(target=self._work, name=f"batcher-{name}", daemon=True)
        self._thread.start()

    @property
    def queued(self) -> int:
        return len(self._queue)

    async def infer(self, windows: Sequence[np.ndarray]) -> list[WindowResult]:
        """Run windows through the model with other callers' windows; all admitted or none.

        Raises Overloaded at once when the queue cannot take them, InferenceError when the model fails.
        Cancelling the caller drops its windows that have not run yet.
        """
        loop = asyncio.get_running_loop()
        futures = [loop.create_future() for _ in windows]
        now = time.perf_counter()
        items = [_Item(ids, f, loop, now) for ids, f in zip(windows, futures, strict=True)]
        with self._cond:
            if self._closed:
                raise InferenceError(f"{self.name} model is closed")
            if len(self._queue) + len(windows) > self._config.max_queue:
                if len(windows) > self._config.max_queue:
                    raise Overloaded(
                        f"{self.name}: text needs {len(windows)} windows, more than batching.max_queue "
                        f"({self._config.max_queue})"
                    )
                raise Overloaded(f"{self.name} queue is full ({self._config.max_queue} windows)")
            self._queue.extend(items)
            if len(self._queue) >= self._config.max_batch_size:
                self._cond.notify()
        loop.call_soon(self._release, items)  # runs once this loop step (and whoever else queues in it) is done
        if len(futures) == 1:  # the common case: skip gather's bookkeeping
            return [await futures[0]]
        return list(await asyncio.gather(*futures))

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
            pending = list(self._queue)
            self._queue.clear()
            self._cond.notify_all()
        self._thread.join(timeout_s)
        if self._thread.is_alive():
            log.warning("batcher_worker_still_running", model=self.name, waited_s=timeout_s)
        _fail(pending, InferenceError(f"{self.name} model closed before this request ran"))

    def _release(self, items: list[_Item]) -> None:
        with self._cond:
            for item in items:
                item.released = True
            self._cond.notify()

    def _work(self) -> None:
        while (batch := self._take()) is not None:
            live = [item for item in batch if not item.future.cancelled()]
            if not live:
                continue
            try:
                self._run(live)
            except Exception as e:  # last line of defence: no caller may wait forever on a dead worker
                _fail(live, InferenceError(f"{self.name} worker failed: {type(e).__name__}"))

    def _run(self, items: list[_Item]) -> None:
        """Run one collected batch as length-sorted sub-batches; a failure fails only its sub-batch."""
        plan = plan_batches([len(it.ids) for it in items], self._config.max_batch_size, self._config.max_batch_tokens, self._pass_cost)
        for group in plan:
            sub = [it for it in (items[i] for i in group) if not it.future.cancelled()]
            if not sub:
                continue
            try:
                results = self._run_sub_batch(sub)
            except Exception as e:  # the worker must outlive any model failure or malformed output
                _fail(sub, InferenceError(f"{self.name} model failed: {type(e).__name__}: {e}"))
                log.error("inference_failed", model=self.name, batch_size=len(sub), error=type(e).__name__)
                continue
            _resolve(sub, results)

    def _run_sub_batch(self, sub: list[_Item]) -> list[WindowResult]:
        started = time.perf_counter()
        logits, infer_ms = self._forward([it.ids for it in sub])
        if len(logits) != len(sub):
            raise ValueError(f"backend returned {len(logits)} rows for a batch of {len(sub)}")
        pass_id = next(self._passes)
        return [
            WindowResult(_row(logits, j, len(it.ids)), (started - it.enqueued) * 1000.0, infer_ms, len(sub), pass_id)
            for j, it in enumerate(sub)
        ]

    def _take(self) -> list[_Item] | None:
        """Block until the first window is released and max_wait_ms old, or max_batch_size windows wait."""
        with self._cond:
            while not self._queue:
                if self._closed:
                    return None
                self._cond.wait(_RELEASE_CAP_S)  # a window is announced by its release; this catches one never released
            first = self._queue[0]
            ready = first.enqueued + self._max_wait_s
            cap = first.enqueued + max(self._max_wait_s, _RELEASE_CAP_S)
            while len(self._queue) < self._config.max_batch_size and not self._closed:
                remaining = (ready if first.released else cap) - time.perf_counter()
                if remaining <= 0:
                    break
                self._cond.wait(remaining)
            if self._closed:
                return None
            n = min(len(self._queue), self._config.max_batch_size)
            return [self._queue.popleft() for _ in range(n)]

    def _forward(self, rows: Sequence[np.ndarray]) -> tuple[np.ndarray, float]:
        ids, mask = pad(rows, self._pad_id)
        with self._run_lock:
            started = time.perf_counter()
            logits = self._backend.run(ids, mask)
            infer_ms = (time.perf_counter() - started) * 1000.0
        if self._on_batch is not None:
            try:
                self._on_batch(self.name, len(rows), int(mask.sum()), infer_ms)
            except Exception as e:  # observability must never take inference down
                log.warning("on_batch_failed", model=self.name, error=type(e).__name__)
        return logits, infer_ms


def summarize(results: Sequence[WindowResult], waited_ms: float) -> tuple[float, float, int]:
    """A request's (queue_ms, infer_ms, batch_size) from its windows' results and the wall time it
    waited for them: inference is the distinct passes it rode in, the rest of the wait was queueing."""
    passes = {r.pass_id: r.infer_ms for r in results}
    infer_ms = sum(passes.values())
    return max(waited_ms - infer_ms, 0.0), infer_ms, max((r.batch_size for r in results), default=0)


def _row(logits: np.ndarray, j: int, length: int) -> np.ndarray:
    return logits[j, :length] if logits.ndim == 3 else logits[j]


def _resolve(items: Sequence[_Item], results: Sequence[WindowResult]) -> None:
    by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Future, WindowResult]]] = {}
    for item, result in zip(items, results, strict=True):
        by_loop.setdefault(item.loop, []).append((item.future, result))
    for loop, pairs in by_loop.items():
        _call_soon(loop, _set_results, pairs)


def _fail(items: Sequence[_Item], error: InferenceError) -> None:
    by_loop: dict[asyncio.AbstractEventLoop, list[asyncio.Future]] = {}
    for item in items:
        by_loop.setdefault(item.loop, []).append(item.future)
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
