"""OpenAI-style request bodies: find the text the models read, and edit the body without re-serialising it.

The body is validated with ``json.loads`` and then scanned once more, at the byte level, to find where the
few JSON string tokens we may change live: ``model``, chat message ``content`` strings and the ``text`` of
``text``/``input_text`` content parts, and completions ``prompt`` strings. `rewrite` splices re-encoded
strings into those ranges, so every other byte (key order, whitespace, number formats, escapes, unknown
keys such as ``stream``, ``tools`` or vendor extensions) reaches the backend exactly as the client sent it.

Scanning bytes is safe because every JSON structural character is ASCII and every byte of a multi-byte
UTF-8 sequence is >= 0x80. Where a key repeats, the last one wins, as in ``json.loads``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal

from sidecar.errors import EmptyBody, NoText, NotJson, NotObject, NotUtf8

Kind = Literal["chat", "completions"]
CategoryInput = Literal["latest_user", "all_user"]

TEXT_PART_TYPES = frozenset({"text", "input_text"})

_WS = re.compile(rb"[ \t\n\r]*")
_STRING_OR_BRACKET = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"|[\[\]{}]', re.DOTALL)
_SCALAR = re.compile(rb"[^ \t\n\r,\]}]+")
_SURROGATE = re.compile("[\ud800-\udfff]")
_QUOTE = ord('"')
_OPENERS = b"[{"


@dataclass(frozen=True, slots=True)
class TextField:
    """One JSON string the models read. ``text`` is the decoded value (character offsets of spans are into
    it); ``byte_span`` is where its token, quotes included, sits in the body."""

    index: int
    role: str | None  # chat role; None for completions prompts
    message_index: int | None  # position in `messages`; None for prompts
    part_index: int | None  # position in a content-part array or a prompt list; None for a plain string
    text: str
    byte_span: tuple[int, int]


@dataclass(frozen=True, slots=True)
class ParsedRequest:
    kind: Kind
    requested_model: str | None
    """The client's ``model`` when it is a string; None when missing or not a string."""
    model_span: tuple[int, int] | None
    """Byte range of the ``model`` value token; None when the key is absent."""
    object_start: int
    """Byte offset of the top-level ``{`` (where a missing ``model`` is inserted)."""
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

    start = _skip_ws(body, 0)
    ends = _token_ends(body)
    top = _members(body, start, ends)
    model_span = top.get("model")
    requested = document.get("model")
    fields = _chat_fields(body, top, ends) if kind == "chat" else _prompt_fields(body, top, ends)
    if not any(f.text for f in fields):
        where = "messages" if kind == "chat" else "prompt"
        raise NoText(f"request body has no text in '{where}'")
    return ParsedRequest(
        kind=kind,
        requested_model=requested if isinstance(requested, str) else None,
        model_span=model_span,
        object_start=start,
        object_empty=not top,
        fields=tuple(fields),
    )


def rewrite(body: bytes, parsed: ParsedRequest, model: str | None, texts: dict[int, str]) -> bytes:
    """Splice a new ``model`` (when not None) and new field texts (by `TextField.index`) into the body.
    Bytes outside those tokens are copied unchanged; a missing ``model`` key is inserted first."""
    edits: list[tuple[int, int, bytes]] = []
    if model is not None:
        value = encode_string(model)
        if parsed.model_span is not None:
            edits.append((*parsed.model_span, value))
        else:
            at = parsed.object_start + 1
            edits.append((at, at, b'"model":' + value + (b"" if parsed.object_empty else b",")))
    for index, text in texts.items():
        field = parsed.fields[index]
        edits.append((*field.byte_span, encode_string(text)))
    edits.sort(key=lambda e: e[0])
    out, pos = [], 0
    for start, end, value in edits:
        out += [body[pos:start], value]
        pos = end
    out.append(body[pos:])
    return b"".join(out)


def encode_string(text: str) -> bytes:
    """A JSON string token, non-ASCII kept as UTF-8; lone surrogates (legal as JSON escapes) stay escapes."""
    token = json.dumps(text, ensure_ascii=False)
    token = _SURROGATE.sub(lambda m: f"\\u{ord(m.group()):04x}", token)
    return token.encode("utf-8")


def _chat_fields(body: bytes, top: dict[str, tuple[int, int]], ends: dict[int, int]) -> list[TextField]:
    fields: list[TextField] = []
    span = top.get("messages")
    if span is None or body[span[0]] != ord("["):
        return fields
    for m_index, (m_start, _) in enumerate(_items(body, span[0], ends)):
        if body[m_start] != ord("{"):
            continue
        message = _members(body, m_start, ends)
        role = _string_at(body, message.get("role"))
        content = message.get("content")
        if content is None:
            continue
        if body[content[0]] == ord('"'):
            fields.append(TextField(len(fields), role, m_index, None, _decode(body, content), content))
        elif body[content[0]] == ord("["):
            for p_index, (p_start, _) in enumerate(_items(body, content[0], ends)):
                if body[p_start] != ord("{"):
                    continue
                part = _members(body, p_start, ends)
                text = part.get("text")
                if _string_at(body, part.get("type")) in TEXT_PART_TYPES and text and body[text[0]] == ord('"'):
                    fields.append(TextField(len(fields), role, m_index, p_index, _decode(body, text), text))
    return fields


def _prompt_fields(body: bytes, top: dict[str, tuple[int, int]], ends: dict[int, int]) -> list[TextField]:
    span = top.get("prompt")
    if span is None:
        return []
    if body[span[0]] == ord('"'):
        return [TextField(0, None, None, None, _decode(body, span), span)]
    fields: list[TextField] = []
    if body[span[0]] == ord("["):
        for p_index, item in enumerate(_items(body, span[0], ends)):
            if body[item[0]] == ord('"'):
                fields.append(TextField(len(fields), None, None, p_index, _decode(body, item), item))
    return fields


def _members(body: bytes, pos: int, ends: dict[int, int]) -> dict[str, tuple[int, int]]:
    """Key -> value byte range for the object starting at `pos` (last duplicate wins)."""
    members: dict[str, tuple[int, int]] = {}
    pos = _skip_ws(body, pos + 1)
    if body[pos] == ord("}"):
        return members
    while True:
        key_end = ends[pos]
        key = _decode(body, (pos, key_end))
        pos = _skip_ws(body, _skip_ws(body, key_end) + 1)  # past ':'
        end = _value_end(body, pos, ends)
        members[key] = (pos, end)
        pos = _skip_ws(body, end)
        if body[pos] == ord("}"):
            return members
        pos = _skip_ws(body, pos + 1)  # past ','


def _items(body: bytes, pos: int, ends: dict[int, int]) -> Iterator[tuple[int, int]]:
    """Byte ranges of the values in the array starting at `pos`."""
    pos = _skip_ws(body, pos + 1)
    if body[pos] == ord("]"):
        return
    while True:
        end = _value_end(body, pos, ends)
        yield pos, end
        pos = _skip_ws(body, end)
        if body[pos] == ord("]"):
            return
        pos = _skip_ws(body, pos + 1)


def _value_end(body: bytes, pos: int, ends: dict[int, int]) -> int:
    if body[pos] == _QUOTE or body[pos] in _OPENERS:
        return ends[pos]
    return _SCALAR.match(body, pos).end()


def _token_ends(body: bytes) -> dict[int, int]:
    """Where each string, array and object ends (one past its last byte), by where it starts: one pass over
    the body, so no value is read twice (a body of thousands of messages, or of megabytes in one string,
    costs one pass, not one per level of nesting)."""
    ends: dict[int, int] = {}
    open_at: list[int] = []
    for m in _STRING_OR_BRACKET.finditer(body):
        start = m.start()
        first = body[start]
        if first == _QUOTE:
            ends[start] = m.end()
        elif first in _OPENERS:
            open_at.append(start)
        else:
            ends[open_at.pop()] = m.end()
    return ends


def _skip_ws(body: bytes, pos: int) -> int:
    return _WS.match(body, pos).end()


def _decode(body: bytes, span: tuple[int, int]) -> str:
    token = body[span[0] : span[1]]
    if b"\\" not in token:
        return token[1:-1].decode("utf-8")
    return json.loads(token)


def _string_at(body: bytes, span: tuple[int, int] | None) -> str | None:
    if span is None or body[span[0]] != ord('"'):
        return None
    return _decode(body, span)


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
