"""Turn request bytes into the text a backend would read, or refuse them.

An attacker controls every byte of a request. A body the sidecar cannot read must not reach the backend
unread, so this module undoes ``Content-Encoding`` (gzip and deflate, bounded against decompression bombs)
and decodes JSON text in any encoding RFC 8259/RFC 4627 allow (UTF-8 with or without a byte-order mark,
UTF-16 and UTF-32 in either byte order). Anything else is refused with an error naming the encoding, a
size or a byte offset, never the content. `BodyText.encode` writes a masked text back the way it came.
"""

from __future__ import annotations

import codecs
import sys
import zlib
from dataclasses import dataclass, field

from sidecar.errors import BodyTooLarge, NotUtf8, UnsupportedEncoding

MAX_LAYERS = 4
"""The most content codings undone on one body; more is refused."""

_GZIP = ("gzip", "x-gzip")
_SUPPORTED = frozenset({"identity", "deflate", *_GZIP})
_GZIP_WBITS = 16 + zlib.MAX_WBITS
_FIRST_FEED = 64
"""Input is fed to zlib in slices that start this small and double, so a body of many tiny gzip members
costs time linear in its size (zlib copies whatever input is left over after each member)."""

_BOMS = (
    (codecs.BOM_UTF8, "utf-8"),
    (codecs.BOM_UTF32_LE, "utf-32-le"),  # before UTF-16 LE: FF FE 00 00 starts with FF FE
    (codecs.BOM_UTF32_BE, "utf-32-be"),
    (codecs.BOM_UTF16_LE, "utf-16-le"),
    (codecs.BOM_UTF16_BE, "utf-16-be"),
)


def decompress(body: bytes, content_encoding: str | None, limit: int) -> bytes:
    """Undo the ``Content-Encoding`` header's codings, last listed first (RFC 9110 §8.4).

    Returns ``body`` itself when there is nothing to undo (no header, only ``identity``, or an empty body).
    Raises `UnsupportedEncoding` for a coding it cannot undo, more than `MAX_LAYERS` codings, or data that
    is not valid for its coding; `BodyTooLarge` when a layer would produce more than ``limit`` bytes.
    """
    if limit < 0:
        raise ValueError("limit must not be negative")
    codings = parse_content_encoding(content_encoding)
    if not codings or not body:
        return body
    for coding in reversed(codings):
        body = _undo(body, coding, limit)
    return body


def parse_content_encoding(value: str | None) -> list[str]:
    """The codings a ``Content-Encoding`` value lists, lower-cased, in order, without ``identity``.

    Raises `UnsupportedEncoding` naming the first coding that is not supported, or when more than
    `MAX_LAYERS` codings are listed.
    """
    if not value:
        return []
    tokens = [t.strip(" \t").lower() for t in value.split(",")]
    for token in tokens:
        if token and token not in _SUPPORTED:
            raise UnsupportedEncoding(f"unsupported Content-Encoding: {_printable(token)}")
    codings = [t for t in tokens if t and t != "identity"]
    if len(codings) > MAX_LAYERS:
        raise UnsupportedEncoding(f"too many Content-Encoding layers ({len(codings)}, at most {MAX_LAYERS})")
    return codings


def _printable(token: str) -> str:
    """A client-supplied token made safe for an error message and an HTTP answer."""
    shown = "".join(c for c in token if " " <= c <= "~")[:32]
    return shown or "(unprintable)"


def _undo(data: bytes, coding: str, limit: int) -> bytes:
    """Undo one coding of a non-empty body."""
    if coding in _GZIP:
        return _gunzip(data, coding, limit)
    try:
        return _inflate(memoryview(data), zlib.MAX_WBITS, limit)[0]
    except _Invalid:
        pass  # some clients send raw deflate without the zlib wrapper
    try:
        return _inflate(memoryview(data), -zlib.MAX_WBITS, limit)[0]
    except _Invalid:
        raise UnsupportedEncoding(f"request body is not valid {coding} data") from None


def _gunzip(data: bytes, coding: str, limit: int) -> bytes:
    """Every member of a gzip body, concatenated; anything after the last member is refused."""
    view = memoryview(data)
    parts: list[bytes] = []
    produced = 0
    while view:
        try:
            out, used = _inflate(view, _GZIP_WBITS, limit - produced)
        except _Invalid:
            raise UnsupportedEncoding(f"request body is not valid {coding} data") from None
        except BodyTooLarge:
            raise BodyTooLarge(f"request body decompresses to more than {limit} bytes") from None
        parts.append(out)
        produced += len(out)
        view = view[used:]
    return parts[0] if len(parts) == 1 else b"".join(parts)


class _Invalid(Exception):
    """The data is not a complete, valid stream for the wrapper tried."""


def _inflate(view: memoryview, wbits: int, limit: int) -> tuple[bytes, int]:
    """Decompress one zlib/gzip/raw stream from the start of ``view``, never producing more than
    ``limit + 1`` bytes. Returns the output and how many input bytes the stream used. Data after the
    stream is left for the caller (gzip) or refused (zlib and raw deflate)."""
    d = zlib.decompressobj(wbits)
    parts: list[bytes] = []
    produced = pos = 0
    feed = _FIRST_FEED
    pending = b""
    while not d.eof:
        if not pending:
            if pos >= len(view):
                raise _Invalid  # truncated
            pending, pos, feed = view[pos : pos + feed], pos + feed, feed * 2
        try:
            out = d.decompress(pending, min(limit + 1 - produced, sys.maxsize))
        except zlib.error:
            raise _Invalid from None
        progressed = out or len(d.unconsumed_tail) < len(pending)
        pending = d.unconsumed_tail
        parts.append(out)
        produced += len(out)
        if produced > limit:
            raise BodyTooLarge(f"request body decompresses to more than {limit} bytes")
        if not progressed:
            raise _Invalid  # zlib took nothing and gave nothing: it cannot go on
    used = min(pos, len(view)) - len(d.unused_data)
    if wbits != _GZIP_WBITS and used != len(view):
        raise _Invalid  # trailing data after a zlib or raw deflate stream
    return b"".join(parts), used


@dataclass(frozen=True, slots=True)
class BodyText:
    """A body decoded as JSON text, with what is needed to encode a changed text the same way."""

    text: str = field(repr=False)
    """The decoded text, without any byte-order mark."""
    encoding: str
    """One of ``utf-8``, ``utf-16-le``, ``utf-16-be``, ``utf-32-le``, ``utf-32-be``."""
    bom: bytes = b""
    """The byte-order mark the body started with, or ``b""``."""

    def encode(self, text: str) -> bytes:
        """``text`` in this body's encoding, behind the same byte-order mark. Lone surrogates (which JSON
        escapes allow) are written with ``surrogatepass`` rather than raising."""
        encoded = text.encode(self.encoding, "surrogatepass")
        return self.bom + encoded if self.bom else encoded


def decode_text(body: bytes) -> BodyText:
    """Decode a JSON body in the encoding RFC 8259 §8.1 / RFC 4627 §3 detection gives.

    A byte-order mark decides first; otherwise the zero bytes among the first four do, as in
    ``json.detect_encoding``; otherwise UTF-8. Raises `NotUtf8` naming the encoding and the byte offset
    (into ``body``) of the first invalid data.
    """
    bom, encoding = detect_encoding(body)
    try:
        if not bom and encoding == "utf-8":
            return BodyText(body.decode("utf-8"), "utf-8")
        return BodyText(str(memoryview(body)[len(bom) :], encoding), encoding, bom)
    except UnicodeDecodeError as e:
        name = encoding.upper()
        raise NotUtf8(f"request body is not valid {name} (byte {e.start + len(bom)})") from None


def detect_encoding(body: bytes) -> tuple[bytes, str]:
    """The byte-order mark (or ``b""``) and the codec name of a JSON body."""
    for bom, encoding in _BOMS:
        if body.startswith(bom):
            return bom, encoding
    head = body[:4]
    if len(head) == 4:
        if not head[0]:
            return b"", "utf-16-be" if head[1] else "utf-32-be"
        if not head[1]:
            return b"", "utf-16-le" if head[2] or head[3] else "utf-32-le"
    elif len(head) == 2:
        if not head[0]:
            return b"", "utf-16-be"
        if not head[1]:
            return b"", "utf-16-le"
    return b"", "utf-8"
