"""From a request body to a Decision: decode, parse, run the models, route, apply the PII policy, all under
one deadline.

Classification runs only when the client asked for the virtual model (or named none) on a routed API; PII
detection runs on every text of the body (see `sidecar.request`), concurrently with it, and the pattern
recognizers (email, phone, SSN, IP, URL credentials) run beside the model when ``pii.patterns: always``.
When inference fails, is refused (overload) or misses the deadline, the failure policy answers:
``fail_closed`` (shipped) re-raises `InferenceError` and the processor answers 503 with Retry-After;
``fail_open`` returns a ``degraded`` decision that routes to the default model and masks or blocks only
what the checksum and pattern recognizers find. fail_open therefore trades PII protection for
availability: names, street addresses and other entities only the model recognises pass unmasked while
it is failing.

The deadline grows with the body (``failure.timeout_ms`` + ``timeout_ms_per_kib`` per KiB, capped at
``max_timeout_ms``) and covers the whole decision: the models get what is left of it after parsing, less a
reserve for the no-model fallback. Bodies over ``failure.max_inspect_bytes`` never reach the models.
Decompression, parsing, the fallback and the rewrite of large bodies run on a worker thread, so the event
loop keeps serving other streams meanwhile.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote, unquote_plus

from sidecar.body import decompress
from sidecar.checksums import glued_number
from sidecar.config import Config, PiiPolicyConfig
from sidecar.errors import BodyTooLarge, InferenceError, InferenceTimeout, NoText, PiiInField, RequestError
from sidecar.masking import anonymize, resolve_conflicts
from sidecar.policy import (
    PiiVerdict,
    Route,
    choose_route,
    default_route,
    kept_spans,
    needs_category,
    pii_verdict,
)
from sidecar.pseudonyms import Pseudonyms, pseudonymize
from sidecar.recognizers import CHECKSUM_NAMES, PATTERN_NAMES, context_spans, default_recognizers, find_each
from sidecar.request import ROUTED_KINDS, ParsedRequest, TextField, model_safe, parse_body, rewrite
from sidecar.results import CategoryResult, PiiResult, Span
from sidecar.vocabulary import Action, Kind, RouteReason

_JSON_START = re.compile(rb"(?:\xef\xbb\xbf)?\s*[\[{]")
_CACHED_PATH_CHARS = 256
_CACHED_PATHS = 1024
FREE_TEXT = "FREE_TEXT"
"""What `DecisionMaker.url_pii` reports for whitespace in a URL part."""
_WHITESPACE = re.compile(r"\s")

# Bodies (and Classify texts) above this many bytes are parsed, scanned and rewritten on a worker thread:
# at 30-60 ms per MB on a busy 2-core machine those steps would otherwise hold the event loop.
_OFF_LOOP_BYTES = 64 * 1024
# The no-model fallback (checksum scan, masking, rewrite) costs about 40-70 ms per MiB of text on a busy
# 2-core machine (more for text dense with digit groups); the models stop this long before the deadline,
# so a degraded answer is still ready in time.
_FALLBACK_S = 0.002
_FALLBACK_S_PER_MIB = 0.06
_WORD = re.compile(r"[^\W_]+")
_LETTER_DIGIT = re.compile(r"(?<=[^\W\d_])(?=[0-9])|(?<=[0-9])(?=[^\W\d_])")
_SPACED_GROUPS = re.compile(r"(?<![0-9])[0-9]{3,4}(?:[\s,;.|/~'-]{1,3}[0-9]{2,4}){2,4}(?![0-9])")
_GROUP_GAP = re.compile(r"[\s,;.|/~'-]{1,3}")
_IBAN_INSIDE = re.compile(r"[A-Z]{2}[0-9]{2}(?:-?[A-Z0-9]){11,30}")


def read_apart(value: str) -> tuple[str, ...]:
    """How `_found_types` also reads a value that cannot be masked: with spaces for underscores and between
    the letters and digits of a word glued to a number ("ssn078051120", "card4111111111111111"; not a
    hexadecimal id: `glued_number`); with the groups of a number written with wider separators joined by
    dashes ("4111, 1111, 1111, 1111", "078 - 05 - 1120", a tab); and with an IBAN glued to a word or
    written with dashes set apart ("accGB82WEST…", "GB82-WEST-…")."""
    spaced = value.replace("_", " ")
    spaced = _WORD.sub(lambda m: _LETTER_DIGIT.sub(" ", m.group()) if glued_number(m.group()) else m.group(), spaced)
    grouped = _SPACED_GROUPS.sub(lambda m: _GROUP_GAP.sub("-", m.group()), value)
    iban = _IBAN_INSIDE.sub(lambda m: " " + m.group().replace("-", "") + " ", value)
    return tuple(v for v in {spaced, grouped, iban} if v != value)


@dataclass(frozen=True)
class Decision:
    action: Action  # allow | mask | block | degraded -> x-router-action
    model: str | None  # selected backend model -> x-selected-model; None: not routed (other APIs)
    rewrite_model: bool
    route_reason: RouteReason  # -> x-router-reason (unless `error` is set)
    category: str | None
    confidence: float | None
    entity_types: tuple[str, ...]  # sorted unique kept types -> x-router-pii
    entity_counts: dict[str, int]
    body: bytes | None  # replacement body when anything changed, else None
    timings: dict[str, float]  # ms: parse, classify, pii, total
    error: str | None = None  # reason code when degraded
    decompressed: bool = False  # `body` is the decompressed body: Content-Encoding must go
    pseudonyms: Pseudonyms | None = None  # pseudonymize: what the answer must get back (never logged)
    answer_policy: PiiPolicyConfig | None = None  # response_pii: how the answer is scanned


@dataclass(frozen=True)
class TextDecision:
    """The decision for one text (Classify API, ``sidecar classify``); `pii` offsets index into `text`."""

    text: str
    category: str | None
    confidence: float | None
    model: str
    pii: list[dict[str, Any]]  # kept spans: {"start", "end", "label", "score"}
    action: Action  # allow | mask | block | degraded
    masked_text: str | None  # None when blocked
    route_reason: RouteReason
    error: str | None = None

    def to_json(self) -> str:
        """One line of ``sidecar classify`` output."""
        return json.dumps(
            {
                "text": self.text,
                "category": self.category,
                "confidence": None if self.confidence is None else round(self.confidence, 4),
                "model": self.model,
                "pii": self.pii,
                "action": self.action,
                "masked_text": self.masked_text,
            },
            ensure_ascii=False,
        )


@dataclass(frozen=True)
class AnswerOutcome:
    """The response scan of one answer."""

    action: Action  # allow | mask | block | degraded
    body: bytes | None  # the masked answer, None when nothing changed (or blocked)
    entity_types: tuple[str, ...]
    entity_counts: dict[str, int]
    error: str | None = None  # reason code when degraded (fail_open: recognizers only)


@dataclass(frozen=True, slots=True)
class PolicyOutcome:
    """The PII policy applied to a set of texts: per-text kept spans, the verdict, the new texts."""

    spans: list[list[Span]]
    verdict: PiiVerdict
    masked: list[str | None]  # new text per input, None where nothing changed
    pseudonyms: Pseudonyms | None = None  # pseudonymize: the placeholders issued, to restore the answer

    def action(self, degraded: bool) -> Action:
        if self.verdict.action == Action.BLOCK:
            return Action.BLOCK
        return Action.DEGRADED if degraded else self.verdict.action


@dataclass(frozen=True)
class _Case:
    """What one decision reads, whoever asked (a request body, the Classify API, an offline batch)."""

    texts: list[str]
    """As the policy masks them."""
    category_text: str
    requested: str | None
    routed: bool
    size: int
    model_texts: list[str] | None = None
    """As the models read them (short values after their key), when they differ from `texts`."""
    shifts: list[int] | None = None
    """Characters each model text has in front of its text (the key), to map spans back."""
    routable: bool = True
    extra: list[list[Span]] | None = None
    """Spans the fields' keys give (``"ssn": 536222026``)."""


@dataclass(frozen=True)
class _Judgement:
    """The models' part: the route and the model spans per text, or (fail_open) None and the reason."""

    route: Route
    spans: list[list[Span]] | None
    error: str | None


class DecisionMaker:
    """Turns requests into decisions for one config and engine (both swapped together on reload)."""

    def __init__(self, config: Config, engine: Any):
        self.config = config
        self.engine = engine
        self._max_inspect = config.failure.max_inspect_bytes
        patterns = config.pii.patterns
        self._beside_model = default_recognizers(PATTERN_NAMES) if patterns == "always" else ()
        fallback = (CHECKSUM_NAMES if config.pii.checksums else ()) + (PATTERN_NAMES if patterns != "off" else ())
        self._fallback = default_recognizers(fallback) if fallback else ()
        self._recognizers = default_recognizers(CHECKSUM_NAMES + PATTERN_NAMES)
        self._clean_paths: set[str] = set()
        self.reads_answers = config.pii.reads_answers
        """Some policy pseudonymizes or scans answers: requests ask Envoy for their answers."""
        self._answer_policies: dict[str | None, PiiPolicyConfig | None] = {}

    def url_pii(self, path: str) -> tuple[str, ...]:
        """`_url_pii`, remembering clean paths (a handful make up nearly all traffic); a path with findings is
        never kept, so no personal data stays in memory past its request."""
        if path in self._clean_paths:
            return ()
        found = self._url_pii(path)
        if not found and len(path) <= _CACHED_PATH_CHARS and len(self._clean_paths) < _CACHED_PATHS:
            self._clean_paths.add(path)
        return found

    def recognized_types(self, values: list[str]) -> tuple[str, ...]:
        """Entity types the recognizers find in values that cannot be masked (header values, identifiers):
        the caller refuses."""
        return tuple(sorted(self._found_types(values)))

    def _url_pii(self, path: str) -> tuple[str, ...]:
        """What makes a URL unfit to forward: the entity types the recognizers find in its path segments and
        query values (decoded), and ``FREE_TEXT`` for a segment or value with whitespace in it (a name, a
        sentence: no LLM API puts such text in a URL). A URL reaches the backend and its logs as sent and
        cannot be masked, so such a request is refused."""
        raw, _, query = path.partition("?")
        pairs = [[unquote_plus(p) for p in pair.split("=", 1)] for pair in query.split("&") if pair]
        parts = [unquote(raw)] + [p for pair in pairs for p in pair if p]
        types = self._found_types(parts)
        types |= {s.label for pair in pairs if len(pair) == 2 for s in context_spans(pair[0], pair[1])}
        if any(_WHITESPACE.search(p) for p in parts):
            types.add(FREE_TEXT)
        return tuple(sorted(types))

    def _found_types(self, texts: Sequence[str]) -> set[str]:
        """The entity types every recognizer finds in `texts`: for what can be refused but never masked. Each
        value is also read with spaces where `read_apart` says: the recognizers skip an SSN glued to a word
        and take only spaces and dashes inside it, but ``cc_078_05_1120`` or ``ssn078051120`` in a header or a
        field name is personal data to whoever reads it."""
        spaced = [apart for t in texts for apart in read_apart(t)]
        return {s.label for spans in find_each([*texts, *spaced], self._recognizers) for s in spans}

    def _read(self, body: bytes, kind: Kind) -> ParsedRequest:
        """Parse the body and refuse personal data under structural keys, which is never masked."""
        parsed = parse_body(body, kind)
        if parsed.structural:
            found = self._found_types(parsed.structural)
            if found:
                raise PiiInField(f"personal data ({', '.join(sorted(found))}) in a field that is not masked "
                                 f"(model, role, type, ids); send it in message text, or leave it out")
        return parsed

    async def decide(self, body: bytes, kind: Kind, content_encoding: str | None = None) -> Decision:
        """The decision for one request body; `RequestError` for unreadable bodies, `InferenceError` when the
        models fail under ``fail_closed`` (`BodyTooLarge` at once for a body over max_inspect_bytes)."""
        started = time.perf_counter()
        loop_started = asyncio.get_running_loop().time()
        heavy = len(body) > _OFF_LOOP_BYTES
        raw = body
        self._check_size(len(body))  # under fail_closed a 413 at once, before any parsing or decompressing
        if content_encoding:  # over the limit once decompressed: 413 in either failure mode
            body = await self._maybe_off_loop(heavy, decompress, body, content_encoding, self._max_inspect)
            heavy = heavy or len(body) > _OFF_LOOP_BYTES
        # In place for the usual small body: a coroutine per step is measurable on the request path.
        parsed = (await asyncio.to_thread(self._read, body, kind)) if heavy else self._read(body, kind)
        timings = {"parse": _ms_since(started)}
        case = self._body_case(parsed, kind, len(body))  # the deadline grows with what is read
        judged, outcome = await self._run(case, loop_started, timings, heavy)
        action = outcome.action(degraded=judged.error is not None)
        new_body = None
        if action != Action.BLOCK:
            changed = {i: m for i, m in enumerate(outcome.masked) if m is not None}
            if judged.route.rewrite or changed:
                model = judged.route.model if judged.route.rewrite else None
                new_body = (await asyncio.to_thread(rewrite, body, parsed, model, changed)) if heavy \
                    else rewrite(body, parsed, model, changed)
            elif body is not raw:
                new_body = body  # what was read goes on, never the compressed bytes (their header fields were not)
        timings["total"] = _ms_since(started)
        return self._body_decision(judged, outcome, action, new_body, timings, body is not raw)

    async def decide_text(self, text: str, requested_model: str | None = "auto") -> TextDecision:
        """The decision a chat request whose latest user message is `text` would get (Classify API).
        An empty `requested_model` means the virtual model; the failure policy and deadline apply as in
        `decide`, with the text's UTF-8 length standing for the body's."""
        if not text:
            raise NoText("text is empty")
        loop_started = asyncio.get_running_loop().time()
        size = len(text) if len(text) * 4 <= self._max_inspect else len(text.encode("utf-8", "surrogatepass"))
        judged, outcome = await self._run(self._text_case(text, requested_model, size), loop_started, {},
                                          size > _OFF_LOOP_BYTES)
        return self._text_decision(text, judged.route, outcome, judged.error)

    def decide_texts(self, texts: Sequence[str], requested_model: str | None = "auto") -> list[TextDecision]:
        """Decisions for many texts at once with the engine's batched synchronous calls (offline use: no
        deadline, and inference errors propagate). Empty texts get the default route and no PII."""
        cases = [self._text_case(t, requested_model, len(t)) for t in texts]
        present = [i for i, t in enumerate(texts) if t]
        safe = [model_safe(texts[i]) for i in present]
        categories: dict[int, CategoryResult] = {}
        if cases and cases[0].routed and self.engine.category_labels is not None and present:
            categories = dict(zip(present, self.engine.classify_many(safe), strict=True))
        pii = dict(zip(present, self.engine.detect_pii_many(safe), strict=True)) if present else {}
        decisions = []
        for i, case in enumerate(cases):
            route = self._route(categories.get(i), case.requested, case.routed, case.category_text)
            judged = _Judgement(route, [pii[i].spans if i in pii else []], None)
            decisions.append(self._text_decision(texts[i], route, self._settle(case, judged), None))
        return decisions

    def answer_policy(self, model: str | None) -> PiiPolicyConfig | None:
        """The policy a routed request's answer is scanned under (its action the policy's ``response_pii``),
        or None when that policy does not scan answers."""
        key = model if model in self.config.pii.policies else None  # bounded: one per configured policy
        if key not in self._answer_policies:
            policy = self.config.pii.policy_for(key)
            self._answer_policies[key] = None if policy.response_pii == "off" else \
                policy.model_copy(update={"action": policy.response_pii})
        return self._answer_policies[key]

    async def scan_answer(self, body: bytes, policy: PiiPolicyConfig, protected: Pseudonyms | None = None
                          ) -> AnswerOutcome:
        """The response scan of a whole answer (or one event of a streamed one): JSON is read like a request
        on an unrouted path (every string but identifiers), anything else as one text; what `policy` keeps
        outside the request's placeholders is masked, or blocks. `InferenceError` under fail_closed."""
        loop_started = asyncio.get_running_loop().time()
        heavy = len(body) > _OFF_LOOP_BYTES
        try:
            parsed = await self._maybe_off_loop(heavy, parse_body, body, Kind.GENERIC)
        except RequestError:
            parsed = None
            if _JSON_START.match(body):  # JSON this reader refuses (a repeated key, too deep, bad bytes):
                return AnswerOutcome(Action.REJECTED, None, (), {})  # its escapes would hide values from a text scan
        if parsed is not None and parsed.structural and (found := self.recognized_types(parsed.structural)):
            return AnswerOutcome(Action.BLOCK, None, found, {})  # in an id or a name: cannot be masked
        if parsed is None:
            case = _Case(texts=[body.decode("utf-8", "replace")], category_text="", requested=None, routed=False,
                         size=len(body), routable=False)
        else:
            case = self._body_case(parsed, Kind.GENERIC, len(body))
        judged = await self._judge(case, loop_started, {}, None, answer=True)
        outcome = await self._maybe_off_loop(heavy, self._settle, case, judged, policy, protected)
        action = outcome.action(degraded=judged.error is not None)
        changed = {i: m for i, m in enumerate(outcome.masked) if m is not None}
        new_body = None
        if action != Action.BLOCK and changed:
            if parsed is None:
                new_body = changed[0].encode("utf-8")
            else:
                new_body = await self._maybe_off_loop(heavy, rewrite, body, parsed, None, changed)
        counts = dict(Counter(s.label for s in outcome.verdict.kept_spans))
        return AnswerOutcome(action, new_body, outcome.verdict.types, counts, judged.error)

    async def scan_answer_texts(self, texts: list[str], policy: PiiPolicyConfig,
                                protected: Pseudonyms | None = None) -> PolicyOutcome:
        """The response scan of texts of a streamed answer: the spans `policy` keeps in each."""
        loop_started = asyncio.get_running_loop().time()
        case = _Case(texts=texts, category_text="", requested=None, routed=False, size=sum(map(len, texts)),
                     routable=False)
        judged = await self._judge(case, loop_started, {}, None, answer=True)
        return self._settle(case, judged, policy, protected)

    # --- the pipeline every entry point runs -------------------------------------------------------------

    async def _run(self, case: _Case, loop_started: float, timings: dict[str, float],
                   heavy: bool) -> tuple[_Judgement, PolicyOutcome]:
        """Size check, the models under the decision's deadline (or the failure policy), then the route and
        the PII policy."""
        judged = await self._judge(case, loop_started, timings, self._check_size(case.size))
        if not case.routable:
            judged = _Judgement(Route(None, rewrite=False, reason=RouteReason.UNROUTED), judged.spans, judged.error)
        return judged, (await asyncio.to_thread(self._settle, case, judged)) if heavy else self._settle(case, judged)

    def _body_case(self, parsed: ParsedRequest, kind: Kind, size: int) -> _Case:
        routable = kind in ROUTED_KINDS
        routed = routable and needs_category(parsed.requested_model, self.config.routing)
        model_texts, shifts = with_keys(parsed.fields)
        extra = [context_spans(f.key, f.text) for f in parsed.fields]
        return _Case(texts=parsed.texts(), category_text=parsed.category_text(self.config.routing.category_input)
                     if routed else "", requested=parsed.requested_model, routed=routed, size=size,
                     model_texts=model_texts, shifts=shifts, routable=routable, extra=extra if any(extra) else None)

    def _text_case(self, text: str, requested_model: str | None, size: int) -> _Case:
        requested = requested_model or None
        routed = needs_category(requested, self.config.routing)
        return _Case(texts=[text], category_text=text if routed else "", requested=requested, routed=routed,
                     size=size)

    async def _judge(self, case: _Case, started: float, timings: dict[str, float],
                     too_large: BodyTooLarge | None, answer: bool = False) -> _Judgement:
        """The models' part of a decision under its deadline, or under fail_open the degraded route with the
        reason code when they could not answer (fail_closed raises instead). An answer's scan may take up to
        ``failure.max_timeout_ms`` whatever its size: the backend's work is done, and a scan refused for
        time would throw it away."""
        deadline = self._models_deadline(case.size, started, cap=answer)
        try:
            if too_large is not None:
                raise too_large
            safe = [model_safe(t) for t in case.model_texts or case.texts]
            category, results = await self._infer(model_safe(case.category_text), safe, timings, deadline)
            route = self._route(category, case.requested, case.routed, case.category_text)
            return _Judgement(route, [r.spans for r in results], None)
        except (InferenceError, TimeoutError) as e:
            return _Judgement(self._degraded_route(case.requested, case.routed), None, self._fail(e))

    def _settle(self, case: _Case, judged: _Judgement, policy: PiiPolicyConfig | None = None,
                protected: Pseudonyms | None = None) -> PolicyOutcome:
        """The model spans mapped back onto the texts, the route of an unrouted API, the PII policy (the
        route's, or `policy`); nothing inside `protected`'s placeholders counts."""
        spans = judged.spans
        if spans is not None and case.shifts and any(case.shifts):
            spans = [_unshift(s, shift) for s, shift in zip(spans, case.shifts, strict=True)]
        return self._policy_outcome(judged.route, case.texts, spans, case.extra, policy, protected)

    @staticmethod
    async def _maybe_off_loop(heavy: bool, fn: Callable[..., Any], *args: Any) -> Any:
        """`fn(*args)` on a worker thread for a heavy body (the event loop keeps serving), else in place."""
        return await asyncio.to_thread(fn, *args) if heavy else fn(*args)

    async def _infer(
        self, category_text: str, pii_texts: list[str], timings: dict[str, float], deadline: float
    ) -> tuple[CategoryResult | None, list[PiiResult]]:
        """Classification (when there is category text and a model) and PII detection of every text,
        concurrently, until `deadline` (event-loop time); leftover calls are cancelled, and awaited, on
        every way out."""
        classify = bool(category_text) and self.engine.category_labels is not None
        detect = bool(pii_texts) and self.engine.detects_pii
        if not detect:
            no_pii = [PiiResult([]) for _ in pii_texts]
            if not classify:
                return None, no_pii
        started = time.perf_counter()

        async def timed(call: Awaitable[Any], stage: str) -> Any:
            result = await call
            timings[stage] = max(timings.get(stage, 0.0), _ms_since(started))
            return result

        if not (classify and detect):  # one call: awaited in place, no task to schedule or gather
            async with asyncio.timeout_at(deadline):
                if detect:
                    return None, await timed(self.engine.detect_pii_all(pii_texts, deadline=deadline), "pii")
                return await timed(self.engine.classify(category_text, deadline=deadline), "classify"), no_pii
        # Both at once; PII is one call for all the texts: one tokenization job, one trip through the batcher.
        tasks = [asyncio.ensure_future(timed(self.engine.classify(category_text, deadline=deadline), "classify")),
                 asyncio.ensure_future(timed(self.engine.detect_pii_all(pii_texts, deadline=deadline), "pii"))]
        for task in tasks:
            task.add_done_callback(_retrieve)
        try:
            async with asyncio.timeout_at(deadline):
                results = await asyncio.gather(*tasks)
        finally:
            pending = [task for task in tasks if not task.done()]
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.wait(pending)
        return results[0], results[1]

    def _models_deadline(self, size: int, started: float, cap: bool = False) -> float:
        """Event-loop time by which the models must have answered for a body of `size` bytes whose decision
        started at `started`: the grown deadline (`cap`: its cap) less the reserve the no-model fallback
        needs."""
        reserve = _FALLBACK_S + _FALLBACK_S_PER_MIB * size / (1 << 20)
        failure = self.config.failure
        return started + (failure.max_timeout_ms / 1000 if cap else failure.timeout_s(size)) - reserve

    def _check_size(self, size: int) -> BodyTooLarge | None:
        """The error for a body over ``failure.max_inspect_bytes`` (raised at once under fail_closed: a 413
        that costs no parsing), or None."""
        if size <= self._max_inspect:
            return None
        error = BodyTooLarge(f"The request body ({size} bytes) is larger than this gateway inspects "
                             f"({self._max_inspect} bytes). Send less text per request.")
        if self.config.failure.inference == "fail_closed":
            raise error
        return error

    def _policy_outcome(self, route: Route, texts: list[str], spans: list[list[Span]] | None,
                        extra: list[list[Span]] | None = None, policy: PiiPolicyConfig | None = None,
                        protected: Pseudonyms | None = None) -> PolicyOutcome:
        """Model spans plus the recognizers beside them, or the fallback recognizers alone (spans None),
        plus `extra`."""
        recognizers = self._fallback if spans is None else self._beside_model
        if spans is not None:
            spans = [extend_names(t, s) for t, s in zip(texts, spans, strict=True)]
        if recognizers:
            found = find_each(texts, recognizers)
            spans = found if spans is None else [s + f for s, f in zip(spans, found, strict=True)]
        spans = spans if spans is not None else [[] for _ in texts]
        if extra is not None:
            spans = [s + e for s, e in zip(spans, extra, strict=True)]
        if protected:
            spans = [_outside(s, protected.ranges(t)) for s, t in zip(spans, texts, strict=True)]
        return self._apply_policy(route, texts, spans, policy)

    def _route(self, category: CategoryResult | None, requested: str | None, routed: bool, category_text: str) -> Route:
        if routed and not category_text:
            return default_route(self.config.routing, RouteReason.NO_USER_TEXT)
        return choose_route(category, requested, self.config.routing)

    def _degraded_route(self, requested: str | None, routed: bool) -> Route:
        if routed:
            return default_route(self.config.routing, RouteReason.DEGRADED)
        return Route(requested, rewrite=False, reason=RouteReason.DEGRADED)

    def _fail(self, e: Exception) -> str:
        """Apply the failure policy: re-raise under fail_closed, else the reason code for a degraded answer
        (the processor logs it with the decision; nothing is logged here)."""
        error = e if isinstance(e, InferenceError) else InferenceTimeout(
            "inference did not finish within the decision's deadline")
        if self.config.failure.inference == "fail_closed":
            raise error from None
        return error.reason

    def _apply_policy(self, route: Route, texts: list[str], spans: list[list[Span]],
                      policy: PiiPolicyConfig | None = None) -> PolicyOutcome:
        policy = policy or self.config.pii.policy_for(route.model)
        found = [kept_spans(s, policy) for s in spans]
        per_text = [resolve_conflicts(kept) for kept in found]
        verdict = pii_verdict([s for kept in per_text for s in kept], policy, [s for kept in found for s in kept])
        masked: list[str | None] = [None] * len(texts)
        pseudonyms = None
        if verdict.action == Action.MASK:
            masked = [anonymize(t, kept, policy).text if kept else None for t, kept in zip(texts, per_text, strict=True)]
        elif verdict.action == Action.PSEUDONYMIZE:
            pseudonyms = Pseudonyms(policy.placeholder_format, taken="\n".join(texts))
            masked = pseudonymize(texts, per_text, pseudonyms)
        return PolicyOutcome(per_text, verdict, masked, pseudonyms)

    def _body_decision(self, judged: _Judgement, outcome: PolicyOutcome, action: Action, new_body: bytes | None,
                       timings: dict[str, float], decompressed: bool) -> Decision:
        route = judged.route
        return Decision(
            action=action,
            model=route.model,
            rewrite_model=route.rewrite and action != Action.BLOCK,
            route_reason=route.reason,
            category=route.category,
            confidence=route.confidence,
            entity_types=outcome.verdict.types,
            entity_counts=dict(Counter(s.label for s in outcome.verdict.kept_spans)),
            body=new_body,
            timings=timings,
            error=judged.error,
            decompressed=new_body is not None and decompressed,
            pseudonyms=outcome.pseudonyms if action != Action.BLOCK and outcome.pseudonyms else None,
            answer_policy=self.answer_policy(route.model) if action != Action.BLOCK else None,
        )

    def _text_decision(self, text: str, route: Route, outcome: PolicyOutcome, error: str | None) -> TextDecision:
        action = outcome.action(degraded=error is not None)
        masked = outcome.masked[0]
        return TextDecision(
            text=text,
            category=route.category,
            confidence=route.confidence,
            model=route.model,
            pii=[s.to_dict() for s in outcome.spans[0]],
            action=action,
            masked_text=None if action == Action.BLOCK else (masked if masked is not None else text),
            route_reason=route.reason,
            error=error,
        )


PROSE_KEYS = frozenset({"content", "text", "prompt", "input", "instructions", "system", "output", "description"})
"""Keys whose values are prose: their key adds nothing for the model."""
KEYED_CHARS = 64
"""Values up to this long are shown to the PII model after their key (``customer: Edward Jackson``)."""


_NEXT_NAME = re.compile(r"[ \t]{1,2}([A-Z][a-z]+(?:['’-][A-Za-z]+)?)(?![\w@])")


def extend_names(text: str, spans: list[Span]) -> list[Span]:
    """Each PERSON span grown over up to two capitalised words right after it: the bundled model often tags
    "Margaret" and leaves "Campbell", and a surname alone still identifies."""
    if not any(s.label == "PERSON" for s in spans):
        return spans
    out = []
    for s in spans:
        if s.label == "PERSON":
            end = s.end
            for _ in range(2):
                m = _NEXT_NAME.match(text, end)
                if m is None:
                    break
                end = m.end()
            if end != s.end:
                s = Span(s.label, s.start, end, s.score, s.source)
        out.append(s)
    return out


def with_keys(fields: Sequence[TextField]) -> tuple[list[str], list[int]]:
    """What the PII model reads for each field, and how many characters were put before its text. A short
    value reads as a fragment; after its key it reads as the record it is: on the bundled model "Edward
    Jackson" alone was tagged PERSON on "Edward" only, "customer: Edward Jackson" whole."""
    texts, shifts = [], []
    for f in fields:
        if f.key is not None and f.key not in PROSE_KEYS and len(f.text) <= KEYED_CHARS and not f.number:
            prefix = f"{f.key[:KEYED_CHARS]}: "
            texts.append(prefix + f.text)
            shifts.append(len(prefix))
        else:
            texts.append(f.text)
            shifts.append(0)
    return texts, shifts


def _unshift(spans: list[Span], shift: int) -> list[Span]:
    """Spans over ``prefix + text`` moved onto `text`; what lay in the prefix alone is dropped."""
    if not shift:
        return spans
    return [Span(s.label, max(s.start - shift, 0), s.end - shift, s.score, s.source) for s in spans if s.end > shift]


def _outside(spans: list[Span], ranges: list[tuple[int, int]]) -> list[Span]:
    """The spans less what lies inside `ranges` (placeholders: the request's own values, not new ones); a span
    that runs into a placeholder keeps its parts on either side, which are masked."""
    return [part for s in spans for part in s.outside(ranges)] if ranges else spans


def _retrieve(task: asyncio.Future) -> None:
    """Mark a finished call's exception as seen; the first one already propagated through gather."""
    if not task.cancelled():
        task.exception()


def _ms_since(started: float) -> float:
    return round((time.perf_counter() - started) * 1000, 3)
