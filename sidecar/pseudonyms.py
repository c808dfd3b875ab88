"""Reversible pseudonymization: each distinct value in a request becomes a typed, numbered placeholder
(``<PERSON_1>``, ``<EMAIL_ADDRESS_2>``), and the backend's answer gets the values back.

Numbers follow first appearance across the whole request, so a conversation that re-sends its history gets
the same placeholder for the same value on every turn with no state kept between requests. A number whose
placeholder already occurs in the client's own text is skipped, so restoring never rewrites text the client
sent. The map lives in one ext_proc stream's memory only: never logged, never sent, gone with the stream.

The answer's side (JSON and streamed answers, as Envoy sends them) is `sidecar.answers`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Sequence
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

    def ranges(self, text: str) -> list[tuple[int, int]]:
        """Where issued placeholders stand in `text`: no personal data there, whatever a scan says."""
        if not self._by_placeholder or not text:
            return []
        return [m.span() for m in self._pattern().finditer(text)]

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
    restored inside, so a value with quotes in it keeps the arguments valid JSON. Without placeholders the
    document is returned as it is (every event of a scanned stream passes here)."""
    if not pseudonyms:
        return doc
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
            return pseudonyms.restore(text, quote=json_inner)
    return pseudonyms.restore(text)


def json_inner(value: str) -> str:
    """`value` as it is written inside a JSON string (quotes and controls escaped, no surrounding quotes)."""
    return json.dumps(value, ensure_ascii=False)[1:-1]


def restore_body(body: bytes, pseudonyms: Pseudonyms) -> bytes:
    """A whole JSON answer restored; a body that is not JSON is restored as text."""
    try:
        doc = json.loads(body)
        return json.dumps(restore_json(doc, pseudonyms), ensure_ascii=False, separators=(",", ":"),
                          allow_nan=False).encode("utf-8", "backslashreplace")
    except ValueError:
        # Not JSON, or numbers Python cannot write back (1e400 would become Infinity): restored as text,
        # each value escaped as a JSON string needs, so the JSON stays what it was around it.
        quote = json_inner if body.lstrip()[:1] in (b"{", b"[") else None
        return pseudonyms.restore(body.decode("utf-8", "replace"), quote=quote).encode("utf-8")
