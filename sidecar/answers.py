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

from sidecar.body import parse_content_encoding
from sidecar.errors import InferenceError, UnsupportedEncoding
from sidecar.masking import anonymize
from sidecar.mutations import openai_error_document
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
    return openai_error_document(refused.message, "server_error", refused.code)


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
        if outcome.action == Action.REJECTED:
            raise AnswerRefused(NOT_INSPECTED)
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


_CHAT_TEXT = ("content", "reasoning_content", "reasoning", "refusal")
"""Chat delta fields that stream text."""


def _deltas(event: dict) -> Iterable[tuple[tuple, Path, bool]]:
    """The streamed text pieces of one event of any of the three APIs: (channel key, path, is JSON)."""
    kind = event.get("type")
    if kind == "content_block_delta":  # Anthropic Messages
        delta = event.get("delta") or {}
        for key, is_json in (("text", False), ("partial_json", True), ("thinking", False)):
            if isinstance(delta.get(key), str):
                yield ("block", event.get("index"), key), ("delta", key), is_json
    elif kind == "content_block_start":  # a block may start with text that its deltas continue
        block = event.get("content_block")
        if isinstance(block, dict) and isinstance(block.get("text"), str):
            yield ("block", event.get("index"), "text"), ("content_block", "text"), False
    elif (isinstance(kind, str) and kind.startswith("response.") and kind.endswith(".delta")  # Responses
          and isinstance(event.get("delta"), str)):
        channel = ("item", event.get("item_id"), event.get("output_index"), event.get("content_index"), kind)
        yield channel, ("delta",), "arguments" in kind
    for i, choice in enumerate(event.get("choices") or []):  # chat and legacy completions
        if not isinstance(choice, dict):
            continue
        index = choice.get("index", i)
        delta = choice.get("delta")
        if isinstance(delta, dict):
            yield from _chat_delta(delta, index, ("choices", i, "delta"))
        if isinstance(choice.get("text"), str):
            yield ("choice", index, "text"), ("choices", i, "text"), False


def _chat_delta(delta: dict, index: Any, at: Path) -> Iterable[tuple[tuple, Path, bool]]:
    for key in _CHAT_TEXT:
        if isinstance(delta.get(key), str):
            yield ("choice", index, key), (*at, key), False
    audio = delta.get("audio")
    if isinstance(audio, dict) and isinstance(audio.get("transcript"), str):
        yield ("choice", index, "audio"), (*at, "audio", "transcript"), False
    function = delta.get("function_call")  # the legacy single function call
    if isinstance(function, dict) and isinstance(function.get("arguments"), str):
        yield ("call", index, "function_call"), (*at, "function_call", "arguments"), True
    for j, call in enumerate(delta.get("tool_calls") or []):
        function = call.get("function") if isinstance(call, dict) else None
        if isinstance(function, dict) and isinstance(function.get("arguments"), str):
            yield ("call", index, call.get("index", j)), (*at, "tool_calls", j, "function", "arguments"), True


def _ends(event: dict) -> Callable[[tuple], bool] | None:
    """Which channels an event closes (their held text goes out before it), or None."""
    kind = event.get("type")
    if kind == "content_block_stop":
        return lambda ch: ch[:2] == ("block", event.get("index"))
    if kind in ("message_stop", "message_delta", "response.completed", "response.incomplete", "response.failed",
                "error") or "error" in event:
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
besides its streamed pieces is not scanned whole (most events of every stream), but these values still go
through the recognizers, and a hit withholds the answer."""
LONG_NUMBER = 10**8
"""A JSON number this large may be an account or card number: its event is scanned whole."""


def _has_text(doc: Any, key: str | None = None) -> bool:
    """Whether an event carries text beyond its streamed pieces (a ``.done`` event's whole text, a final
    response, a long number): such an event is scanned whole."""
    if isinstance(doc, str):
        return len(doc) > 1 and key not in IDENTIFIER_KEYS
    if isinstance(doc, bool):
        return False
    if isinstance(doc, int | float):
        return abs(doc) >= LONG_NUMBER
    if isinstance(doc, list):
        return any(_has_text(v, key) for v in doc)
    if isinstance(doc, dict):
        return any(_has_text(v, k) for k, v in doc.items())
    return False


def _identifiers(doc: Any, key: str | None = None) -> Iterable[str]:
    """The identifier strings of an event (`IDENTIFIER_KEYS`): for the recognizers."""
    if isinstance(doc, str):
        if key in IDENTIFIER_KEYS:
            yield doc
    elif isinstance(doc, list):
        for v in doc:
            yield from _identifiers(v, key)
    elif isinstance(doc, dict):
        for k, v in doc.items():
            yield from _identifiers(v, k)


_ENVELOPE = frozenset({"id", "object", "created", "model", "type", "index", "item_id", "output_index",
                       "content_index"})
"""What an event carried out of its channel's last event keeps at the top; below it only ``index`` and
``type``, so that a client that appends every string of a delta (ids, names, roles) sees nothing twice."""


def _skeleton(template: Any, path: Path, text: str, top: bool = True) -> Any:
    """`template` pruned to the way to `path` (with `text` at its end) and the fields that say where it is."""
    if not path:
        return text
    key, rest = path[0], path[1:]
    if isinstance(template, list):
        return [_skeleton(template[key], rest, text, False)]
    keep = _ENVELOPE if top else ("index", "type")
    out = {k: v for k, v in template.items() if k in keep and not isinstance(v, dict | list)}
    out[key] = _skeleton(template[key], rest, text, False)
    return out


def release_point(text: str, spans: list[Span], keep: int, placeholders: list[tuple[int, int]]) -> int:
    """How much of scanned `text` may go out, keeping about `keep` characters back: cut after whitespace,
    never inside a span (the whole span goes, masked) nor inside a placeholder; 0 (nothing yet) when there is
    no whitespace to cut after, since a cut inside a word may cut an entity the scan could not see whole."""
    cut = len(text) - keep
    if cut <= 0:
        return 0
    space = max(text.rfind(c, 0, cut) for c in " \n\t\r")
    if space < 0:
        return 0
    cut = space + 1
    for s in spans:
        if s.start < cut < s.end:
            cut = s.end
    for start, end in placeholders:
        if start < cut < end:
            cut = start
    return cut


HOLD_LIMIT = 8
"""A stream text with no whitespace for this many windows cannot be cut safely: the answer is withheld."""
_LINE = re.compile(r"\r\n|\r|\n")
_ESCAPED = re.compile(r"\\u([0-9A-Fa-f]{4})")


class AnswerStream:
    """A server-sent-event stream of any of the three APIs, restored (and scanned) as the bytes arrive.

    Bytes are cut into events at blank lines (CR, LF or CRLF, as the standard allows; an unfinished event
    waits for its end, up to `max_event_bytes`); each event's streamed text pieces go through their channel's
    scan window and placeholder hold-back, every other string is restored whole. Events that are not JSON
    (``[DONE]``) pass as they are, after the held text of every channel. Under a scan, what is not JSON data
    is not passed on (comments become ``:``, ``id:`` lines and event names that are not the data's type go),
    and a data payload that is neither JSON nor ``[DONE]`` withholds the answer. A refused stream (`stopped`)
    ends with one error event."""

    def __init__(self, pseudonyms: Pseudonyms, scan: AnswerScan | None = None, kind: Kind | None = None,
                 max_event_bytes: int = 1 << 20):
        self._p = pseudonyms
        self._scan = scan
        self._kind = kind
        self._max_event = max_event_bytes
        self._pending = b""
        self._started = False
        self._channels: dict[tuple, _Channel] = {}
        self._closed: set[tuple] = set()
        self._done = False
        self.stopped: AnswerRefused | None = None

    async def feed(self, chunk: bytes) -> bytes:
        if self.stopped:
            return b""
        if not self._started and chunk:
            self._started = True
            chunk = chunk.removeprefix(b"\xef\xbb\xbf")  # a byte-order mark before the first event
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
        """The end of the stream: any held text, and an unfinished event (handled as a whole one)."""
        if self.stopped:
            return b""
        try:
            rest, self._pending = self._pending, b""
            last = await self._event(rest) if rest.strip() else b""
            tail = await self._flush(lambda ch: True)
        except AnswerRefused as refused:
            return self._stop([], refused)
        return last + tail

    def _stop(self, out: list[bytes], refused: AnswerRefused) -> bytes:
        """Events already whole go out; held text and the rest of the stream never do."""
        self.stopped = refused
        self._pending = b""
        self._channels.clear()
        return b"".join(out) + error_event(self._kind, refused)

    async def _event(self, raw: bytes) -> bytes:
        if not raw.strip():
            return b""
        lines = _LINE.split(raw.decode("utf-8", "replace"))
        data_at = [i for i, line in enumerate(lines) if line.startswith("data:")]
        payload = "\n".join(lines[i][5:].removeprefix(" ") for i in data_at)
        try:
            event = json.loads(payload) if data_at else None
        except ValueError:
            event = None
        name = next((line[6:].strip() for line in lines if line.startswith("event:")), None)
        head = self._head(lines, event)
        if not isinstance(event, dict):
            done = payload.strip() == "[DONE]"
            before = await self._flush(lambda ch: True) if done else b""
            self._done = self._done or done
            if self._scan is not None and data_at and not done:
                raise AnswerRefused(NOT_INSPECTED)  # not the JSON of any of the three APIs: not read
            if self._scan is not None:
                kept = head + [lines[i] for i in data_at]
                return before + (_encode("\n".join(kept)) + b"\n\n" if kept else b"")
            return before + _encode(self._p.restore("\n".join(lines))) + b"\n\n"
        ends = _ends(event)
        pieces = list(_deltas(event))
        here = {key for key, _, _ in pieces}
        # A channel this event ends gets its held text out first, unless the event carries a piece of it.
        before = await self._flush(lambda ch: ends(ch) and ch not in here) if ends else b""
        if self._scan is not None and name not in (event.get("type"), "error"):
            name = None  # under a scan an event name that is not the data's type could carry text
        event = await self._rewrite_event(event, name, pieces, ends)
        return before + _encode("\n".join(head + ["data: " + _dumps(event)])) + b"\n\n"

    def _head(self, lines: list[str], event: Any) -> list[str]:
        """An event's lines other than its data, as they go on: all of them without a scan; under a scan
        only what cannot carry text (an event name that is the data's type, a retry interval, empty
        comments)."""
        head = [line for line in lines if not line.startswith("data:") and line]
        if self._scan is None:
            return head
        kind = event.get("type") if isinstance(event, dict) else None
        safe = []
        for line in head:
            if line.startswith(":"):
                safe.append(":")
            elif (line.startswith("event:") and line[6:].strip() in (kind, "error")) or \
                    (line.startswith("retry:") and line[6:].strip().isdigit()):
                safe.append(line)
        return safe

    async def _rewrite_event(self, event: dict, name: str | None, pieces: list,
                             ends: Callable[[tuple], bool] | None) -> dict:
        texts = {path: _get(event, path) for _, path, _ in pieces}
        for path in texts:
            _set(event, path, "\0")  # kept out of the whole-event passes below
        if self._scan is not None:
            found = self._scan.decider.recognized_types(list(_identifiers(event)))
            if found:
                raise AnswerRefused(PII_IN_ANSWER, found)
            if _has_text(event):
                event = json.loads(await self._scan.body(_dumps(event).encode("utf-8")))
        event = restore_json(event, self._p)
        for key, path, is_json in pieces:
            piece = texts[path]
            if self._scan is not None and piece and (self._done or key in self._closed):
                raise AnswerRefused(NOT_INSPECTED)  # text after its end: a client would append it unscanned
            channel = self._channels.setdefault(key, _Channel())
            channel.template, channel.path, channel.event_name, channel.arguments = event, path, name, is_json
            _set(event, path, await self._take(channel, piece, last=bool(ends and ends(key))))
        if ends:
            self._closed.update(key for key in self._channels if ends(key))
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
        if channel.arguments and _ESCAPED.search(text):
            await self._check_escaped(text, spans)
        placeholders = self._p.ranges(text)
        cut = len(text) if last else release_point(text, spans, self._scan.window // 2, placeholders)
        if cut == 0 and len(text) > HOLD_LIMIT * self._scan.window:
            raise AnswerRefused(NOT_INSPECTED)
        channel.unscanned = text[cut:]
        out = [s for s in spans if s.end <= cut]
        self._scan.masked.update(s.label for s in out)
        if not out:
            return text[:cut]
        quote = json_inner if channel.arguments else None
        return anonymize(text[:cut], out, self._scan.policy, quote=quote).text

    async def _check_escaped(self, text: str, spans: list[Span]) -> None:
        """Streamed JSON that spells characters as ``\\uXXXX`` reads differently once decoded: when the decoded
        text holds more personal data than the text as sent, the masks would miss it, so the answer is
        withheld."""
        decoded = _ESCAPED.sub(lambda m: chr(int(m.group(1), 16)), text)
        if len(await self._scan.spans(decoded)) > len(spans):
            raise AnswerRefused(NOT_INSPECTED)

    async def _flush(self, which: Callable[[tuple], bool]) -> bytes:
        """Events carrying the held text of the channels `which` selects, built from each one's last event
        pruned to the channel's own field (`_skeleton`)."""
        out = []
        for key, channel in list(self._channels.items()):
            if not which(key) or channel.template is None or not (channel.held or channel.unscanned):
                continue
            text = await self._take(channel, "", last=True)
            if not text:
                continue
            event = _skeleton(channel.template, channel.path, text)
            lines = ([f"event: {channel.event_name}"] if channel.event_name else []) + ["data: " + _dumps(event)]
            out.append(_encode("\n".join(lines)) + b"\n\n")
        return b"".join(out)


def _encode(text: str) -> bytes:
    """UTF-8; a lone surrogate (an emoji cut in two by the backend) goes out as its JSON escape."""
    return text.encode("utf-8", "backslashreplace")


_BLANK = re.compile(rb"(?:\r\n|\r|\n)(?:\r\n|\r|\n)")
_SSE_START = re.compile(rb"(?:\xef\xbb\xbf)?\s*(?:data:|event:|id:|retry:|:)")


def _event_end(buffer: bytes) -> tuple[int, int] | None:
    """(end of the first complete event, start of the next) in `buffer`, or None. (A CRLF cut between two
    chunks reads as two line ends: at worst one more, empty, event.)"""
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
        # A rewritten answer changes length: the header that describes the old bytes goes.
        self.remove_headers = ["content-length"]
        self._kind = kind

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
        if self._scan is not None and _SSE_START.match(body):
            # Events without their content type: a client that asked for a stream reads them as one.
            stream = AnswerStream(self._p, self._scan, self._kind, self._max)
            return await stream.feed(body) + await stream.finish()
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
