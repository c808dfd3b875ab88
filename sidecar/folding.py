"""One view of a text for the pattern and checksum recognizers: look-alike characters as their ASCII forms.

A backend model reads "415—555—0132" (em dashes), "４１１１ １１１１ …" (fullwidth digits) or "078 05 1120" with
no-break spaces as the numbers they are; patterns written for ASCII do not. Each character maps to exactly
one, so an offset into the folded text is the same offset into the original, and spans need no mapping back.
"""

from __future__ import annotations

import re
import sys
import unicodedata

_DASHES = ("\u2010\u2011\u2012\u2013\u2014\u2015\u2212\ufe58\ufe63\uff0d\u2022\u2219\u00b7\u30fb\u2027\u22c5"
           "\u02d7\u2796\u23af\u2500\u2501\u2574\u2576\u2e3a\u2e3b\u30fc\u301c\uff5e")
"""Dashes, minus signs and the bullets and middle dots some write between the groups of a number."""
_SPACES = "\u00a0\u2000\u2001\u2002\u2003\u2004\u2005\u2006\u2007\u2008\u2009\u200a\u202f\u205f\u3000"
_OTHERS = {"\uff20": "@", "\ufe6b": "@", "\uff0e": ".", "\u3002": ".", "\uff61": ".", "\uff0c": ",", "\u3001": ",",
           "\uff0f": "/", "\uff0b": "+", "\uff08": "(", "\uff09": ")"}


def _table() -> dict[int, str]:
    table = {ord(c): "-" for c in _DASHES} | {ord(c): " " for c in _SPACES} | {ord(k): v for k, v in _OTHERS.items()}
    for code in range(128, sys.maxunicode + 1):  # every digit of every script (and ⁴ ₄ ④), as its ASCII digit
        char = chr(code)
        if unicodedata.category(char) == "Nd":
            table[code] = str(unicodedata.decimal(char))
        elif code < 0x10000 and unicodedata.digit(char, None) is not None:  # BMP: a fast class to search
            table[code] = str(unicodedata.digit(char))
            _OTHER_DIGITS.append(char)
    return table


_OTHER_DIGITS: list[str] = []
"""Digits that are not decimal digits (superscripts, subscripts, circled): `_NON_ASCII_DIGIT` misses them."""


_FOLD = _table()
_NON_ASCII_DIGIT = re.compile(r"[^\D0-9]")
_LOOK_ALIKE = re.compile("[" + "".join(re.escape(c) for c in _DASHES + _SPACES + "".join(_OTHERS) + "".join(_OTHER_DIGITS)) + "]")
"""Searched before translating: two searches over a megabyte of other text take about 10 ms, a translation 50."""


def fold(text: str) -> str:
    """`text` with look-alike digits, dashes, spaces and ``@`` as ASCII, character for character."""
    if text.isascii() or not (_LOOK_ALIKE.search(text) or _NON_ASCII_DIGIT.search(text)):
        return text
    return text.translate(_FOLD)
