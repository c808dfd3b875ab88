"""The inference engine: text -> tokens -> windows -> micro-batched backend -> heads (+ checksums).

One Engine holds up to two models (category, PII), each with its own tokenizer, backend and batcher.
Async calls are what the server uses: they never block the event loop (long texts are tokenized and
decoded on a worker thread, with the tokenizer's GIL-free batch call, and inference runs on the
batcher's thread). They take an optional `deadline` (event-loop time): work that cannot be done by then
is refused at once with ``Overloaded`` (a text too long for it before it is even tokenized), and work
whose caller has gone stops (tokenization at the next piece, inference before the next pass or half-way
through an ONNX Runtime pass). The ``*_many`` calls are the synchronous, batched path for the offline CLI
and evaluation.
"""

from __future__ import annotations

import asyncio
import threading
import time
from bisect import bisect_left
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from itertools import accumulate, chain

import numpy as np
import structlog

from model_contract.model_dir import ModelDir, ModelDirError
from sidecar.checksums import find_checksum_spans, find_checksum_spans_each, merge_overlapping, reconcile
from sidecar.config import CONTEXT_ENTITIES, BatchingConfig, ModelConfig, ModelsConfig
from sidecar.errors import InferenceCancelled, ModelLoadError
from sidecar.inference.backends import Backend, open_backend, ort_cuda_available
from sidecar.inference.batcher import Batcher, OnBatch, OnShed, WindowResult, summarize
from sidecar.inference.heads import BioScheme, bias_vector, category_results, decode_bio
from sidecar.inference.joins import join_entity_parts
from sidecar.inference.windows import (
    Encoded,
    Part,
    TextEncoder,
    Window,
    merge_windows,
    window_length,
    windows_of,
)
from sidecar.results import CategoryResult, PiiResult, Span, StageTimings

log = structlog.get_logger(__name__)

# Tokenizing or decoding a short text on the event loop costs less than a thread hop, but one loop step
# that does it for many texts (a body of a thousand short messages, many requests arriving together)
# holds up every stream: at most this many characters per loop step are handled on the loop. A longer
# request goes to a worker thread on its own; shorter ones that arrive in the same step are tokenized
# together (StepGroup), on the loop within this budget or in one worker-thread call beyond it.
_INLINE_CHARS = 4096


@dataclass(frozen=True)
class LoadedModel:
    """A model directory, its config section and the backend opened for it."""

    model_dir: ModelDir
    config: ModelConfig
    backend: Backend


Work = Callable[[list, "threading.Event | None"], list]
"""``work(items, stop)`` -> one result per item; long work gives up once `stop` is set."""


class StepGroup:
    """Short jobs asked for during one event-loop step, done together once the step is over.

    Requests that arrive together (a burst, or the calls one request makes) are tokenized as one group,
    reach the batcher in the same step and share a forward pass; decoded as one group, they leave it
    together. Done one by one, the jobs past the step's on-loop budget would each take a thread hop, and
    those tokenized on threads would miss the pass the others rode in. A group runs on the loop while the
    step's budget allows (`on_loop`), else in one worker-thread call: for tokenization that is the
    tokenizer's batch method, which releases the GIL and uses every core.
    """

    def __init__(self, work: Work, on_loop: Callable[[int], bool], size: Callable[[object], int] = len,
                 alone_above: int = _INLINE_CHARS):
        self._work = work
        self._on_loop = on_loop
        self._size = size
        self._alone_above = alone_above
        self._pending: dict[asyncio.AbstractEventLoop, list[tuple[Sequence, asyncio.Future]]] = {}

    async def run(self, items: Sequence) -> list:
        """`work` on `items` (with whatever else this step asks for); results in the order of `items`.
        A job bigger than `alone_above` runs on a worker thread by itself: it must not hold up short ones."""
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        if sum(map(self._size, items)) > self._alone_above:
            self._in_thread(loop, [(items, future)], list(items))
            return await future
        jobs = self._pending.get(loop)
        if jobs is None:
            jobs = self._pending[loop] = []
            loop.call_soon(self._flush, loop)  # once every caller of this step has asked
        jobs.append((items, future))
        return await future

    def _flush(self, loop: asyncio.AbstractEventLoop) -> None:
        jobs = [(items, f) for items, f in self._pending.pop(loop, ()) if not f.done()]
        if not jobs:
            return
        items = [item for job, _ in jobs for item in job]
        if self._on_loop(sum(map(self._size, items))):
            try:
                _deliver(jobs, self._work(items, None))
            except Exception as e:
                _deliver_error(jobs, e)
            return
        self._in_thread(loop, jobs, items)

    def _in_thread(self, loop: asyncio.AbstractEventLoop, jobs: list[tuple[Sequence, asyncio.Future]],
                   items: list) -> None:
        """`work` on a worker thread. A thread cannot be cancelled, so `stop` is set once every job's caller
        has gone (its deadline passed): long work checks it and ends instead of running on for nobody."""
        stop = threading.Event()

        def caller_gone(_: asyncio.Future) -> None:
            if all(f.cancelled() for _, f in jobs):
                stop.set()

        for _, f in jobs:
            f.add_done_callback(caller_gone)

        def done(work: asyncio.Future) -> None:
            if work.cancelled():
                _deliver_error(jobs, InferenceCancelled("the group's work was cancelled"))
            elif work.exception() is not None:
                _deliver_error(jobs, work.exception())
            else:
                _deliver(jobs, work.result())

        loop.run_in_executor(None, self._work, items, stop).add_done_callback(done)


def _deliver(jobs: list[tuple[Sequence, asyncio.Future]], results: list) -> None:
    at = 0
    for items, future in jobs:
        if not future.done():
            future.set_result(results[at : at + len(items)])
        at += len(items)


def _deliver_error(jobs: list[tuple[Sequence, asyncio.Future]], error: BaseException) -> None:
    for _, future in jobs:
        if not future.done():
            future.set_exception(error)


class _Model:
    """Everything one model needs at request time, built once."""

    def __init__(self, name: str, loaded: LoadedModel, batching: BatchingConfig, on_batch: OnBatch | None,
                 on_loop: Callable[[int], bool], on_shed: OnShed | None = None):
        self.name = name
        self.model_dir = loaded.model_dir
        self.config = loaded.config
        self.backend = loaded.backend
        self.labels = loaded.model_dir.labels
        try:
            self.scheme = BioScheme.from_labels(self.labels) if loaded.model_dir.spec.head == "token" else None
            if self.scheme is None and loaded.config.entity_bias:
                raise ModelLoadError("entity_bias is for token (PII) models; this one classifies whole texts")
            self.bias = bias_vector(self.scheme, self.labels, loaded.config.entity_bias) if self.scheme else None
            stride = loaded.config.stride if self.scheme is not None else 0  # a category model reads one window
            self.encoder = TextEncoder.for_model(loaded.model_dir, loaded.config.max_length, stride,
                                                 line_windows=self.scheme is not None and loaded.config.line_windows)
        except ModelLoadError as e:
            raise ModelLoadError(f"models.{name}: {e}") from None
        if self.encoder.max_length < window_length(loaded.model_dir, loaded.config.max_length):
            log.warning(
                "max_length_clamped",
                model=name,
                configured=loaded.config.max_length,
                max_position_embeddings=loaded.model_dir.max_position_embeddings,
            )
        self.batcher = Batcher(name, loaded.backend, batching, loaded.model_dir.pad_token_id, on_batch,
                               on_shed)
        self.max_token_chars = _longest_token(loaded.model_dir)
        if self.scheme is None:
            self.tokenize = StepGroup(lambda texts, stop: self.encoder.heads_of(texts), on_loop)
        else:
            self.tokenize = StepGroup(lambda texts, stop: _pii_windows(self, texts, stop), on_loop)

    def describe(self) -> dict:
        info = {
            "path": str(self.model_dir.path),
            "runtime": self.backend.name,
            "file": self.backend.file,
            "providers": list(self.backend.providers),
            "threads": getattr(self.backend, "threads", 0),
            "small_pass_tokens": getattr(self.backend, "small_pass_tokens", 0),
            "max_length": self.encoder.max_length,
            "labels": list(self.labels),
        }
        if self.scheme is not None:
            info.update(stride=self.encoder.stride, line_windows=self.encoder.line_windows,
                        entities=list(self.scheme.entity_types), entity_bias=dict(self.config.entity_bias))
        return info


class Engine:
    """Category and PII inference behind one object; see ARCHITECTURE.md ("Engine API")."""

    def __init__(
        self,
        category: LoadedModel | None = None,
        pii: LoadedModel | None = None,
        batching: BatchingConfig | None = None,
        checksums: bool = True,
        on_batch: OnBatch | None = None,
        on_shed: OnShed | None = None,
        others: dict[str, LoadedModel] | None = None,
    ):
        batching = batching or BatchingConfig()
        self._others: dict[str, _Model] = {}
        self.checksums = checksums
        self._step_loop: asyncio.AbstractEventLoop | None = None  # the loop whose current step has used
        self._step_chars = 0  # this many characters of on-loop work
        self._category = None
        if category:
            self._category = _Model("category", category, batching, on_batch, self._on_loop, on_shed)
        self._pii: _Model | None = None
        # A job's size is the characters it decodes: its lines read alone decode the text a second time.
        self._pii_decode = StepGroup(self._decode_pii, self._on_loop,
                                     size=lambda job: len(job[0]) * min(len(job[2]), 2))
        try:
            self._pii = _Model("pii", pii, batching, on_batch, self._on_loop, on_shed) if pii else None
            for name, loaded in (others or {}).items():
                self._others[name] = _Model(name, loaded, batching, on_batch, self._on_loop, on_shed)
        except Exception:
            self.close()
            raise

    @classmethod
    def load(
        cls,
        models: ModelsConfig,
        batching: BatchingConfig,
        checksums: bool = True,
        on_batch: OnBatch | None = None,
        on_shed: OnShed | None = None,
    ) -> Engine:
        """Read the configured model directories and open a backend for each (see ``open_backend``).
        `on_batch` sees every forward pass, `on_shed` every refused request (see the batcher)."""
        configured = models.configured()
        share = sum(c.device == "cpu" or not ort_cuda_available() for c in configured.values())
        loaded: dict[str, LoadedModel] = {}
        for name, config in configured.items():
            try:
                model_dir = ModelDir.read(config.path, expect_task=name)
            except ModelDirError as e:
                raise ModelLoadError(f"models.{name}: {e}") from e
            loaded[name] = LoadedModel(model_dir, config, open_backend(model_dir, config, cpu_share=share))
        engine = cls(loaded.pop("category", None), loaded.pop("pii", None), batching, checksums, on_batch, on_shed,
                     others=loaded)
        try:
            engine.warm_up()
        except ModelLoadError:
            engine.close()
            raise
        log.info("engine_loaded", **{k: v["runtime"] for k, v in engine.describe().items() if v}, checksums=checksums)
        return engine

    @property
    def has_category(self) -> bool:
        return self._category is not None

    @property
    def has_pii(self) -> bool:
        return self._pii is not None

    @property
    def detects_pii(self) -> bool:
        """Whether ``detect_pii`` can find anything: a PII model or the checksum recognizers."""
        return self._pii is not None or self.checksums

    @property
    def category_labels(self) -> list[str] | None:
        return list(self._category.labels) if self._category else None

    @property
    def pii_labels(self) -> list[str] | None:
        """Entity types the PII model tags (``PERSON``, not ``B-PERSON``), in label order."""
        return list(self._pii.scheme.entity_types) if self._pii and self._pii.scheme else None

    def describe(self) -> dict:
        """Runtime, file and execution providers per model, for logs, the CLI and the health API."""
        return {
            "category": self._category.describe() if self._category else None,
            "pii": self._pii.describe() if self._pii else None,
            **{name: model.describe() for name, model in self._others.items()},
        }

    def warm_up(self) -> None:
        """One forward pass per model and session, so that lazy runtime set-up (allocators, kernels, CUDA
        context) happens at load time and not inside the first request's deadline."""
        for model in (self._category, self._pii, *self._others.values()):
            if model is None:
                continue
            started = time.perf_counter()
            ids = model.encoder.head_of("warm up")[None, :]
            passes = [ids]
            small = getattr(model.backend, "small_pass_tokens", 0)
            if small:  # a pass over small_pass_tokens reaches the pooled session too
                passes.append(np.repeat(ids, small // ids.shape[1] + 1, axis=0))
            try:
                for batch in passes:
                    model.backend.run(batch, np.ones_like(batch))
            except Exception as e:  # a model that cannot run at all must not start serving
                raise ModelLoadError(f"models.{model.name}: the first forward pass failed ({type(e).__name__}: {e})") from e
            log.info("model_warmed", model=model.name, ms=round((time.perf_counter() - started) * 1000.0, 1))

    async def classify(self, text: str, deadline: float | None = None) -> CategoryResult:
        """The category of `text`, read from its first window. Raises InferenceError (Overloaded when the
        queue is full or cannot answer by `deadline`, event-loop time); RuntimeError when no category model
        is configured."""
        model = self._category
        if model is None:
            raise RuntimeError("no category model is configured")
        started = time.perf_counter()
        if len(text) > _INLINE_CHARS:  # a long text's head costs about one window, but not on the loop
            ids = await asyncio.to_thread(model.encoder.head_of, text)
        else:
            [ids] = await model.tokenize.run([text])
        tokenized = time.perf_counter()
        results = await model.batcher.infer([ids], deadline)
        inferred = time.perf_counter()
        [result] = category_results(results[0].logits, model.labels)
        decoded = time.perf_counter()
        return CategoryResult(
            result.label,
            result.confidence,
            result.scores,
            _timings(results, started, tokenized, inferred, decoded),
        )

    async def detect_pii(self, text: str, deadline: float | None = None) -> PiiResult:
        """Every entity in `text`, sorted by start, before any policy threshold. The whole text is read in
        overlapping windows. Without a PII model, only checksum spans (if enabled) are returned."""
        [result] = await self.detect_pii_all([text], deadline)
        return result

    async def detect_pii_all(self, texts: Sequence[str], deadline: float | None = None) -> list[PiiResult]:
        """:meth:`detect_pii` for each of one request's texts, as one job: one tokenization (on a worker
        thread, without the GIL, when the texts are long together), one trip through the batcher, one
        decoding. A body of a thousand short messages so costs two thread hops, not two thousand.
        Overloaded when the model cannot answer by `deadline` (event-loop time): for long texts, judged
        on the fewest tokens they can have before tokenizing them, then on their tokens."""
        model = self._pii
        started = time.perf_counter()
        if model is None:
            if not self.checksums:
                return [PiiResult([]) for _ in texts]
            if self._on_loop(sum(map(len, texts))):
                spans = find_checksum_spans_each(texts)
            else:
                spans = await asyncio.to_thread(find_checksum_spans_each, texts)
            decode_ms = (time.perf_counter() - started) * 1000.0
            return [PiiResult(s, StageTimings(decode_ms=decode_ms)) for s in spans]
        chars = sum(map(len, texts))
        if deadline is not None and chars > _INLINE_CHARS:  # tokenizing 900 KB costs 0.4 s of a core
            least = chars // model.max_token_chars
            model.batcher.shed_if_late(least, -(-least // model.encoder.body), deadline)
        prepared = await model.tokenize.run(texts)
        tokenized = time.perf_counter()
        windows = [windows_of(parts) for _, parts in prepared]
        flat = [w.ids for ws in windows for w in ws]
        if any(len(parts) > 1 for _, parts in prepared) and not model.batcher.admits(flat, deadline):
            prepared, windows, flat = _whole_only(model, prepared, len(flat))
        results = await model.batcher.infer(flat, deadline) if flat else []
        inferred = time.perf_counter()
        per_text: list[list[WindowResult]] = []
        at = 0
        for ws in windows:
            per_text.append(results[at : at + len(ws)])
            at += len(ws)
        jobs = [(text, encoded, parts, results)
                for text, (encoded, parts), results in zip(texts, prepared, per_text, strict=True)]
        spans = await self._pii_decode.run(jobs)
        decoded = time.perf_counter()
        return [PiiResult(s, _timings(r, started, tokenized, inferred, decoded)) for s, r in zip(spans, per_text, strict=True)]

    def classify_many(self, texts: Sequence[str]) -> list[CategoryResult]:
        """Categories for many texts at once, packed into batches on this thread (offline use)."""
        model = self._category
        if model is None:
            raise RuntimeError("no category model is configured")
        if not texts:
            return []
        logits = model.batcher.infer_sync(model.encoder.heads_of(texts))
        return category_results(np.stack(logits), model.labels)

    def detect_pii_many(self, texts: Sequence[str]) -> list[PiiResult]:
        """PII spans for many texts at once; all their windows are sorted and packed together."""
        model = self._pii
        if model is None:
            return [PiiResult(find_checksum_spans(t) if self.checksums else []) for t in texts]
        return self._windowed_many(model, texts, self._pii_spans)

    def predict_many(self, task: str, texts: Sequence[str]) -> list[CategoryResult] | list[PiiResult]:
        """Any configured task's answers for many texts (offline), decoded as its head says: a label per text
        (sequence), or the model's spans (token; no checksum recognizers, which belong to PII)."""
        model = {"category": self._category, "pii": self._pii, **self._others}.get(task)
        if model is None:
            raise RuntimeError(f"no {task} model is configured")
        if not texts:
            return []
        if model.scheme is None:
            return category_results(np.stack(model.batcher.infer_sync(model.encoder.heads_of(texts))), model.labels)
        return self._windowed_many(model, texts, _model_spans)

    @staticmethod
    def _windowed_many(model: _Model, texts: Sequence[str], decode: Callable[..., list[Span]]) -> list[PiiResult]:
        """Every window of every text sorted and packed together, then decoded text by text."""
        encoded = model.encoder.encode_many(texts)
        parts = [model.encoder.parts(text, e) for text, e in zip(texts, encoded, strict=True)]
        flat = [w.ids for p in parts for w in windows_of(p)]
        logits = model.batcher.infer_sync(flat) if flat else []
        out, at = [], 0
        for text, enc, p in zip(texts, encoded, parts, strict=True):
            n = sum(len(part.windows) for part in p)
            out.append(PiiResult(decode(model, text, enc, p, logits[at : at + n])))
            at += n
        return out

    def close(self) -> None:
        """Stop the batcher threads; requests still queued fail with InferenceError. Idempotent."""
        for model in (self._category, self._pii, *self._others.values()):
            if model is not None:
                model.batcher.close()

    def _on_loop(self, chars: int) -> bool:
        """Whether `chars` characters of tokenizing or decoding may run on the event loop now: yes while
        this loop step has used less than ``_INLINE_CHARS`` in all (the count restarts each step)."""
        if chars > _INLINE_CHARS:
            return False
        loop = asyncio.get_running_loop()
        if self._step_loop is not loop:
            self._step_loop, self._step_chars = loop, 0
            loop.call_soon(self._end_step, loop)  # runs in the next step
        if self._step_chars + chars > _INLINE_CHARS:
            return False
        self._step_chars += chars
        return True

    def _end_step(self, loop: asyncio.AbstractEventLoop) -> None:
        if self._step_loop is loop:
            self._step_loop = None

    def _decode_pii(self, jobs: Sequence[tuple[str, Encoded, list[Part], Sequence[WindowResult]]],
                    stop: threading.Event | None = None) -> list[list[Span]]:
        """Spans of each (text, encoding, parts, window results) job."""
        model = self._pii
        return [self._pii_spans(model, text, encoded, parts, [r.logits for r in results])
                for text, encoded, parts, results in jobs]

    def _pii_spans(
        self, model: _Model, text: str, encoded: Encoded, parts: Sequence[Part], logits: Sequence[np.ndarray]
    ) -> list[Span]:
        spans = _model_spans(model, text, encoded, parts, logits, join_entity_parts)
        return reconcile(text, spans) if self.checksums else spans


def _whole_only(model: _Model, prepared: list[tuple[Encoded, list[Part]]], asked: int
                ) -> tuple[list[tuple[Encoded, list[Part]]], list[list[Window]], list[np.ndarray]]:
    """A request whose line windows the queue cannot take now is read through its whole windows alone, as
    with ``line_windows`` off, rather than refused for an extra reading (refused, if even that cannot run)."""
    prepared = [(encoded, parts[:1]) for encoded, parts in prepared]
    windows = [parts[0].windows for _, parts in prepared]
    flat = [w.ids for ws in windows for w in ws]
    log.info("line_windows_skipped", model=model.name, windows=len(flat), with_lines=asked)
    return prepared, windows, flat


def _model_spans(model: _Model, text: str, encoded: Encoded, parts: Sequence[Part], logits: Sequence[np.ndarray],
                 tidy: Callable[[str, list[Span]], list[Span]] | None = None) -> list[Span]:
    """The model's own spans: the whole text's, and what its lines read alone add; `tidy` runs on each
    reading's spans before they are combined (PII: the pieces of a name, a phone or an address joined)."""
    readings = _part_spans(model, text, encoded, parts, logits)
    whole, *lines = [tidy(text, spans) for spans in readings] if tidy else readings
    return add_line_spans(whole, lines) if lines else whole


def _part_spans(model: _Model, text: str, encoded: Encoded, parts: Sequence[Part],
                logits: Sequence[np.ndarray]) -> list[list[Span]]:
    """Each part's spans (the whole text first): its windows' logits merged token by token, BIO-decoded."""
    out: list[list[Span]] = []
    at = 0
    for part in parts:
        rows = logits[at : at + len(part.windows)]
        at += len(part.windows)
        if not part.windows or model.scheme is None:
            out.append([])
            continue
        merged = merge_windows(part.end - part.start, part.windows, rows)
        if model.bias is not None:
            merged = merged + model.bias
        out.append(decode_bio(merged, encoded.offsets[part.start : part.end], text, model.scheme))
    return out


def add_line_spans(whole: list[Span], lines: Sequence[list[Span]]) -> list[Span]:
    """The whole text's spans, and those its lines read alone find where it found no identifying entity
    of another type.

    A line alone has less context, so where the whole text found a name, a number or an address, its
    type stands (an address read line by line looks like names, phones and numbers); a line span of the
    same type widens it. One over untagged text, or over a context type (a place, a firm: a name the whole
    text misread as one), is added; so is the part of a line span that reaches past the identifying entities
    it overlaps (an address the whole text read into the next line's name leaves the rest of the name
    masked). Sorted, same-type overlaps merged."""
    starts = [s.start for s in whole]
    reach = list(accumulate((s.end for s in whole), max))
    added = []
    for span in chain.from_iterable(lines):
        j = bisect_left(starts, span.end) - 1  # whole spans from j down start before this one ends
        held: list[Span] = []  # identifying entities of another type that this line span overlaps
        while j >= 0 and reach[j] > span.start:
            if whole[j].end > span.start and whole[j].label != span.label and whole[j].label not in CONTEXT_ENTITIES:
                held.append(whole[j])
            j -= 1
        added += span.outside(sorted((h.start, h.end) for h in held)) if held else [span]
    return merge_overlapping([*whole, *added]) if added else whole


def _longest_token(model_dir: ModelDir) -> int:
    """Characters one token can cover at most: its vocabulary's longest entry (byte-level BPE spells a
    byte as one character, and a character is at least one byte), so a text has at least
    ``len(text) // _longest_token`` tokens."""
    return max(1, max(map(len, model_dir.load_tokenizer().get_vocab()), default=1))


def _pii_windows(model: _Model, texts: Sequence[str],
                 stop: threading.Event | None = None) -> list[tuple[Encoded, list[Part]]]:
    encoded = model.encoder.encode_all(texts, stop)
    return [(e, model.encoder.parts(text, e)) for text, e in zip(texts, encoded, strict=True)]


def _timings(
    results: Sequence[WindowResult], started: float, tokenized: float, inferred: float, decoded: float
) -> StageTimings:
    queue_ms, infer_ms, batch_size = summarize(results, (inferred - tokenized) * 1000.0)
    return StageTimings(
        queue_ms=queue_ms,
        tokenize_ms=(tokenized - started) * 1000.0,
        infer_ms=infer_ms,
        decode_ms=(decoded - inferred) * 1000.0,
        batch_size=batch_size,
    )
