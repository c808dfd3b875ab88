"""The backend's answer, chunk by chunk as Envoy streams it: placeholders restored (``pseudonymize``) and, where
the policy asks (``response_pii``), personal data the request did not carry masked, or the answer refused.

A JSON answer is held whole (up to ``failure.max_inspect_bytes``), scanned, restored and sent on. A streamed
answer (server-sent events of chat completions, the Responses API or the Messages API) flows event by event:
each text the events build up (a choice's content, a tool call's arguments, a content block) is a channel.
Restoring holds back at most a partial placeholder. Scanning holds back at most ``pii.response_window_chars``
of each channel: when that much is waiting it is scanned as one text, the first part goes out masked and the
last half-window stays, as context for what comes next, and is scanned again with it. A blocked or
unscannable stream ends there with an error event of its API; nothing held goes out.

The scan runs before the restore, so what the request carried (a placeholder or a mask by then) is never
taken for new personal data: the values a client gets back are its own.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from sidecar.errors import InferenceError
from sidecar.masking import anonymize
from sidecar.pseudonyms import Pseudonyms, json_inner, restore_body, restore_json
from sidecar.request import STRUCTURAL_KEYS
from sidecar.results import Span
from sidecar.vocabulary import Action, Kind

if TYPE_CHECKING:
    from sidecar.config import PiiPolicyConfig
    from sidecar.decisions import DecisionMaker

PII_IN_ANSWER = "pii_in_answer"
NOT_INSPECTED = "answer_not_inspected"


class AnswerRefused(Exception):
    """The answer does not reach the client: personal data a policy blocks, or an answer that could not be
    scanned (model failure under fail_closed, too large, encoded)."""

    def __init__(self, code: str, types: tuple[str, ...] = ()):
        self.code = code
        self.types = types
        super().__init__(code)

    @property
    def message(self) -> str:
        if self.code == PII_IN_ANSWER:
            found = ", ".join(self.types) or "personal data"
            return f"The model's answer was withheld because it contains personal data ({found})."
        return "The model's answer could not be checked for personal data, so it was withheld. Retry later."

    @property
    def status(self) -> int:
        return 502 if self.code == PII_IN_ANSWER else 503


def error_document(kind: Kind | None, refused: AnswerRefused) -> dict[str, Any]:
    """The error in the shape the client's API uses for one."""
    if kind == Kind.MESSAGES:
        return {"type": "error", "error": {"type": "api_error", "message": refused.message}}
    if kind == Kind.RESPONSES:
        return {"type": "error", "code": refused.code, "message": refused.message, "param": None}
    return {"error": {"message": refused.message, "type": "server_error", "code": refused.code, "param": None}}


def error_event(kind: Kind | None, refused: AnswerRefused) -> bytes:
    named = kind in (Kind.MESSAGES, Kind.RESPONSES)
    lines = (["event: error"] if named else []) + ["data: " + _dumps(error_document(kind, refused))]
    return "\n".join(lines).encode("utf-8") + b"\n\n"


def _dumps(doc: Any) -> str:
    return json.dumps(doc, ensure_ascii=False, separators=(",", ":"))


@dataclass
class AnswerScan:
    """How one answer is scanned: the decision maker's models and recognizers under the request's policy,
    whose action is its ``response_pii``. One per request."""

    decider: DecisionMaker
    policy: PiiPolicyConfig
    window: int
    protected: Pseudonyms | None = None
    """The request's placeholders: never personal data."""
    masked: Counter = field(default_factory=Counter)
    """Entity type -> how many were masked in this answer (for the log; never the values)."""

    async def spans(self, text: str) -> list[Span]:
        """The spans the policy keeps in `text`; `AnswerRefused` when they block it, or it cannot be scanned."""
        try:
            outcome = await self.decider.scan_answer_texts([text], self.policy, self.protected)
        except InferenceError:
            raise AnswerRefused(NOT_INSPECTED) from None
        if outcome.verdict.action == Action.BLOCK:
            raise AnswerRefused(PII_IN_ANSWER, outcome.verdict.types)
        return outcome.spans[0]

    async def body(self, body: bytes) -> bytes:
        """A whole JSON (or text) answer, masked; `AnswerRefused` as for `spans`."""
        try:
            outcome = await self.decider.scan_answer(body, self.policy, self.protected)
        except InferenceError:
            raise AnswerRefused(NOT_INSPECTED) from None
        if outcome.action == Action.BLOCK:
            raise AnswerRefused(PII_IN_ANSWER, outcome.entity_types)
        if outcome.body is None:
            return body
        self.masked.update(outcome.entity_counts)
        return outcome.body


# --- streamed answers --------------------------------------------------------------------------------------

Path = tuple[Any, ...]


@dataclass
class _Channel:
    """One growing text of a stream (a choice's content, a tool call's arguments, a content block)."""

    unscanned: str = ""  # arrived, not yet released by the scan
    held: str = ""  # scanned, waiting for the rest of a placeholder
    template: dict | None = None  # the channel's last event, to carry held text out at its end
    path: Path = ()
    event_name: str | None = None
    arguments: bool = False  # the text is JSON being streamed: restored values are JSON-escaped


def _get(doc: Any, path: Path) -> Any:
    for key in path:
        doc = doc[key]
    return doc


def _set(doc: Any, path: Path, value: Any) -> None:
    for key in path[:-1]:
        doc = doc[key]
    doc[path[-1]] = value


def _deltas(event: dict) -> Iterable[tuple[tuple, Path, bool]]:
    """The streamed text pieces of one event of any of the three APIs: (channel key, path, is JSON)."""
    kind = event.get("type")
    if kind == "content_block_delta":  # Anthropic Messages
        delta = event.get("delta") or {}
        for key, is_json in (("text", False), ("partial_json", True), ("thinking", False)):
            if isinstance(delta.get(key), str):
                yield ("block", event.get("index")), ("delta", key), is_json
    elif (isinstance(kind, str) and kind.startswith("response.") and kind.endswith(".delta")  # Responses
          and isinstance(event.get("delta"), str)):
        channel = ("item", event.get("item_id"), event.get("output_index"), event.get("content_index"))
        yield channel, ("delta",), "arguments" in kind
    for i, choice in enumerate(event.get("choices") or []):  # chat and legacy completions
        if not isinstance(choice, dict):
            continue
        index = choice.get("index", i)
        delta = choice.get("delta")
        if isinstance(delta, dict):
            for key in ("content", "reasoning_content"):
                if isinstance(delta.get(key), str):
                    yield ("choice", index, key), ("choices", i, "delta", key), False
            for j, call in enumerate(delta.get("tool_calls") or []):
                function = call.get("function") if isinstance(call, dict) else None
                if isinstance(function, dict) and isinstance(function.get("arguments"), str):
                    yield (("call", index, call.get("index", j)), ("choices", i, "delta", "tool_calls", j,
                                                                    "function", "arguments"), True)
        elif isinstance(choice.get("text"), str):
            yield ("choice", index, "text"), ("choices", i, "text"), False


def _ends(event: dict) -> Callable[[tuple], bool] | None:
    """Which channels an event closes (their held text goes out before it), or None."""
    kind = event.get("type")
    if kind == "content_block_stop":
        return lambda ch: ch[:2] == ("block", event.get("index"))
    if kind in ("message_stop", "message_delta", "response.completed", "response.incomplete", "response.failed"):
        return lambda ch: True
    if isinstance(kind, str) and kind.startswith("response.") and kind.endswith(".done"):
        return lambda ch: ch[0] == "item" and ch[1] == event.get("item_id")
    done = {c.get("index", i) for i, c in enumerate(event.get("choices") or [])
            if isinstance(c, dict) and c.get("finish_reason")}
    if done:
        return lambda ch: ch[0] in ("choice", "call") and ch[1] in done
    return None


IDENTIFIER_KEYS = STRUCTURAL_KEYS | frozenset({"item_id", "response_id", "system_fingerprint", "obfuscation", "name"})
"""Keys whose strings in a stream event are identifiers, padding or tool names: an event with nothing else
besides its streamed pieces is not scanned whole (most events of every stream)."""


def _has_text(doc: Any, key: str | None = None) -> bool:
    """Whether an event carries text beyond its streamed pieces (a ``.done`` event's whole text, a final
    response): such an event is scanned whole."""
    if isinstance(doc, str):
        return len(doc) > 1 and key not in IDENTIFIER_KEYS
    if isinstance(doc, list):
        return any(_has_text(v, key) for v in doc)
    if isinstance(doc, dict):
        return any(_has_text(v, k) for k, v in doc.items())
    return False


def release_point(text: str, spans: list[Span], keep: int, placeholders: list[tuple[int, int]]) -> int:
    """How much of scanned `text` may go out, keeping about `keep` characters back: cut after whitespace,
    never inside a span (the whole span goes, masked) nor inside a placeholder."""
    cut = len(text) - keep
    if cut <= 0:
        return 0
    space = max(text.rfind(" ", 0, cut), text.rfind("\n", 0, cut))
    if space > 0:
        cut = space + 1
    for s in spans:
        if s.start < cut < s.end:
            cut = s.end
    for start, end in placeholders:
        if start < cut < end:
            cut = start
    return cut


class AnswerStream:
    """A server-sent-event stream of any of the three APIs, restored (and scanned) as the bytes arrive.

    Bytes are cut into events at blank lines (an unfinished event waits for its end, up to `max_event_bytes`);
    each event's streamed text pieces go through their channel's scan window and placeholder hold-back, every
    other string is restored whole. Events that are not JSON (``[DONE]``) pass as they are, after the held
    text of every channel. A refused stream (`stopped`) ends with one error event."""

    def __init__(self, pseudonyms: Pseudonyms, scan: AnswerScan | None = None, kind: Kind | None = None,
                 max_event_bytes: int = 1 << 20):
        self._p = pseudonyms
        self._scan = scan
        self._kind = kind
        self._max_event = max_event_bytes
        self._pending = b""
        self._channels: dict[tuple, _Channel] = {}
        self.stopped: AnswerRefused | None = None

    async def feed(self, chunk: bytes) -> bytes:
        if self.stopped:
            return b""
        self._pending += chunk
        out = []
        try:
            while (cut := _event_end(self._pending)) is not None:
                raw, self._pending = self._pending[:cut[0]], self._pending[cut[1]:]
                out.append(await self._event(raw))
            if self._scan is not None and len(self._pending) > self._max_event:
                raise AnswerRefused(NOT_INSPECTED)
        except AnswerRefused as refused:
            return self._stop(out, refused)
        return b"".join(out)

    async def finish(self) -> bytes:
        """The end of the stream: any held text, and an unfinished event as it came (scanned whole)."""
        if self.stopped:
            return b""
        try:
            tail = await self._flush(lambda ch: True)
            rest, self._pending = self._pending, b""
            if rest and self._scan is not None:
                rest = await self._scan.body(rest)
        except AnswerRefused as refused:
            return self._stop([], refused)
        return tail + (self._p.restore(rest.decode("utf-8", "replace")).encode("utf-8") if rest else b"")

    def _stop(self, out: list[bytes], refused: AnswerRefused) -> bytes:
        """Events already whole go out; held text and the rest of the stream never do."""
        self.stopped = refused
        self._pending = b""
        self._channels.clear()
        return b"".join(out) + error_event(self._kind, refused)

    async def _event(self, raw: bytes) -> bytes:
        lines = raw.decode("utf-8", "replace").split("\n")
        data_at = [i for i, line in enumerate(lines) if line.startswith("data:")]
        payload = "\n".join(lines[i][5:].removeprefix(" ") for i in data_at)
        try:
            event = json.loads(payload) if data_at else None
        except ValueError:
            event = None
        name = next((line[6:].strip() for line in lines if line.startswith("event:")), None)
        if not isinstance(event, dict):
            before = await self._flush(lambda ch: True) if payload.strip() == "[DONE]" else b""
            if self._scan is not None and payload.strip() not in ("", "[DONE]"):
                raw = await self._scan.body(raw)
            return before + self._p.restore(raw.decode("utf-8", "replace")).encode("utf-8") + b"\n\n"
        ends = _ends(event)
        pieces = list(_deltas(event))
        here = {key for key, _, _ in pieces}
        # A channel this event ends gets its held text out first, unless the event carries a piece of it.
        before = await self._flush(lambda ch: ends(ch) and ch not in here) if ends else b""
        event = await self._rewrite_event(event, name, pieces, ends)
        head = [line for line in lines if not line.startswith("data:")]
        body = "\n".join(head + ["data: " + _dumps(event)])
        return before + body.encode("utf-8") + b"\n\n"

    async def _rewrite_event(self, event: dict, name: str | None, pieces: list,
                             ends: Callable[[tuple], bool] | None) -> dict:
        texts = {path: _get(event, path) for _, path, _ in pieces}
        for path in texts:
            _set(event, path, "\0")  # kept out of the whole-event passes below
        if self._scan is not None and _has_text(event):
            event = json.loads(await self._scan.body(_dumps(event).encode("utf-8")))
        event = restore_json(event, self._p)
        for key, path, is_json in pieces:
            channel = self._channels.setdefault(key, _Channel())
            channel.template, channel.path, channel.event_name, channel.arguments = event, path, name, is_json
            _set(event, path, await self._take(channel, texts[path], last=bool(ends and ends(key))))
        return event

    async def _take(self, channel: _Channel, piece: str, last: bool) -> str:
        """What of a channel goes out now, `piece` having arrived: scanned and masked, then restored."""
        text = await self._scanned(channel, piece, last) if self._scan is not None else piece
        text = channel.held + text
        k = 0 if last else self._p.partial_suffix(text)  # the last piece holds nothing back
        channel.held = text[len(text) - k:] if k else ""
        return self._p.restore(text[:len(text) - k], quote=json_inner if channel.arguments else None)

    async def _scanned(self, channel: _Channel, piece: str, last: bool) -> str:
        """The masked part of the channel's scan window that may go out; the rest waits in the window."""
        text = channel.unscanned + piece
        if not text or (not last and len(text) < self._scan.window):
            channel.unscanned = text
            return ""
        spans = await self._scan.spans(text)
        placeholders = self._p.ranges(text)
        cut = len(text) if last else release_point(text, spans, self._scan.window // 2, placeholders)
        channel.unscanned = text[cut:]
        out = [s for s in spans if s.end <= cut]
        self._scan.masked.update(s.label for s in out)
        if not out:
            return text[:cut]
        quote = json_inner if channel.arguments else None
        return anonymize(text[:cut], out, self._scan.policy, quote=quote).text

    async def _flush(self, which: Callable[[tuple], bool]) -> bytes:
        """Events carrying the held text of the channels `which` selects, cloned from each one's last event."""
        out = []
        for key, channel in list(self._channels.items()):
            if not which(key) or channel.template is None or not (channel.held or channel.unscanned):
                continue
            text = await self._take(channel, "", last=True)
            if not text:
                continue
            event = json.loads(_dumps(channel.template))
            _clear_finish(event)
            _set(event, channel.path, text)
            lines = ([f"event: {channel.event_name}"] if channel.event_name else []) + ["data: " + _dumps(event)]
            out.append("\n".join(lines).encode("utf-8") + b"\n\n")
        return b"".join(out)


def _clear_finish(event: dict) -> None:
    for choice in event.get("choices") or []:
        if isinstance(choice, dict) and "finish_reason" in choice:
            choice["finish_reason"] = None


_BLANK = re.compile(rb"\r?\n\r?\n")


def _event_end(buffer: bytes) -> tuple[int, int] | None:
    """(end of the first complete event, start of the next) in `buffer`, or None."""
    m = _BLANK.search(buffer)
    return (m.start(), m.end()) if m else None


# --- one answer, as Envoy sends it -------------------------------------------------------------------------


class Answer:
    """One backend answer, chunk by chunk as Envoy streams it (``STREAMED`` response body).

    An event stream flows through `AnswerStream`; any other answer is held until its end and handled whole
    (a JSON answer is one document), up to `max_bytes`. Past that, or when the answer is encoded: without a
    scan what was held goes out as it came and the rest passes through, so the client sees placeholders,
    never someone else's values; with a scan the answer is refused (`refused`), since it was not read."""

    def __init__(self, pseudonyms: Pseudonyms | None, scan: AnswerScan | None, kind: Kind | None,
                 content_type: str | None, content_encoding: str | None, max_bytes: int):
        from sidecar.body import parse_content_encoding
        from sidecar.errors import UnsupportedEncoding

        self._p = pseudonyms or Pseudonyms()
        self._scan = scan
        self._max = max_bytes
        try:
            codings = parse_content_encoding(content_encoding)
        except UnsupportedEncoding:
            codings = None  # cannot be read
        self.streamed = (content_type or "").split(";")[0].strip().lower() == "text/event-stream"
        # The request went without Accept-Encoding, so an encoded answer is rare.
        readable = codings == []
        self.stream = AnswerStream(self._p, scan, kind, max_bytes) if self.streamed and readable else None
        self._held: list[bytes] | None = [] if readable and not self.streamed else None
        self._size = 0
        self.given_up: str | None = None if readable else "encoded"
        self.refused: AnswerRefused | None = None
        """A whole answer withheld: the processor answers with this error instead."""
        if scan is not None and not readable:
            self.refused = AnswerRefused(NOT_INSPECTED)
        # A whole answer changes length (and is sent decoded): the headers that describe the old bytes go.
        self.remove_headers = ["content-length"] if self._held is not None or self.refused else []

    async def chunk(self, body: bytes, end: bool) -> bytes:
        """What goes on in place of this chunk of the answer."""
        if self.stream is not None:
            out = await self.stream.feed(body)
            return out + (await self.stream.finish() if end else b"")
        if self.refused is not None:
            return b""
        if self._held is None:
            return body
        self._held.append(body)
        self._size += len(body)
        if self._size > self._max:
            return self._give_up("too_large")
        if not end:
            return b""
        return await self._whole(b"".join(self._held))

    async def _whole(self, body: bytes) -> bytes:
        self._held = None
        if not body:
            return body
        if self._scan is not None:
            try:
                body = await self._scan.body(body)
            except AnswerRefused as refused:
                self.refused = refused
                return b""
        return restore_body(body, self._p) if self._p else body

    def _give_up(self, reason: str) -> bytes:
        held, self._held = b"".join(self._held or []), None
        self.given_up = reason
        if self._scan is not None:
            self.refused = AnswerRefused(NOT_INSPECTED)
            return b""
        return held
