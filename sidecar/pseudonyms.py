"""Reversible pseudonymization: each distinct value in a request becomes a typed, numbered placeholder
(``<PERSON_1>``, ``<EMAIL_ADDRESS_2>``), and the backend's answer gets the values back.

Numbers follow first appearance across the whole request, so a conversation that re-sends its history gets
the same placeholder for the same value on every turn with no state kept between requests. A number whose
placeholder already occurs in the client's own text is skipped, so restoring never rewrites text the client
sent. The map lives in one ext_proc stream's memory only: never logged, never sent, gone with the stream.

Streamed answers (SSE) are restored event by event; a placeholder split across events is held back, at most
the length of a placeholder, never the stream (`StreamRestorer`).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from sidecar.results import Span

DEFAULT_FORMAT = "<{type}_{n}>"


def check_format(template: str) -> str:
    """A placeholder template: ``{type}`` then ``{n}``, each once, with fixed text before the type and after
    the number (so a placeholder's end is unambiguous: ``<PERSON_1>`` is no prefix of ``<PERSON_12>``)."""
    if template.count("{type}") != 1 or template.count("{n}") != 1:
        raise ValueError("must contain {type} and {n} exactly once")
    head, rest = template.split("{type}")
    if "{n}" not in rest:
        raise ValueError("{type} must come before {n}")
    middle, tail = rest.split("{n}")
    if not head or not tail or tail[0].isdigit() or any(c in "{}" for c in head + middle + tail):
        raise ValueError("needs fixed text (not digits, not braces) before {type} and after {n}")
    return template


@dataclass(repr=False, eq=False)
class Pseudonyms:
    """One request's placeholders: value -> placeholder, and back."""

    template: str = DEFAULT_FORMAT
    taken: str = ""
    """All the text the client sent: a placeholder found in it is never issued."""
    _by_value: dict[str, str] = field(default_factory=dict)
    _by_placeholder: dict[str, str] = field(default_factory=dict)
    _next: int = 1
    _compiled: re.Pattern[str] | None = None  # the issued placeholders' pattern, rebuilt when one is added

    def placeholder(self, entity_type: str, value: str) -> str:
        """The value's placeholder, issued on first sight."""
        known = self._by_value.get(value)
        if known is not None:
            return known
        while True:
            candidate = self.template.format(type=entity_type, n=self._next)
            self._next += 1
            if candidate not in self.taken:
                break
        self._by_value[value] = candidate
        self._by_placeholder[candidate] = value
        self._compiled = None
        return candidate

    def __repr__(self) -> str:  # never the values: a Decision may end up in a log or a traceback
        return f"Pseudonyms({len(self._by_placeholder)} placeholders)"

    def __bool__(self) -> bool:
        return bool(self._by_placeholder)

    @property
    def longest(self) -> int:
        return max((len(p) for p in self._by_placeholder), default=0)

    def restore(self, text: str, quote: Callable[[str], str] | None = None) -> str:
        """`text` with every issued placeholder replaced by its value (`quote`d, e.g. for JSON inside a
        string)."""
        if not self._by_placeholder or not text:
            return text
        pattern = self._pattern()
        return pattern.sub(lambda m: (quote or _same)(self._by_placeholder[m.group(0)]), text)

    def partial_suffix(self, text: str) -> int:
        """Length of the longest end of `text` that is the start of a placeholder, but not a whole one: what
        must wait for the next piece of a stream."""
        for k in range(min(len(text), self.longest - 1), 0, -1):
            tail = text[-k:]
            if any(p.startswith(tail) and p != tail for p in self._by_placeholder):
                return k
        return 0

    def _pattern(self) -> re.Pattern[str]:
        """Compiled once per set of placeholders: a streamed answer restores every event with it."""
        if self._compiled is None:
            keys = sorted(self._by_placeholder, key=len, reverse=True)
            self._compiled = re.compile("|".join(re.escape(k) for k in keys))
        return self._compiled


def _same(value: str) -> str:
    return value


def pseudonymize(texts: Sequence[str], spans: Sequence[Sequence[Span]], pseudonyms: Pseudonyms) -> list[str | None]:
    """Each text with its spans replaced by placeholders, numbered in reading order across all the texts;
    None where a text has no span."""
    out: list[str | None] = []
    for text, kept in zip(texts, spans, strict=True):
        ordered = sorted(kept, key=lambda s: s.start)
        names = [pseudonyms.placeholder(s.label, text[s.start:s.end]) for s in ordered]
        if not ordered:
            out.append(None)
            continue
        pieces, at = [], 0
        for s, name in zip(ordered, names, strict=True):
            pieces += [text[at:s.start], name]
            at = s.end
        out.append("".join(pieces) + text[at:])
    return out


# --- answers -----------------------------------------------------------------------------------------------


def restore_json(doc: Any, pseudonyms: Pseudonyms) -> Any:
    """Every string of a JSON document restored; a string that is itself JSON (tool-call arguments) is
    restored inside, so a value with quotes in it keeps the arguments valid JSON."""
    if isinstance(doc, str):
        return _restore_string(doc, pseudonyms)
    if isinstance(doc, list):
        return [restore_json(v, pseudonyms) for v in doc]
    if isinstance(doc, dict):
        return {k: restore_json(v, pseudonyms) for k, v in doc.items()}
    return doc


def _restore_string(text: str, pseudonyms: Pseudonyms) -> str:
    stripped = text.lstrip()
    if stripped[:1] in ("{", "[") and pseudonyms.restore(text) != text:
        try:
            json.loads(text)
        except ValueError:
            pass
        else:
            return pseudonyms.restore(text, quote=_json_inner)
    return pseudonyms.restore(text)


def _json_inner(value: str) -> str:
    return json.dumps(value, ensure_ascii=False)[1:-1]


def restore_body(body: bytes, pseudonyms: Pseudonyms) -> bytes:
    """A whole JSON answer restored; a body that is not JSON is restored as text."""
    try:
        doc = json.loads(body)
    except ValueError:
        return pseudonyms.restore(body.decode("utf-8", "replace")).encode("utf-8")
    return json.dumps(restore_json(doc, pseudonyms), ensure_ascii=False, separators=(",", ":")).encode("utf-8")


# --- streamed answers --------------------------------------------------------------------------------------

Path = tuple[Any, ...]


@dataclass
class _Channel:
    """One growing text of a stream (a choice's content, a tool call's arguments, a content block)."""

    held: str = ""
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


class StreamRestorer:
    """Restores placeholders in a server-sent-event stream of any of the three APIs, as the bytes arrive.

    Bytes are cut into events at blank lines (an unfinished event waits for its end); each event's JSON is
    restored: streamed text pieces through their channel's hold-back, every other string whole. Events
    that are not JSON (``[DONE]``) pass as they are, after the held text of every channel."""

    def __init__(self, pseudonyms: Pseudonyms):
        self._p = pseudonyms
        self._pending = b""
        self._channels: dict[tuple, _Channel] = {}

    def feed(self, chunk: bytes) -> bytes:
        self._pending += chunk
        out = []
        while True:
            cut = _event_end(self._pending)
            if cut is None:
                break
            raw, self._pending = self._pending[:cut[0]], self._pending[cut[1]:]
            out.append(self._event(raw))
        return b"".join(out)

    def finish(self) -> bytes:
        """The end of the stream: an unfinished event as it came, and any held text."""
        tail = self._flush(lambda ch: True)
        rest, self._pending = self._pending, b""
        return tail + (self._p.restore(rest.decode("utf-8", "replace")).encode("utf-8") if rest else b"")

    def _event(self, raw: bytes) -> bytes:
        lines = raw.decode("utf-8", "replace").split("\n")
        data_at = [i for i, line in enumerate(lines) if line.startswith("data:")]
        payload = "\n".join(lines[i][5:].removeprefix(" ") for i in data_at)
        try:
            event = json.loads(payload) if data_at else None
        except ValueError:
            event = None
        name = next((line[6:].strip() for line in lines if line.startswith("event:")), None)
        if not isinstance(event, dict):
            before = self._flush(lambda ch: True) if payload.strip() == "[DONE]" else b""
            return before + self._p.restore(raw.decode("utf-8", "replace")).encode("utf-8") + b"\n\n"
        ends = _ends(event)
        pieces = list(_deltas(event))
        here = {key for key, _, _ in pieces}
        # A channel this event ends gets its held text out first, unless the event carries a piece of it.
        before = self._flush(lambda ch: ends(ch) and ch not in here) if ends else b""
        event = self._restore_event(event, name, pieces, ends)
        head = [line for i, line in enumerate(lines) if not line.startswith("data:")]
        body = "\n".join(head + ["data: " + json.dumps(event, ensure_ascii=False, separators=(",", ":"))])
        return before + body.encode("utf-8") + b"\n\n"

    def _restore_event(self, event: dict, name: str | None, pieces: list, ends: Callable[[tuple], bool] | None) -> dict:
        texts = {path: _get(event, path) for _, path, _ in pieces}
        for path in texts:
            _set(event, path, "\0")  # kept out of the whole-string pass below
        event = restore_json(event, self._p)
        for key, path, is_json in pieces:
            channel = self._channels.setdefault(key, _Channel())
            text = channel.held + texts[path]
            k = 0 if ends and ends(key) else self._p.partial_suffix(text)  # the last piece holds nothing back
            channel.held = text[len(text) - k:] if k else ""
            emitted = text[:len(text) - k]
            _set(event, path, self._p.restore(emitted, quote=_json_inner if is_json else None))
            channel.template, channel.path, channel.event_name, channel.arguments = event, path, name, is_json
        return event

    def _flush(self, which: Callable[[tuple], bool]) -> bytes:
        """Events carrying the held text of the channels `which` selects, cloned from each one's last event."""
        out = []
        for key, channel in self._channels.items():
            if not which(key) or not channel.held or channel.template is None:
                continue
            event = json.loads(json.dumps(channel.template))
            _clear_finish(event)
            _set(event, channel.path, self._p.restore(channel.held, quote=_json_inner if channel.arguments else None))
            channel.held = ""
            lines = ([f"event: {channel.event_name}"] if channel.event_name else []) + \
                ["data: " + json.dumps(event, ensure_ascii=False, separators=(",", ":"))]
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
    """One backend answer being restored, chunk by chunk as Envoy streams it (``STREAMED`` response body).

    An event stream is restored as it flows (`StreamRestorer`); any other answer is held until its end and
    restored whole (a JSON answer is one document), up to `max_bytes`: past that, what was held goes out as
    it came and the rest passes through, so the client sees placeholders, never someone else's values."""

    def __init__(self, pseudonyms: Pseudonyms, content_type: str | None, content_encoding: str | None,
                 max_bytes: int):
        from sidecar.body import parse_content_encoding
        from sidecar.errors import UnsupportedEncoding

        self._p = pseudonyms
        self._max = max_bytes
        try:
            codings = parse_content_encoding(content_encoding)
        except UnsupportedEncoding:
            codings = None  # cannot be read: passes as it came
        self.streamed = (content_type or "").split(";")[0].strip().lower() == "text/event-stream"
        # The request went without Accept-Encoding, so an encoded answer is rare: it passes as it came.
        readable = codings == []
        self._stream = StreamRestorer(pseudonyms) if self.streamed and readable else None
        self._held: list[bytes] | None = [] if readable and not self.streamed else None
        self._size = 0
        self.given_up: str | None = None if readable else "encoded"
        # A whole answer changes length (and is sent decoded): the headers that describe the old bytes go.
        self.remove_headers = ["content-length"] if self._held is not None else []

    def chunk(self, body: bytes, end: bool) -> bytes:
        """What goes on in place of this chunk of the answer."""
        if self._stream is not None:
            return self._stream.feed(body) + (self._stream.finish() if end else b"")
        if self._held is None:
            return body
        self._held.append(body)
        self._size += len(body)
        if self._size > self._max:
            return self._give_up("too_large")
        if not end:
            return b""
        return self._whole(b"".join(self._held))

    def _whole(self, body: bytes) -> bytes:
        self._held = None
        return restore_body(body, self._p) if body else body

    def _give_up(self, reason: str) -> bytes:
        held, self._held = b"".join(self._held or []), None
        self.given_up = reason
        return held
