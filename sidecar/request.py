"""Request bodies: every text a model could read, and edits that leave every other byte as sent.

What a backend reads is not only the user's message: assistant turns, tool results, tool-call arguments,
``name``, the Responses API's ``input`` and ``instructions``, the Messages API's ``system`` and content
blocks, and whatever field a new API version adds. So the walk is generic: **every string value is
scanned except those under a short list of structural keys** (`STRUCTURAL_KEYS`: ``model``, ``role``,
``type``, ids, enums; in the body itself only: inside a tool's JSON every value is data), and so is every
object key the APIs do not define (`KNOWN_KEYS`) unless it is a plain field name, and every number long
enough to be a card, phone or SSN. Structural values and field names are never masked (that would break
the request): the recognizers check them, and a hit refuses the request. A string that holds a JSON object or array (tool-call
``arguments``) is walked as a JSON document of its own, so masking inside it keeps it valid JSON. Only the
subject classifier's input is API-specific (`category_text`).

The body is decoded as the backend would decode it (`sidecar.body`: UTF-8, UTF-16/32 with or without a
byte-order mark), validated with ``json.loads``, and walked once more, token by token, to find where each
text sits. A key that appears twice in one object is refused (`DuplicateKey`): parsers disagree on which
copy counts, so a scan of one copy proves nothing about the other. `rewrite` splices re-encoded strings
into those places and encodes the result back the way it came, so key order, whitespace, number formats,
escapes and unknown keys reach the backend exactly as the client sent them.
"""

from __future__ import annotations

import binascii
import json
import re
from dataclasses import dataclass, replace
from json.decoder import scanstring
from typing import Any, Literal

from sidecar.body import BodyText, decode_text
from sidecar.errors import (
    DuplicateKey,
    EmptyBody,
    InvalidModel,
    NoText,
    NotJson,
    NotObject,
    TokenIds,
    TooDeep,
)
from sidecar.vocabulary import Kind

ROUTED_KINDS = frozenset({Kind.CHAT, Kind.COMPLETIONS, Kind.RESPONSES, Kind.MESSAGES})
"""Kinds whose subject is classified and whose ``model`` may be rewritten; `Kind.GENERIC` is only scanned."""
CategoryInput = Literal["latest_user", "all_user"]

TEXT_PART_TYPES = frozenset({"text", "input_text"})

STRUCTURAL_KEYS = frozenset({
    "model", "role", "type", "id", "object", "tool_call_id", "call_id", "tool_use_id", "previous_response_id",
    "status", "finish_reason", "stop_reason", "tool_choice", "reasoning_effort", "effort", "service_tier",
    "truncation", "media_type", "detail", "format", "encoding_format", "modalities", "voice", "include", "enum",
})
"""Keys whose string values are identifiers or enum values, never free text: not scanned. ``model`` is
validated on its own (`MAX_MODEL_CHARS`)."""

KNOWN_KEYS = STRUCTURAL_KEYS | frozenset({
    "messages", "content", "text", "name", "tool_calls", "function", "arguments", "tools", "parameters",
    "description", "properties", "required", "items", "enum", "temperature", "top_p", "top_k", "max_tokens",
    "max_completion_tokens", "max_output_tokens", "stream", "stream_options", "include_usage", "stop",
    "stop_sequences", "n", "seed", "user", "metadata", "response_format", "json_schema", "schema", "strict",
    "logprobs", "top_logprobs", "logit_bias", "presence_penalty", "frequency_penalty", "image_url", "url",
    "input_audio", "data", "input", "instructions", "prompt", "system", "source", "tool_result", "is_error",
    "cache_control", "output", "reasoning", "summary", "store", "parallel_tool_calls", "audio", "prediction",
    "thinking", "budget_tokens", "suffix", "echo", "best_of", "dimensions", "refusal", "annotations",
    "additionalProperties", "title", "default", "minimum", "maximum", "anyOf", "oneOf", "allOf", "$ref",
    "$defs", "definitions", "pattern", "const", "input_schema", "file", "file_id", "filename", "file_data",
    "image", "audio_url", "partial", "citations",
})
"""Keys the chat, completions, Responses and Messages APIs define: not scanned as text themselves (their
values are). Any other key may be client data (``{"jane@example.com": ...}``) and is scanned."""

TOOL_PARENTS = frozenset({"function", "tools", "functions"})
TOOL_TYPES = frozenset({"function", "tool_use", "server_tool_use", "function_call", "custom", "custom_tool_call",
                        "mcp_call", "mcp_tool_use"})
"""Objects whose ``name`` names a tool or function: under these keys, or of these types."""

MAX_DEPTH = 64
"""JSON nesting the walk follows; deeper bodies are refused (no API needs more)."""
MAX_INNER_DEPTH = 3
"""JSON documents inside strings inside JSON documents, at most this deep."""
MAX_MODEL_CHARS = 256
LONG_NUMBER_DIGITS = 9
"""Number tokens with at least this many digits are scanned (SSNs, phones and cards sent as numbers)."""
NAMED_NUMBER_DIGITS = 6
_NUMBER_KEY = re.compile(r"(?i)ssn|social.?security|tax.?id|phone|mobile|card|iban|account|passport|licen[cs]e")
"""Under a key that names an identifying number, a number token of `NAMED_NUMBER_DIGITS` or more is scanned
too: a JSON number drops an SSN's leading zero ("ssn": 78051120 is 078-05-1120)."""

_WS = re.compile(r"[ \t\n\r]*")
_COLON = re.compile(r"[ \t\n\r]*:[ \t\n\r]*")
_NEXT = re.compile(r"[ \t\n\r]*([,}\]])[ \t\n\r]*")
_NUMBER = re.compile(r"-?(?:0|[1-9][0-9]*+)(?:\.[0-9]++)?(?:[eE][-+]?[0-9]++)?|-?Infinity|NaN")
_LITERAL = re.compile(r"true|false|null")
_DIGITS = re.compile(r"[0-9]")
_SURROGATE = re.compile("[\ud800-\udfff]")
_MEDIA_DATA_URL = re.compile(r"data:(?:image/(?!svg)|audio/|video/)[A-Za-z0-9.+-]{1,64};base64,")
_FILE_DATA_URL = re.compile(r"data:(?!text/|image/svg)[A-Za-z0-9.+-]{1,64}/[A-Za-z0-9.+-]{1,64};base64,")
_LINE_BREAKS = re.compile(r"[\r\n]+")
_MEDIA_MAGIC = (b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"GIF87a", b"GIF89a", b"BM", b"II*\x00", b"MM\x00*", b"RIFF",
                b"ID3", b"fLaC", b"OggS", b"\x1aE\xdf\xa3", b"\x00\x00\x01\x00")
"""How image, audio and video files begin (PNG, JPEG, GIF, BMP, TIFF, WAV/WebP/AVI, MP3, FLAC, Ogg, WebM, ICO;
MP4, HEIC, AVIF and M4A by `ftyp` at byte 4, MPEG audio by its frame sync)."""
_DOCUMENT_MAGIC = (b"%PDF-", b"PK\x03\x04", b"\xd0\xcf\x11\xe0")
"""PDF, Office Open XML (zip) and legacy Office files: a backend reads their text, the sidecar cannot."""


def is_media(key: str, text: str, parent: str | None, kind: str | None) -> bool:
    """Whether a string is base64 media a backend decodes, not text it reads: only where an API puts media
    (an image URL, input audio, a base64 ``source``, a file's data), and only valid base64 there that decodes
    to a file of the kind that place takes (an image, audio, a document for a source or a file). Anywhere
    else a long base64-looking string is text: words joined by ``+``, ``/`` or line breaks are base64
    characters too, and a model reads them."""
    if (key == "url" and parent in MEDIA_URL_PARENTS) or (key == "image_url" and kind == "input_image"):
        return _MEDIA_DATA_URL.match(text) is not None and _decodes_to(text, text.index(",") + 1, documents=False)
    if key == "data" and parent in ("input_audio", "inline_data", "inlineData"):
        return _decodes_to(text, 0, documents=parent != "input_audio")
    if key == "data" and parent == "source" and kind == "base64":
        return _decodes_to(text, 0, documents=True)
    if key == "file_data" and (parent == "file" or kind == "input_file"):
        url = _FILE_DATA_URL.match(text)
        return _decodes_to(text, url.end() if url else 0, documents=True)
    return False


def _decodes_to(text: str, start: int, documents: bool) -> bool:
    """`text[start:]` is standard base64 (padded; MIME line breaks allowed) of a media file, or of a document
    when `documents`."""
    payload = text[start:] if start else text
    if "\n" in payload or "\r" in payload:
        payload = _LINE_BREAKS.sub("", payload)
    try:
        head = binascii.a2b_base64(payload, strict_mode=True)[:12]
    except (binascii.Error, ValueError):
        return False
    if head.startswith(_MEDIA_MAGIC) or head[4:8] == b"ftyp" or (len(head) > 1 and head[0] == 0xFF and head[1] & 0xE0 == 0xE0):
        return True
    return documents and head.startswith(_DOCUMENT_MAGIC)


MEDIA_URL_PARENTS = frozenset({"image_url", "audio_url", "video_url"})
"""Objects whose ``url`` may be a media data URL (OpenAI's images; vLLM's audio and video)."""
MEDIA_ARRAY_KEYS = frozenset({"images"})
"""Arrays of bare base64 images (Ollama's messages)."""
MEDIA_KEYS = frozenset({"url", "image_url", "data", "file_data"})
"""Keys under which an API carries base64 media (`is_media`); decided once their object is read whole."""
_IDENTIFIER = re.compile(r"[A-Za-z_$][A-Za-z0-9_.$-]{0,63}")
"""Object keys of this shape are field names."""
_MODEL_CHARS = re.compile(r"[\x20-\x7e]{1,256}\Z")


@dataclass(frozen=True, slots=True)
class TextField:
    """One scanned token: ``text`` is its decoded value (spans index into it); ``span`` is where the token,
    quotes included, sits in its document's source (`ParsedRequest.docs`)."""

    index: int
    doc: int
    text: str
    span: tuple[int, int]
    number: bool = False
    """A JSON number token (its digits are the text); masked, it becomes a string."""
    key: str | None = None
    """The key it sits under (for an array item, the array's key; for a key itself, None): context for the
    recognizers (``"ssn": 536222026``)."""


@dataclass(frozen=True, slots=True)
class Doc:
    """A JSON text the fields index into: the body (doc 0) or a string holding JSON inside another doc."""

    source: str
    parent: int | None = None
    span: tuple[int, int] | None = None
    """Where the string token holding this document sits in its parent's source."""


@dataclass(frozen=True, slots=True)
class ParsedRequest:
    kind: Kind
    body_text: BodyText
    document: Any
    """``json.loads`` of the body: what the category input is read from."""
    docs: tuple[Doc, ...]
    fields: tuple[TextField, ...]
    structural: tuple[str, ...]
    """The string values under structural keys (not masked: the recognizers check them, and a body with
    personal data there is refused)."""
    requested_model: str | None
    """The client's ``model`` when it is a string; None when missing or not a string."""
    model_span: tuple[int, int] | None
    object_start: int
    object_empty: bool

    @property
    def source(self) -> str:
        return self.docs[0].source

    def category_text(self, mode: CategoryInput = "latest_user") -> str:
        """What the subject classifier reads: the latest user turn's text (every user turn for
        ``all_user``), parts joined with newlines; for completions, the prompts."""
        return category_text(self.kind, self.document, mode)

    def texts(self) -> list[str]:
        return [f.text for f in self.fields]


def parse_body(body: bytes, kind: Kind) -> ParsedRequest:
    """Read a JSON request body; raises a `RequestError` subclass naming the problem (never the content)."""
    if not body.strip(b" \t\n\r\x00"):
        raise EmptyBody("request body is empty")
    decoded = decode_text(body)
    source = decoded.text
    try:
        document = json.loads(source)
    except json.JSONDecodeError as e:
        raise NotJson(f"request body is not valid JSON ({e.msg} at line {e.lineno}, column {e.colno})") from None
    except (ValueError, RecursionError) as e:
        raise NotJson(f"request body is not valid JSON ({type(e).__name__})") from None
    if not isinstance(document, dict):
        raise NotObject(f"request body is a JSON {_json_type(document)}, not an object")
    for key in TOKEN_ID_KEYS:
        if _holds_token_ids(document.get(key)):
            raise TokenIds(f"'{key}' holds token ids, which only the backend's tokenizer can read; send it as text")
    walk = _Walk()
    walk.doc(source)
    start = _WS.match(source).end()
    model = walk.top_model
    requested = document.get("model")
    if kind in ROUTED_KINDS:
        _check_model(requested)
        if len(walk.fields) == len(walk.dropped):
            raise NoText("request body has no text to read")
    return ParsedRequest(
        kind=kind,
        body_text=decoded,
        document=document,
        docs=tuple(walk.docs),
        fields=walk.kept_fields(),
        structural=tuple(walk.structural),
        requested_model=requested if isinstance(requested, str) else None,
        model_span=model,
        object_start=start,
        object_empty=not document,
    )


def rewrite(body: bytes, parsed: ParsedRequest, model: str | None, texts: dict[int, str]) -> bytes:
    """Splice a new ``model`` (when not None) and new field texts (by `TextField.index`) into the body,
    inner documents first; characters outside those tokens are copied unchanged, and the result is encoded
    as the body was. A missing ``model`` key is inserted first."""
    if model is None and not texts:
        return body
    edits: dict[int, list[tuple[int, int, str]]] = {}
    if model is not None:
        value = encode_string(model)
        if parsed.model_span is not None:
            edits.setdefault(0, []).append((*parsed.model_span, value))
        else:
            at = parsed.object_start + 1
            edits.setdefault(0, []).append((at, at, '"model":' + value + ("" if parsed.object_empty else ",")))
    for index, text in texts.items():
        field = parsed.fields[index]
        edits.setdefault(field.doc, []).append((*field.span, encode_string(text)))
    for at in range(len(parsed.docs) - 1, 0, -1):  # an inner document always comes after its parent
        if at in edits:
            doc = parsed.docs[at]
            edits.setdefault(doc.parent, []).append((*doc.span, encode_string(_splice(doc.source, edits[at]))))
    return parsed.body_text.encode(_splice(parsed.source, edits.get(0, [])))


def encode_string(text: str) -> str:
    """A JSON string token, non-ASCII kept as is; lone surrogates (legal as JSON escapes, not encodable as
    UTF-8) stay escapes."""
    token = json.dumps(text, ensure_ascii=False)
    return _SURROGATE.sub(lambda m: f"\\u{ord(m.group()):04x}", token)


def model_safe(text: str) -> str:
    """`text` with lone surrogates replaced one for one (U+FFFD): tokenizers refuse them, and offsets into
    the result are offsets into `text`."""
    return _SURROGATE.sub("\ufffd", text) if _SURROGATE.search(text) else text


def _splice(source: str, edits: list[tuple[int, int, str]]) -> str:
    edits.sort(key=lambda e: e[0])
    out, pos = [], 0
    for start, end, value in edits:
        out += [source[pos:start], value]
        pos = end
    out.append(source[pos:])
    return "".join(out)


TOKEN_ID_KEYS = ("prompt", "input", "input_ids", "prompt_token_ids")
"""Top-level keys where the completions and embeddings APIs (OpenAI's, vLLM's) and other servers (SGLang's
``/generate``) take token ids instead of text."""


def _holds_token_ids(value: object) -> bool:
    """A number in a list, or in a list of lists: a prompt as token ids, whatever strings sit beside it. A float
    counts (``2026.0`` passes a lax validator as the id 2026)."""
    return isinstance(value, list) and any(
        (isinstance(v, (int, float)) and not isinstance(v, bool)) or (isinstance(v, list) and _holds_token_ids(v))
        for v in value)


def _check_model(model: object) -> None:
    """The client's model name becomes a header, a log field and a metric label: printable ASCII, capped."""
    if isinstance(model, str) and not _MODEL_CHARS.match(model):
        raise InvalidModel(f"'model' must be 1 to {MAX_MODEL_CHARS} printable ASCII characters "
                           f"(got {min(len(model), 10**6)} characters)")


class _Walk:
    """One pass over the tokens of a JSON text (already validated by ``json.loads``), collecting fields."""

    def __init__(self) -> None:
        self.docs: list[Doc] = []
        self.fields: list[TextField] = []
        self.structural: list[str] = []
        self.dropped: set[int] = set()
        """Fields found to be structural once their object was read (tool names); left out at the end."""
        self.top_model: tuple[int, int] | None = None

    def doc(self, source: str, parent: int | None = None, span: tuple[int, int] | None = None) -> None:
        self.docs.append(Doc(source, parent, span))
        doc = len(self.docs) - 1
        self._value(source, _WS.match(source).end(), doc, None, 0)

    def kept_fields(self) -> tuple[TextField, ...]:
        """The fields, less the dropped ones, numbered anew."""
        if not self.dropped:
            return tuple(self.fields)
        kept = [f for i, f in enumerate(self.fields) if i not in self.dropped]
        return tuple(replace(f, index=i) for i, f in enumerate(kept))

    def _add(self, doc: int, text: str, span: tuple[int, int], number: bool = False, key: str | None = None) -> None:
        self.fields.append(TextField(len(self.fields), doc, text, span, number, key))

    def _value(self, s: str, pos: int, doc: int, key: str | None, depth: int) -> int:
        """Walk the value at `pos` (under `key`); returns where it ends."""
        c = s[pos]
        if c == "{":
            return self._object(s, pos, doc, key, depth + 1)
        if c == "[":
            return self._array(s, pos, doc, key, depth + 1)
        if c == '"':
            text, end = scanstring(s, pos + 1)
            self._string(text, (pos, end), doc, key)
            return end
        m = _NUMBER.match(s, pos)
        if m is not None:
            named = key is not None and _NUMBER_KEY.search(key) is not None
            shortest = NAMED_NUMBER_DIGITS if named else LONG_NUMBER_DIGITS
            digits = len(_DIGITS.findall(m.group())) if m.end() - pos >= shortest else 0
            if digits >= shortest:  # whatever its key: "id": 4111111111111111 is still a card
                self._add(doc, m.group(), (pos, m.end()), number=True, key=key)
            return m.end()
        return _LITERAL.match(s, pos).end()

    def _object(self, s: str, pos: int, doc: int, parent: str | None, depth: int) -> int:
        """An object under key `parent`; a tool's or function's ``name`` in it is structural (an identifier
        the backend resolves: masking it would break the call), but never a message's (one with a ``role``:
        its ``name`` is a participant's, whatever ``type`` says)."""
        if depth > MAX_DEPTH:
            raise TooDeep(f"request body nests JSON deeper than {MAX_DEPTH} levels")
        pos = _WS.match(s, pos + 1).end()
        if s[pos] == "}":
            return pos + 1
        seen: set[str] = set()
        name_field = kind = media = None
        while True:
            key, key_end = scanstring(s, pos + 1)
            if key in seen:
                raise DuplicateKey("request body repeats a key in one object; send each key once")
            seen.add(key)
            if key and key not in KNOWN_KEYS:
                if _IDENTIFIER.fullmatch(key):  # a field name ("customer_id"): renaming it would break the JSON's
                    self.structural.append(key)  # meaning, so the recognizers check it and a hit refuses
                else:
                    self._add(doc, key, (pos, key_end))
            pos = _COLON.match(s, key_end).end()
            before = len(self.fields)
            if key == "model" and doc == 0 and depth == 1:
                self.top_model = (pos, self._value(s, pos, doc, key, depth))
                end = self.top_model[1]
            else:
                end = self._value(s, pos, doc, key, depth)
            if key == "name" and len(self.fields) == before + 1:
                name_field = before
            elif key in MEDIA_KEYS and doc == 0 and len(self.fields) == before + 1:
                media = (before, key)
            elif key == "type" and s[pos] == '"':
                kind = s[pos + 1 : end - 1]
            after = _NEXT.match(s, end)
            if after.group(1) == "}":
                if name_field is not None and "role" not in seen and (parent in TOOL_PARENTS or kind in TOOL_TYPES):
                    self.dropped.add(name_field)
                    self.structural.append(self.fields[name_field].text)
                if media is not None and is_media(media[1], self.fields[media[0]].text, parent, kind):
                    self.dropped.add(media[0])  # media are decoded, not read: nothing for the models
                return after.start(1) + 1
            pos = after.end()

    def _array(self, s: str, pos: int, doc: int, key: str | None, depth: int) -> int:
        if depth > MAX_DEPTH:
            raise TooDeep(f"request body nests JSON deeper than {MAX_DEPTH} levels")
        pos = _WS.match(s, pos + 1).end()
        if s[pos] == "]":
            return pos + 1
        images = key in MEDIA_ARRAY_KEYS and doc == 0
        while True:
            before = len(self.fields)
            end = self._value(s, pos, doc, key, depth)
            if images and len(self.fields) == before + 1 and s[pos] == '"' and \
                    _decodes_to(self.fields[before].text, 0, documents=False):
                self.dropped.add(before)  # an image the backend decodes
            after = _NEXT.match(s, end)
            if after.group(1) == "]":
                return after.start(1) + 1
            pos = after.end()

    def _string(self, text: str, span: tuple[int, int], doc: int, key: str | None) -> None:
        if not text:
            return
        if key in STRUCTURAL_KEYS and doc == 0:  # inside a tool's JSON every value is data the model reads
            self.structural.append(text)
            return
        if text.lstrip()[:1] in ("{", "[") and self._inner(text, span, doc):
            return
        self._add(doc, text, span, key=key)

    def _inner(self, text: str, span: tuple[int, int], doc: int) -> bool:
        """Walk a string that holds a JSON object or array (tool-call arguments) as a document of its own;
        False when it is not JSON, or nested too deep, and so is scanned as plain text."""
        depth, at = 0, doc
        while at is not None:
            depth, at = depth + 1, self.docs[at].parent
        if depth > MAX_INNER_DEPTH:
            return False
        try:
            value = json.loads(text)
        except (ValueError, RecursionError):
            return False
        if not isinstance(value, (dict, list)):
            return False
        self.doc(text, doc, span)
        return True


# --- the subject classifier's input, per API ---------------------------------------------------------------

def category_text(kind: Kind, document: dict, mode: CategoryInput = "latest_user") -> str:
    if kind == Kind.COMPLETIONS:
        return "\n".join(_strings(document.get("prompt")))
    if kind == Kind.RESPONSES:
        items = document.get("input")
        if isinstance(items, str):
            return items
        turns = [_part_texts(i.get("content")) for i in _user_items(items)]
    elif kind in (Kind.CHAT, Kind.MESSAGES):
        turns = [_part_texts(m.get("content")) for m in _user_items(document.get("messages"))]
    else:
        return ""
    turns = [t for t in turns if t]
    if mode == "latest_user":
        turns = turns[-1:]
    return "\n".join(text for turn in turns for text in turn)


def _user_items(items: object) -> list[dict]:
    """Messages or input items whose role is user (compared case-insensitively, as backends do)."""
    if not isinstance(items, list):
        return []
    return [i for i in items if isinstance(i, dict) and isinstance(i.get("role"), str)
            and i["role"].strip().casefold() == "user"]


def _part_texts(content: object) -> list[str]:
    """A content string, or the texts of its text parts (``text``, ``input_text``)."""
    if isinstance(content, str):
        return [content] if content else []
    if not isinstance(content, list):
        return []
    return [p["text"] for p in content if isinstance(p, dict) and p.get("type") in TEXT_PART_TYPES
            and isinstance(p.get("text"), str) and p["text"]]


def _strings(value: object) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, list):
        return [v for v in value if isinstance(v, str)]
    return []


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
