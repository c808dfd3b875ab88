"""OpenAI-style request bodies: find the text the models read, and edit the body without re-serialising it.

The body is validated with ``json.loads`` and then walked once more, with json's own C scanner for every
value, to find where the few JSON string tokens we may change live in the decoded text: ``model``, chat
message ``content`` strings and the ``text`` of ``text``/``input_text`` content parts, and completions
``prompt`` strings. `rewrite` splices re-encoded strings into those ranges and encodes the result as
UTF-8, so every other byte (key order, whitespace, number formats, escapes, unknown keys such as
``stream``, ``tools`` or vendor extensions) reaches the backend exactly as the client sent it: valid UTF-8
decodes and encodes back to the same bytes. Where a key repeats, the last one wins, as in ``json.loads``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from json.decoder import scanstring
from json.scanner import make_scanner
from typing import Any, Literal

from sidecar.errors import EmptyBody, NoText, NotJson, NotObject, NotUtf8

Kind = Literal["chat", "completions"]
CategoryInput = Literal["latest_user", "all_user"]

TEXT_PART_TYPES = frozenset({"text", "input_text"})

_WS = re.compile(r"[ \t\n\r]*")
_COLON = re.compile(r"[ \t\n\r]*:[ \t\n\r]*")
_NEXT = re.compile(r"[ \t\n\r]*([,}\]])[ \t\n\r]*")
"""After a value: the comma (and what follows it up to the next value) or the closing bracket."""
_SURROGATE = re.compile("[\ud800-\udfff]")
_scan = make_scanner(json.JSONDecoder())
"""json's C scanner: ``_scan(text, i)`` -> (the JSON value starting at i, where it ends)."""


@dataclass(frozen=True, slots=True)
class TextField:
    """One JSON string the models read. ``text`` is the decoded value (character offsets of spans are into
    it); ``span`` is where its token, quotes included, sits in the body's text (`ParsedRequest.source`)."""

    index: int
    role: str | None  # chat role; None for completions prompts
    message_index: int | None  # position in `messages`; None for prompts
    part_index: int | None  # position in a content-part array or a prompt list; None for a plain string
    text: str
    span: tuple[int, int]


@dataclass(frozen=True, slots=True)
class ParsedRequest:
    kind: Kind
    source: str
    """The body decoded from UTF-8; every span is a range of its characters."""
    requested_model: str | None
    """The client's ``model`` when it is a string; None when missing or not a string."""
    model_span: tuple[int, int] | None
    """Where the ``model`` value token is; None when the key is absent."""
    object_start: int
    """Where the top-level ``{`` is (a missing ``model`` is inserted after it)."""
    object_empty: bool
    fields: tuple[TextField, ...]

    def category_text(self, mode: CategoryInput = "latest_user") -> str:
        """What the subject classifier reads: the latest user message that has text (or every user
        message, for ``all_user``), parts joined with newlines; for completions, the prompts."""
        if self.kind == "completions":
            return "\n".join(f.text for f in self.fields)
        user = [f for f in self.fields if f.role == "user" and f.text]
        if mode == "latest_user" and user:
            latest = user[-1].message_index
            user = [f for f in user if f.message_index == latest]
        return "\n".join(f.text for f in user)

    def pii_fields(self, roles: frozenset[str] | set[str] | list[str]) -> list[TextField]:
        """Non-empty fields scanned for PII: messages whose role is listed, and every prompt."""
        return [f for f in self.fields if f.text and (self.kind == "completions" or f.role in roles)]


def parse_body(body: bytes, kind: Kind) -> ParsedRequest:
    """Read an OpenAI-style body; raises a `RequestError` subclass naming the problem (never the content)."""
    if not body.strip(b" \t\n\r"):
        raise EmptyBody("request body is empty")
    try:
        decoded = body.decode("utf-8")
    except UnicodeDecodeError as e:
        raise NotUtf8(f"request body is not valid UTF-8 (byte {e.start})") from None
    try:
        document = json.loads(decoded)
    except json.JSONDecodeError as e:
        raise NotJson(f"request body is not valid JSON ({e.msg} at line {e.lineno}, column {e.colno})") from None
    except (ValueError, RecursionError) as e:
        raise NotJson(f"request body is not valid JSON ({type(e).__name__})") from None
    if not isinstance(document, dict):
        raise NotObject(f"request body is a JSON {_json_type(document)}, not an object")

    start = _WS.match(decoded).end()
    top = _members(decoded, start)
    model = top.get("model")
    fields = _chat_fields(decoded, top) if kind == "chat" else _prompt_fields(decoded, top)
    if not any(f.text for f in fields):
        where = "messages" if kind == "chat" else "prompt"
        raise NoText(f"request body has no text in '{where}'")
    return ParsedRequest(
        kind=kind,
        source=decoded,
        requested_model=model[2] if model is not None and isinstance(model[2], str) else None,
        model_span=model[:2] if model is not None else None,
        object_start=start,
        object_empty=not top,
        fields=tuple(fields),
    )


def rewrite(body: bytes, parsed: ParsedRequest, model: str | None, texts: dict[int, str]) -> bytes:
    """Splice a new ``model`` (when not None) and new field texts (by `TextField.index`) into the body.
    Characters outside those tokens are copied unchanged; a missing ``model`` key is inserted first."""
    if model is None and not texts:
        return body
    edits: list[tuple[int, int, str]] = []
    if model is not None:
        value = encode_string(model)
        if parsed.model_span is not None:
            edits.append((*parsed.model_span, value))
        else:
            at = parsed.object_start + 1
            edits.append((at, at, '"model":' + value + ("" if parsed.object_empty else ",")))
    for index, text in texts.items():
        edits.append((*parsed.fields[index].span, encode_string(text)))
    edits.sort(key=lambda e: e[0])
    source = parsed.source
    out, pos = [], 0
    for start, end, value in edits:
        out += [source[pos:start], value]
        pos = end
    out.append(source[pos:])
    return "".join(out).encode("utf-8")


def encode_string(text: str) -> str:
    """A JSON string token, non-ASCII kept as is; lone surrogates (legal as JSON escapes, not encodable as
    UTF-8) stay escapes."""
    token = json.dumps(text, ensure_ascii=False)
    return _SURROGATE.sub(lambda m: f"\\u{ord(m.group()):04x}", token)


Span = tuple[int, int, Any]
"""(start, end, decoded value) of one JSON value in the text."""


def _chat_fields(s: str, top: dict[str, Span]) -> list[TextField]:
    fields: list[TextField] = []
    messages = top.get("messages")
    if messages is None or not isinstance(messages[2], list):
        return fields
    for m_index, (m_start, _, message) in enumerate(_items(s, messages[0])):
        if not isinstance(message, dict) or "content" not in message:
            continue
        role = message.get("role")
        role = role if isinstance(role, str) else None
        content = message["content"]
        if isinstance(content, str):
            start, end, _ = _members(s, m_start)["content"]
            fields.append(TextField(len(fields), role, m_index, None, content, (start, end)))
        elif isinstance(content, list):
            start, _, _ = _members(s, m_start)["content"]
            for p_index, (p_start, _, part) in enumerate(_items(s, start)):
                if isinstance(part, dict) and part.get("type") in TEXT_PART_TYPES and isinstance(part.get("text"), str):
                    t_start, t_end, text = _members(s, p_start)["text"]
                    fields.append(TextField(len(fields), role, m_index, p_index, text, (t_start, t_end)))
    return fields


def _prompt_fields(s: str, top: dict[str, Span]) -> list[TextField]:
    prompt = top.get("prompt")
    if prompt is None:
        return []
    start, end, value = prompt
    if isinstance(value, str):
        return [TextField(0, None, None, None, value, (start, end))]
    fields: list[TextField] = []
    if isinstance(value, list):
        for p_index, (item_start, item_end, item) in enumerate(_items(s, start)):
            if isinstance(item, str):
                fields.append(TextField(len(fields), None, None, p_index, item, (item_start, item_end)))
    return fields


def _members(s: str, pos: int) -> dict[str, Span]:
    """Key -> value span for the object starting at `pos` (last duplicate wins)."""
    members: dict[str, Span] = {}
    pos = _WS.match(s, pos + 1).end()
    if s[pos] == "}":
        return members
    while True:
        key, pos = scanstring(s, pos + 1)
        pos = _COLON.match(s, pos).end()
        value, end = _scan(s, pos)
        members[key] = (pos, end, value)
        after = _NEXT.match(s, end)
        if after.group(1) == "}":
            return members
        pos = after.end()


def _items(s: str, pos: int) -> Iterator[Span]:
    """The values of the array starting at `pos`, with where each starts and ends."""
    pos = _WS.match(s, pos + 1).end()
    if s[pos] == "]":
        return
    while True:
        value, end = _scan(s, pos)
        yield pos, end, value
        after = _NEXT.match(s, end)
        if after.group(1) == "]":
            return
        pos = after.end()


def _json_type(value: object) -> str:
    if isinstance(value, list):
        return "array"
    if isinstance(value, str):
        return "string"
    if isinstance(value, bool):
        return "boolean"
    if value is None:
        return "null"
    return "number"
