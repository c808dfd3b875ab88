import asyncio
import re
import threading
import time

import numpy as np
import pytest

from model_contract.model_dir import ModelDir
from sidecar.config import BatchingConfig, ModelConfig, ModelsConfig
from sidecar.errors import InferenceCancelled, InferenceError, ModelLoadError, Overloaded
from sidecar.inference.engine import Engine, LoadedModel, add_line_spans
from sidecar.inference.heads import category_results
from sidecar.inference.windows import (
    LINE_TOKENS,
    TextEncoder,
    line_ranges,
    merge_windows,
    piece_starts,
    window_starts,
)
from sidecar.results import Span
from tests.conftest import CATEGORY_LABELS
from tests.inference_fakes import SCORE, DigitTagger, Fingerprint, fingerprint_logits, onnx_copy

# Words the tiny tokenizer knows and that hold no digits: filler around the numbers the fake tags.
WORDS = ["the", "court", "held", "that", "the", "contract", "was", "void", "for", "lack", "of", "consideration", "and", "the", "tenant"]
MAX_LENGTH, STRIDE = 16, 4  # 14 text tokens per window, stepping by 10


def filler(n_words: int, offset: int = 0) -> str:
    return " ".join(WORDS[(offset + i) % len(WORDS)] for i in range(n_words))


def digit_runs(text: str) -> list[tuple[int, int]]:
    return [(m.start(), m.end()) for m in re.finditer(r"\d+", text)]


def offsets(result) -> list[tuple[str, int, int]]:
    return [(s.label, s.start, s.end) for s in result.spans]


@pytest.fixture
def engines():
    made: list[Engine] = []
    yield made
    for engine in made:
        engine.close()


@pytest.fixture
def fake_pii(tiny_pii_dir, engines):
    """An engine whose PII model is the DigitTagger fake, with small windows."""

    def build(checksums: bool = False, gate: threading.Event | None = None, tagger: type[DigitTagger] = DigitTagger,
              line_windows: bool = True, entity_bias: dict | None = None, **batching) -> tuple[Engine, DigitTagger]:
        model_dir = ModelDir.read(tiny_pii_dir)
        backend = tagger(model_dir, gate)
        config = ModelConfig(path=str(tiny_pii_dir), max_length=MAX_LENGTH, stride=STRIDE, line_windows=line_windows,
                             entity_bias=entity_bias or {})
        engine = Engine(
            pii=LoadedModel(model_dir, config, backend),
            batching=BatchingConfig(**batching),
            checksums=checksums,
        )
        engines.append(engine)
        return engine, backend

    return build


@pytest.fixture
def fake_category(tiny_category_dir, engines):
    def build(gate: threading.Event | None = None, **batching) -> tuple[Engine, Fingerprint]:
        model_dir = ModelDir.read(tiny_category_dir)
        backend = Fingerprint(len(CATEGORY_LABELS), gate)
        config = ModelConfig(path=str(tiny_category_dir), max_length=MAX_LENGTH, stride=STRIDE)
        engine = Engine(category=LoadedModel(model_dir, config, backend), batching=BatchingConfig(**batching))
        engines.append(engine)
        return engine, backend

    return build


@pytest.fixture(scope="module")
def encoder(tiny_pii_dir) -> TextEncoder:
    return TextEncoder.for_model(ModelDir.read(tiny_pii_dir), MAX_LENGTH, STRIDE)


async def until(predicate, timeout_s: float = 10.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not predicate():
        assert loop.time() < deadline, "condition never became true"
        await asyncio.sleep(0.001)


@pytest.mark.parametrize("n_tokens", [0, 1, 14, 15, 23, 24, 25, 100, 1001])
def test_windows_cover_every_token_overlap_by_the_stride_and_end_at_the_text_end(n_tokens):
    body, stride = 14, 4
    starts = window_starts(n_tokens, body, stride)
    covered = np.zeros(n_tokens, dtype=bool)
    for s in starts:
        covered[s : s + body] = True
    assert covered.all()
    if n_tokens:
        assert min(starts[-1] + body, n_tokens) == n_tokens
        assert starts[-1] + body <= max(n_tokens, body)
    for a, b in zip(starts, starts[1:], strict=False):
        assert a + body - b >= stride


def test_category_window_of_a_long_text_is_its_first_tokens(encoder):
    text = filler(3000)
    full = encoder.encode(text)
    head = encoder.head_of(text)
    assert len(head) == MAX_LENGTH
    assert head[1:-1].tolist() == full.ids[: MAX_LENGTH - 2].tolist()
    assert encoder.head_of("x" * 5000)[1:-1].tolist() == encoder.encode("x" * 5000).ids[:14].tolist()
    assert [h.tolist() for h in encoder.heads_of([text, "short"])] == [head.tolist(), encoder.head_of("short").tolist()]


def long_mixed_text(n_chars: int) -> str:
    """Words, runs of spaces, newlines, tabs, punctuation, CJK and emoji: the places a cut could go wrong."""
    pieces = [*WORDS, "  ", "\n\n", "\t", "don't", "?!", "张伟", "😀👍🏽", "4111 1111", "js@example.com"]
    out, size, i = [], 0, 0
    while size < n_chars:
        out.append(pieces[(i * 7) % len(pieces)])
        size += len(out[-1]) + 1
        i += 1
    return " ".join(out)


def test_long_texts_tokenized_in_pieces_get_the_whole_texts_tokens_and_offsets(encoder):
    texts = [long_mixed_text(70_000), "", "short one", long_mixed_text(20_000)[::-1], "x" * 40_000]
    assert len(piece_starts(texts[0], 16384)) > 4  # really cut into pieces, more than one call's worth
    for text, piece_wise in zip(texts, encoder.encode_all(texts), strict=True):
        whole = encoder.encode(text)
        if text.startswith("xxx"):  # no space to cut at: only the tokens at each hard cut may differ
            assert len(piece_wise) == pytest.approx(len(whole), abs=10)
            continue
        assert piece_wise.ids.tolist() == whole.ids.tolist()
        assert piece_wise.offsets.tolist() == whole.offsets.tolist()


def test_piece_cuts_fall_before_a_space_that_follows_a_non_space():
    text = long_mixed_text(100_000)
    starts = piece_starts(text, 16384)
    assert starts[0] == 0 and all(0 < b - a <= 16384 for a, b in zip(starts, starts[1:], strict=False))
    assert all(text[s] == " " and not text[s - 1].isspace() for s in starts[1:])
    assert piece_starts("x" * 40_000, 16384) == [0, 16384, 32768]


def test_tokenizing_stops_between_calls_once_its_caller_has_gone(encoder):
    stop = threading.Event()
    stop.set()
    with pytest.raises(InferenceCancelled):
        encoder.encode_all([long_mixed_text(200_000)], stop)


def test_the_category_window_of_a_huge_text_costs_about_one_window(encoder):
    text = long_mixed_text(4_000_000)
    started = time.perf_counter()
    head = encoder.head_of(text)
    assert time.perf_counter() - started < 0.5  # the whole text takes seconds
    assert head[1:-1].tolist() == encoder.encode(text[:10_000]).ids[: MAX_LENGTH - 2].tolist()
    no_space = "ab" * 1_000_000
    assert encoder.head_of(no_space)[1:-1].tolist() == encoder.encode(no_space[:5_000]).ids[: MAX_LENGTH - 2].tolist()


async def test_all_texts_of_a_request_are_detected_as_one_job(fake_pii):
    engine, backend = fake_pii()
    texts = [f"{filler(i % 7 + 1, i)} call {5550000 + 7919 * i}" for i in range(300)] + ["", "x"]
    results = await engine.detect_pii_all(texts)
    for text, result in zip(texts, results, strict=True):
        assert offsets(result) == [("PHONE_NUMBER", s, e) for s, e in digit_runs(text)]
    assert len(backend.calls) < 20  # the windows of all texts shared forward passes
    [alone] = await engine.detect_pii_all([texts[5]])
    assert offsets(alone) == offsets(results[5])


async def test_a_burst_of_requests_shares_one_pass_even_when_tokenized_off_the_loop(fake_pii, fake_category,
                                                                                 monkeypatch):
    text = f"{filler(5)} call 5550100"  # one window
    burst = [text] * 120
    assert sum(map(len, burst)) > 4096  # more than one loop step may tokenize on the loop
    pii, tagger = fake_pii(max_batch_size=128, max_batch_tokens=16384)  # room for the whole burst in one take
    hops = []
    to_thread = asyncio.to_thread
    monkeypatch.setattr(asyncio, "to_thread", lambda *a, **k: hops.append(a[0]) or to_thread(*a, **k))
    results = await asyncio.gather(*(pii.detect_pii(t) for t in burst))
    assert len(tagger.calls) == 1 and all(offsets(r) == offsets(results[0]) != [] for r in results)
    assert hops == []  # tokenized and decoded as groups, not a thread hop per request
    category, fingerprint = fake_category(max_batch_size=128, max_batch_tokens=16384)
    labels = await asyncio.gather(*(category.classify(t) for t in burst))
    assert len(fingerprint.calls) == 1 and len({r.label for r in labels}) == 1


async def test_a_burst_tokenized_off_the_loop_stops_once_every_caller_has_gone(fake_pii, monkeypatch):
    engine, tagger = fake_pii(max_batch_size=128)
    started, release = threading.Event(), threading.Event()
    stops: list[threading.Event] = []
    prepare = engine._pii.tokenize._work

    def slow(texts, stop):
        stops.append(stop)
        started.set()
        release.wait(10)
        return prepare(texts, stop)

    monkeypatch.setattr(engine._pii.tokenize, "_work", slow)
    calls = [asyncio.ensure_future(engine.detect_pii(f"{filler(5)} call 5550100")) for _ in range(120)]
    await until(started.is_set)
    for call in calls:
        call.cancel()
    await asyncio.gather(*calls, return_exceptions=True)
    assert stops[0].is_set()
    release.set()
    await asyncio.sleep(0.05)
    assert tagger.calls == []  # nothing left to run for callers that are gone


async def test_on_loop_work_is_capped_per_event_loop_step(fake_pii):
    engine, _ = fake_pii()
    assert engine._on_loop(3000) and not engine._on_loop(3000) and engine._on_loop(1000)
    assert not engine._on_loop(5000)  # long texts always go to a thread
    await asyncio.sleep(0)  # the next step starts with a fresh budget
    assert engine._on_loop(3000)


async def test_an_entity_after_the_first_three_windows_is_found_with_exact_offsets(fake_pii, encoder):
    engine, _ = fake_pii()
    text = f"{filler(60)} call 4155550100 please {filler(20)}"
    enc = encoder.encode(text)
    first_digit = int(np.flatnonzero(enc.offsets[:, 1] > text.index("4155550100"))[0])
    third_window_end = window_starts(len(enc), 14, STRIDE)[2] + 14
    assert first_digit > third_window_end  # the number sits past the first three windows
    result = await engine.detect_pii(text)
    start = text.index("4155550100")
    assert offsets(result) == [("PHONE_NUMBER", start, start + 10)]


async def test_an_entity_straddling_a_window_edge_comes_out_whole(fake_pii, encoder):
    engine, _ = fake_pii()
    number = "41555501004155550100"
    for n_words in range(5, 40):
        text = f"{filler(n_words)} {number} {filler(10)}"
        enc = encoder.encode(text)
        start = text.index(number)
        tokens = np.flatnonzero((enc.offsets[:, 0] < start + len(number)) & (enc.offsets[:, 1] > start))
        first, last = int(tokens[0]), int(tokens[-1])
        if any(first < w < last for w in window_starts(len(enc), 14, STRIDE)):
            break
    else:
        pytest.fail("no placement put the number across a window edge")
    result = await engine.detect_pii(text)
    assert offsets(result) == [("PHONE_NUMBER", start, start + len(number))]


class EarlyDigitTagger(DigitTagger):
    """Tags digits only among a window's first four text tokens: a model that misses what it reads after
    unrelated text (as the bundled one misses more names deep in a long prompt than alone)."""

    def logits(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        out = super().logits(input_ids, attention_mask)
        out[:, 5:] = 0.0
        out[:, 5:, self.outside] = SCORE
        return out


@pytest.mark.parametrize("sync", [False, True])
async def test_a_number_the_whole_text_hides_is_found_in_its_line_read_alone(fake_pii, sync):
    text = f"{filler(20)}\ncall 4155550100 now"
    start = text.index("4155550100")
    for line_windows, expected in ((False, []), (True, [("PHONE_NUMBER", start, start + 10)])):
        engine, _ = fake_pii(tagger=EarlyDigitTagger, line_windows=line_windows)
        result = engine.detect_pii_many([text])[0] if sync else await engine.detect_pii(text)
        assert offsets(result) == expected


async def test_a_text_whose_lines_the_queue_cannot_take_is_read_whole_not_refused(fake_pii, encoder):
    text = "\n".join(f"{filler(16, i)} 4155550{i:03d}" for i in range(12))
    whole = len(encoder.windows(encoder.encode(text)))
    engine, backend = fake_pii(max_queue=whole)
    plain, _ = fake_pii(line_windows=False)
    result = await engine.detect_pii(text)
    assert offsets(result) == offsets(await plain.detect_pii(text)) and len(result.spans) == 12
    assert len(backend.rows_seen()) == whole  # the whole text's windows only: the lines would not fit
    tight, _ = fake_pii(max_queue=whole - 1)
    with pytest.raises(Overloaded):  # the reading the guarantee rests on is still all or nothing
        await tight.detect_pii(text)


async def test_a_single_line_text_is_read_once(fake_pii, encoder):
    engine, backend = fake_pii()
    text = f"{filler(30)} call 4155550100"
    await engine.detect_pii(text)
    assert len(backend.rows_seen()) == len(encoder.windows(encoder.encode(text)))


def test_each_line_is_a_part_with_windows_of_its_own(tiny_pii_dir):
    encoder = TextEncoder.for_model(ModelDir.read(tiny_pii_dir), MAX_LENGTH, STRIDE, line_windows=True)
    text = f"{filler(20)}\n{filler(40)}\r\nend"
    enc = encoder.encode(text)
    whole, *lines = encoder.parts(text, enc)
    assert (whole.start, whole.end) == (0, len(enc)) and len(whole.windows) == len(encoder.windows(enc))
    assert [text[enc.offsets[p.start, 0] : enc.offsets[p.end - 1, 1]].strip() for p in lines] == [
        filler(20), filler(40), "end"]
    assert [(p.start, p.end) for p in lines] == line_ranges(text, enc.offsets, LINE_TOKENS)
    long_line = lines[1]
    assert len(long_line.windows) == len(window_starts(long_line.end - long_line.start, 14, STRIDE)) > 1
    assert long_line.windows[0].ids[1:-1].tolist() == enc.ids[long_line.start : long_line.start + 14].tolist()
    assert encoder.parts(filler(40), encoder.encode(filler(40)))[1:] == []
    assert TextEncoder.for_model(ModelDir.read(tiny_pii_dir), MAX_LENGTH, STRIDE).parts(text, enc)[1:] == []


def test_short_lines_are_read_with_the_lines_after_them_so_tiny_lines_cost_few_windows(encoder):
    text = "".join(f"{i}\n" for i in range(300)) + filler(30)
    enc = encoder.encode(text)
    ranges = line_ranges(text, enc.offsets, 16)
    assert [a for a, _ in ranges[1:]] == [b for _, b in ranges[:-1]] and (ranges[0][0], ranges[-1][1]) == (0, len(enc))
    assert all(b - a >= 16 for a, b in ranges[:-1]) and len(ranges) <= len(enc) // 16 + 1
    line_starts = {0} | {i + 1 for i, c in enumerate(text) if c == "\n"}
    assert all(int(enc.offsets[a, 0]) in line_starts for a, _ in ranges)  # a part begins where a line does
    assert len(line_ranges(text, enc.offsets, 1)) == 301  # a range per line when every line may stand alone


def span(label: str, start: int, end: int, score: float = 0.9) -> Span:
    return Span(label, start, end, score)


def test_a_line_adds_what_the_whole_text_missed_and_never_retypes_an_identifying_entity():
    whole = [span("ADDRESS", 0, 30), span("PERSON", 40, 50)]
    lines = [[span("PHONE_NUMBER", 0, 2), span("PERSON", 10, 20)],  # inside the address: its type stands
             [span("PERSON", 38, 45)],  # the same type reaching further widens the name
             [span("EMAIL_ADDRESS", 60, 70)]]  # over untagged text: added
    assert add_line_spans(whole, lines) == [span("ADDRESS", 0, 30), span("PERSON", 38, 50),
                                            span("EMAIL_ADDRESS", 60, 70)]
    assert add_line_spans(whole, [[], [span("PERSON", 0, 5)]]) == whole
    place = [span("LOCATION", 0, 10)]  # a context type the default policy lets through: a line's name is added
    assert add_line_spans(place, [[span("PERSON", 0, 10, 0.8)]]) == [span("LOCATION", 0, 10), span("PERSON", 0, 10, 0.8)]
    assert add_line_spans([], [[span("PERSON", 3, 5)]]) == [span("PERSON", 3, 5)]


def test_the_part_of_a_line_span_past_an_identifying_entity_of_another_type_is_added():
    # "Ship to 12 Main St, Hamilton\nJO ANN SMITH": the whole text read the address into "JO ANN"; the line
    # read "JO ANN SMITH" as a name. The address stands, and "SMITH" is masked too.
    whole = [span("ADDRESS", 8, 35)]
    assert add_line_spans(whole, [[span("PERSON", 29, 41)]]) == [span("ADDRESS", 8, 35), span("PERSON", 35, 41)]
    # a line span around an entity of another type: both sides are added
    assert add_line_spans([span("PHONE_NUMBER", 10, 20)], [[span("PERSON", 5, 25)]]) == [
        span("PERSON", 5, 10), span("PHONE_NUMBER", 10, 20), span("PERSON", 20, 25)]


def test_merged_window_predictions_equal_whole_text_predictions(tiny_pii_dir, encoder):
    """The fake sees only its left neighbour, so a token first in its window is mis-tagged there; the
    merge must take such tokens from the window where they have context."""
    tagger = DigitTagger(ModelDir.read(tiny_pii_dir))
    text = " ".join(f"{filler(3, i)} 41555501004155550100" for i in range(8))
    enc = encoder.encode(text)
    windows = encoder.windows(enc)
    assert len(windows) > 3
    per_window = [tagger.run(w.ids[None, :], np.ones((1, len(w.ids)), dtype=np.int64))[0] for w in windows]
    merged = merge_windows(len(enc), windows, per_window)
    whole = tagger.run(enc.ids[None, :], np.ones((1, len(enc)), dtype=np.int64))[0]
    assert merged.argmax(axis=1).tolist() == whole.argmax(axis=1).tolist()


async def test_every_entity_in_a_long_text_is_found_none_is_left_past_the_limit(fake_pii):
    engine, backend = fake_pii()
    text = " ".join(f"{filler(7, i)} ref {1000 + 37 * i} ok" for i in range(120))
    assert len(text) > 4096  # also takes the worker-thread tokenization path
    result = await engine.detect_pii(text)
    assert offsets(result) == [("PHONE_NUMBER", s, e) for s, e in digit_runs(text)]
    assert sum(len(c) for c in backend.calls) > 50  # many windows, all of them run


async def test_32_concurrent_pii_calls_each_get_their_own_answer(fake_pii):
    gate = threading.Event()
    engine, backend = fake_pii(gate=gate)
    texts = [f"{filler(i % 9 + 1, i)} call {5550000 + 7919 * i} {filler(i % 5, i)}" for i in range(32)]
    texts[5] = f"{filler(40)} and {12 * 31} then {filler(30)} {99}"  # several windows, two numbers
    holder = asyncio.create_task(engine.detect_pii("hold 1"))
    await asyncio.to_thread(backend.entered.wait, 10)
    calls = [asyncio.create_task(engine.detect_pii(t)) for t in texts]
    encoder = engine._pii.encoder
    windows = sum(len(encoder.windows(encoder.encode(t))) for t in texts)
    await until(lambda: engine._pii.batcher.queued == windows)
    gate.set()
    results = await asyncio.gather(*calls)
    await holder
    for text, result in zip(texts, results, strict=True):
        assert offsets(result) == [("PHONE_NUMBER", s, e) for s, e in digit_runs(text)]
    assert max(len(c) for c in backend.calls) > 1  # the streams really shared forward passes


async def test_32_concurrent_classify_calls_each_get_their_own_answer(fake_category):
    gate = threading.Event()
    engine, backend = fake_category(gate=gate)
    texts = [f"{filler(i % 11 + 1, i)} question {i}" for i in range(32)]
    holder = asyncio.create_task(engine.classify("hold"))
    await asyncio.to_thread(backend.entered.wait, 10)
    calls = [asyncio.create_task(engine.classify(t)) for t in texts]
    await until(lambda: engine._category.batcher.queued == 32)
    gate.set()
    results = await asyncio.gather(*calls)
    await holder
    encoder = engine._category.encoder
    for text, result in zip(texts, results, strict=True):
        ids = encoder.head_of(text)[None, :]
        [want] = category_results(fingerprint_logits(ids, np.ones_like(ids), 3), CATEGORY_LABELS)
        assert (result.label, result.confidence) == pytest.approx((want.label, want.confidence))
    assert len({round(r.confidence, 6) for r in results}) > 16  # answers differ, so a mix-up would show
    assert max(len(c) for c in backend.calls) > 1


@pytest.fixture(scope="module")
def real_engines(tiny_category_dir, tiny_pii_dir, tmp_path_factory):
    """The tiny untrained models through PyTorch, and the PII model through ONNX Runtime."""
    onnx_pii = onnx_copy(tiny_pii_dir, tmp_path_factory.getbasetemp())
    batching = BatchingConfig(max_batch_size=8, max_wait_ms=1.0)
    torch_engine = Engine.load(
        ModelsConfig(
            category=ModelConfig(path=str(tiny_category_dir), device="cpu", max_length=32, stride=8),
            pii=ModelConfig(path=str(tiny_pii_dir), device="cpu", max_length=32, stride=8),
        ),
        batching,
        checksums=False,
    )
    onnx_engine = Engine.load(
        ModelsConfig(pii=ModelConfig(path=str(onnx_pii), runtime="onnx", device="cpu", max_length=32, stride=8)),
        batching,
        checksums=False,
    )
    yield {"torch": torch_engine, "onnx": onnx_engine}
    torch_engine.close()
    onnx_engine.close()


def test_two_cpu_models_loaded_together_split_the_cores(tiny_category_dir, tiny_pii_dir, tmp_path_factory, monkeypatch):
    from sidecar.inference import backends

    monkeypatch.setattr(backends, "usable_cores", lambda: 8)
    onnx_pii = onnx_copy(tiny_pii_dir, tmp_path_factory.getbasetemp())
    pii = ModelConfig(path=str(onnx_pii), runtime="onnx", device="cpu", max_length=32, stride=8)
    both = Engine.load(ModelsConfig(category=ModelConfig(path=str(tiny_category_dir), device="cpu"), pii=pii),
                       BatchingConfig(), checksums=False)
    alone = Engine.load(ModelsConfig(pii=pii), BatchingConfig(), checksums=False)
    try:
        assert both.describe()["pii"]["threads"] == 4 and alone.describe()["pii"]["threads"] == 0
    finally:
        both.close()
        alone.close()


REAL_TEXTS = [
    "Solve for x: 3x + 5 = 11.",
    "My name is John Smith and my email is john.smith@example.com.",
    "Which organelle makes ATP?",
    "The court held that the contract was void for lack of consideration. " * 4,
    "我的名字是张伟，电话13800138000。",
    "Hi",
]


def same_spans(a, b) -> bool:
    return [(s.label, s.start, s.end) for s in a.spans] == [(s.label, s.start, s.end) for s in b.spans] and all(
        x.score == pytest.approx(y.score, abs=1e-4) for x, y in zip(a.spans, b.spans, strict=True)
    )


@pytest.mark.parametrize("runtime", ["torch", "onnx"])
async def test_batched_pii_results_equal_one_at_a_time_results(real_engines, runtime):
    engine = real_engines[runtime]
    alone = [await engine.detect_pii(t) for t in REAL_TEXTS]
    together = await asyncio.gather(*(engine.detect_pii(t) for t in REAL_TEXTS))
    offline = engine.detect_pii_many(REAL_TEXTS)
    assert any(r.spans for r in alone)  # the untrained model tags something, so equality means something
    for a, b, c in zip(alone, together, offline, strict=True):
        assert same_spans(a, b) and same_spans(a, c)


async def test_batched_category_results_equal_one_at_a_time_results(real_engines):
    engine = real_engines["torch"]
    alone = [await engine.classify(t) for t in REAL_TEXTS]
    together = await asyncio.gather(*(engine.classify(t) for t in REAL_TEXTS))
    offline = engine.classify_many(REAL_TEXTS)
    for a, b, c in zip(alone, together, offline, strict=True):
        assert a.label == b.label == c.label
        assert a.confidence == pytest.approx(b.confidence, abs=1e-5) == pytest.approx(c.confidence, abs=1e-5)


def test_loaded_engine_describes_its_models(real_engines, tiny_pii_dir):
    torch_engine = real_engines["torch"]
    info = torch_engine.describe()
    assert info["category"]["runtime"] == "torch" and info["category"]["providers"] == ["cpu"]
    assert info["pii"]["stride"] == 8 and info["pii"]["max_length"] == 32
    assert torch_engine.category_labels == CATEGORY_LABELS
    assert torch_engine.pii_labels == ["EMAIL_ADDRESS", "PERSON", "PHONE_NUMBER"]
    assert torch_engine.has_category and torch_engine.has_pii
    onnx_engine = real_engines["onnx"]
    assert onnx_engine.describe()["pii"]["runtime"] == "onnx" and onnx_engine.describe()["category"] is None
    assert not onnx_engine.has_category and onnx_engine.category_labels is None


async def test_results_carry_stage_timings(real_engines):
    result = await real_engines["torch"].classify("Which court hears appeals?")
    assert result.timings is not None and result.timings.batch_size >= 1
    pii = await real_engines["torch"].detect_pii("Call John")
    assert pii.timings is not None and pii.timings.batch_size >= 1


async def test_classify_without_a_category_model_is_a_runtime_error(fake_pii):
    engine, _ = fake_pii()
    with pytest.raises(RuntimeError, match="no category model"):
        await engine.classify("hello")
    with pytest.raises(RuntimeError, match="no category model"):
        engine.classify_many(["hello"])


async def test_without_a_pii_model_only_checksums_find_pii(fake_category, engines):
    engine, _ = fake_category()
    text = "card 4111 1111 1111 1111"
    assert offsets(await engine.detect_pii(text)) == [("CREDIT_CARD", 5, 24)]
    assert offsets(engine.detect_pii_many([text])[0]) == [("CREDIT_CARD", 5, 24)]
    quiet = Engine(checksums=False)
    engines.append(quiet)
    assert (await quiet.detect_pii(text)).spans == []
    assert engine.detects_pii and not quiet.detects_pii


async def test_checksums_add_a_card_the_model_tagged_as_something_else(fake_pii):
    text = "pay 4111 1111 1111 1111 now"
    with_checks, _ = fake_pii(checksums=True)
    without, _ = fake_pii(checksums=False)
    labels = [s.label for s in (await with_checks.detect_pii(text)).spans]
    assert "CREDIT_CARD" in labels and "PHONE_NUMBER" in labels
    assert {s.label for s in (await without.detect_pii(text)).spans} == {"PHONE_NUMBER"}


async def test_empty_text_has_no_spans_and_runs_no_model(fake_pii):
    engine, backend = fake_pii()
    assert (await engine.detect_pii("")).spans == []
    assert engine.detect_pii_many(["", "x 12"])[0].spans == []
    assert len(backend.calls) == 1


async def test_a_model_failure_is_an_inference_error_and_the_next_call_works(fake_pii):
    engine, backend = fake_pii()
    backend.fail_next = 1
    with pytest.raises(InferenceError, match="pii model failed"):
        await engine.detect_pii("call 5551234")
    assert offsets(await engine.detect_pii("call 5551234")) == [("PHONE_NUMBER", 5, 12)]


async def test_a_text_with_more_windows_than_the_queue_holds_is_overloaded(fake_pii):
    engine, _ = fake_pii(max_queue=2)
    with pytest.raises(Overloaded):
        await engine.detect_pii(filler(200))


async def test_a_closed_engine_refuses_work(fake_pii):
    engine, _ = fake_pii()
    engine.close()
    engine.close()
    with pytest.raises(InferenceError, match="closed"):
        await engine.detect_pii("call 5551234")


async def test_entity_bias_moves_a_types_tags_for_or_against_it(fake_pii):
    text = "call 4155550100 please"
    start = text.index("4155550100")
    engine, _ = fake_pii()
    assert offsets(await engine.detect_pii(text)) == [("PHONE_NUMBER", start, start + 10)]
    # the fake scores a digit's phone tag 10 and O 0: -10 ties them, and a tie goes to O
    engine, _ = fake_pii(entity_bias={"PHONE_NUMBER": -10.0})
    assert offsets(await engine.detect_pii(text)) == []
    # every token's best tag scores 10: a name's tags at 10.5 win everywhere
    engine, _ = fake_pii(entity_bias={"PERSON": 10.5})
    assert offsets(await engine.detect_pii(text)) == [("PERSON", 0, len(text))]
    assert engine.describe()["pii"]["entity_bias"] == {"PERSON": 10.5}


def test_entity_bias_for_a_type_the_model_lacks_or_a_category_model_is_a_load_error(tiny_pii_dir,
                                                                                   tiny_category_dir):
    with pytest.raises(ModelLoadError, match="models.pii: entity_bias names PERSONA, which the model does not tag"):
        Engine.load(ModelsConfig(pii=ModelConfig(path=str(tiny_pii_dir), entity_bias={"PERSONA": 1.0})),
                    BatchingConfig())
    with pytest.raises(ModelLoadError, match="models.category: entity_bias is for token"):
        Engine.load(ModelsConfig(category=ModelConfig(path=str(tiny_category_dir), entity_bias={"PERSON": 1.0})),
                    BatchingConfig())


def test_load_names_the_config_key_of_a_bad_model_directory(tmp_path, tiny_pii_dir):
    with pytest.raises(ModelLoadError, match="models.pii: .*no such model directory"):
        Engine.load(ModelsConfig(pii=ModelConfig(path=str(tmp_path / "missing"))), BatchingConfig())
    with pytest.raises(ModelLoadError, match="models.category: .*expected a 'category' model"):
        Engine.load(ModelsConfig(category=ModelConfig(path=str(tiny_pii_dir))), BatchingConfig())


def test_on_batch_receives_every_forward_pass(tiny_pii_dir):
    seen = []
    engine = Engine.load(
        ModelsConfig(pii=ModelConfig(path=str(tiny_pii_dir), device="cpu")),
        BatchingConfig(),
        on_batch=lambda *args: seen.append(args),
    )
    try:
        engine.detect_pii_many(["call John", "hello there"])
    finally:
        engine.close()
    [(model, batch_size, tokens, infer_ms)] = seen
    assert (model, batch_size) == ("pii", 2) and tokens > 4 and infer_ms >= 0


def test_a_stride_that_does_not_fit_the_models_window_names_the_model(tiny_pii_dir):
    model_dir = ModelDir.read(tiny_pii_dir)
    config = ModelConfig(path=str(tiny_pii_dir), max_length=1024, stride=600)  # the model has 512 positions
    with pytest.raises(ModelLoadError, match="models.pii: stride 600 must be smaller than max_length - 2 = 510"):
        Engine(pii=LoadedModel(model_dir, config, DigitTagger(model_dir)))


async def test_a_configured_window_longer_than_the_model_is_clamped_to_its_positions(tiny_pii_dir, engines):
    model_dir = ModelDir.read(tiny_pii_dir)
    config = ModelConfig(path=str(tiny_pii_dir), max_length=4096, stride=64)
    backend = DigitTagger(model_dir)
    engine = Engine(pii=LoadedModel(model_dir, config, backend))
    engines.append(engine)
    await engine.detect_pii(filler(2000))
    assert engine.describe()["pii"]["max_length"] == 512
    assert max(c.shape[1] for c in backend.calls) == 512


def test_warm_up_runs_each_model_once_and_a_model_that_cannot_run_fails_to_load(tiny_pii_dir, engines):
    model_dir = ModelDir.read(tiny_pii_dir)
    config = ModelConfig(path=str(tiny_pii_dir))
    backend = DigitTagger(model_dir)
    engine = Engine(pii=LoadedModel(model_dir, config, backend))
    engines.append(engine)
    engine.warm_up()
    assert len(backend.calls) == 1
    backend.fail_next = 1
    with pytest.raises(ModelLoadError, match="models.pii: the first forward pass failed"):
        engine.warm_up()


def test_warm_up_reaches_both_sessions_of_a_backend_that_runs_small_passes_on_one_thread(tiny_pii_dir, engines):
    model_dir = ModelDir.read(tiny_pii_dir)
    backend = DigitTagger(model_dir)
    backend.small_pass_tokens = 8
    engine = Engine(pii=LoadedModel(model_dir, ModelConfig(path=str(tiny_pii_dir)), backend))
    engines.append(engine)
    engine.warm_up()
    assert [c.size <= 8 for c in backend.calls] == [True, False]


# Deadlines and stopping work for callers that have gone.


def priced(engine_model, per_token_s: float) -> None:
    """Make a model's batcher price every token at `per_token_s`, learning nothing from the fake's passes."""
    cost = engine_model.batcher.cost
    cost.per_token_s = per_token_s
    cost.observe = lambda *_: None


async def test_every_async_call_takes_a_deadline_and_refuses_work_that_cannot_meet_it(fake_pii,
                                                                                       fake_category):
    loop = asyncio.get_running_loop()
    pii, _ = fake_pii()
    category, _ = fake_category()
    later = loop.time() + 10.0
    assert offsets(await pii.detect_pii("call 5551234", deadline=later)) == [("PHONE_NUMBER", 5, 12)]
    [result] = await pii.detect_pii_all(["call 5551234"], deadline=later)
    assert offsets(result) == [("PHONE_NUMBER", 5, 12)]
    assert (await category.classify("which court", deadline=later)).label in CATEGORY_LABELS
    gone = loop.time() - 0.001
    for call in (pii.detect_pii("call 5551234", deadline=gone), pii.detect_pii_all(["x 1"], deadline=gone),
                 category.classify("which court", deadline=gone)):
        with pytest.raises(Overloaded, match="cannot meet the deadline"):
            await call
    assert pii._pii.batcher.shed == 2 and category._category.batcher.shed == 1


async def test_a_long_text_that_cannot_meet_its_deadline_is_refused_before_it_is_tokenized(fake_pii,
                                                                                            monkeypatch):
    engine, tagger = fake_pii()
    priced(engine._pii, 0.01)
    tokenized = []
    monkeypatch.setattr(engine._pii.tokenize, "run", lambda texts: tokenized.append(texts))
    text = filler(2000)
    assert len(text) > 4096
    with pytest.raises(Overloaded, match="cannot meet the deadline"):
        await engine.detect_pii(text, deadline=asyncio.get_running_loop().time() + 0.25)
    assert tokenized == [] and tagger.calls == []


async def test_refusals_reach_the_on_shed_callback(tiny_pii_dir, engines):
    model_dir = ModelDir.read(tiny_pii_dir)
    shed = []
    engine = Engine(pii=LoadedModel(model_dir, ModelConfig(path=str(tiny_pii_dir)), DigitTagger(model_dir)),
                    on_shed=lambda *args: shed.append(args))
    engines.append(engine)
    with pytest.raises(Overloaded):
        await engine.detect_pii("call 5551234", deadline=asyncio.get_running_loop().time() - 1.0)
    assert shed == [("pii", "deadline")]


class HeldSession:
    """A real ONNX Runtime session whose passes wait, once the test holds them, until their RunOptions ask
    them to stop, then run: ONNX Runtime itself then refuses the pass."""

    def __init__(self, session):
        self.session = session
        self.hold = True
        self.entered = threading.Event()
        self.errors: list[str] = []

    def run(self, names, feeds, options=None):
        if self.hold:
            self.entered.set()
            for _ in range(1000):  # the batcher's thread stops the pass from the event loop
                if options is not None and options.terminate:
                    break
                time.sleep(0.01)  # polls the flag: ORT offers no callback
        try:
            return self.session.run(names, feeds, options)
        except Exception as e:
            self.errors.append(str(e))
            raise


async def test_a_caller_cancelled_mid_pass_has_its_onnx_pass_terminated_and_the_next_request_is_served(
        tiny_pii_dir, tmp_path_factory):
    onnx_pii = onnx_copy(tiny_pii_dir, tmp_path_factory.getbasetemp())
    config = ModelConfig(path=str(onnx_pii), runtime="onnx", device="cpu", max_length=32, stride=8,
                         small_pass_tokens=0)  # every pass on the session the test holds
    engine = Engine.load(ModelsConfig(pii=config), BatchingConfig(), checksums=False)
    try:
        backend = engine._pii.backend
        held = backend._session = HeldSession(backend._session)
        doomed = asyncio.create_task(engine.detect_pii("My name is John Smith", deadline=None))
        await asyncio.to_thread(held.entered.wait, 10)
        doomed.cancel()
        with pytest.raises(asyncio.CancelledError):
            await doomed
        await until(lambda: held.errors != [])
        assert "terminate" in held.errors[0]
        held.hold = False
        result = await engine.detect_pii("My name is John Smith")
        assert result.timings is not None and engine._pii.batcher._thread.is_alive()
    finally:
        engine.close()
