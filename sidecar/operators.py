"""Anonymizer operators, after Presidio's: one class per operator, holding its own validated parameters and
the code that applies them, so a parameter another operator owns is an error (a ``hash`` operator with a
``masking_char`` no longer passes silently) and a new operator is one class here plus its name in
`OperatorConfig`.
"""

from __future__ import annotations

import hashlib
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, model_validator


class _Operator(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    def apply(self, value: str, entity_type: str) -> str:
        """The text that takes `value`'s place."""
        raise NotImplementedError


class Replace(_Operator):
    """The value becomes `new_value` (default ``[ENTITY_TYPE]``)."""

    type: Literal["replace"] = "replace"
    new_value: str | None = None

    def apply(self, value: str, entity_type: str) -> str:
        return self.new_value if self.new_value is not None else f"[{entity_type}]"


class Redact(_Operator):
    """The value is removed."""

    type: Literal["redact"] = "redact"

    def apply(self, value: str, entity_type: str) -> str:
        return ""


class Mask(_Operator):
    """Characters of the value become `masking_char`: all, `chars_to_mask` of them, or all but
    `chars_to_keep` (at the end; at the start with `from_end`). A value no longer than twice `chars_to_keep`
    is masked whole: kept, its last four would be half of it or all (a group of a card tagged alone)."""

    type: Literal["mask"] = "mask"
    masking_char: Annotated[str, Field(min_length=1, max_length=1)] = "*"
    chars_to_mask: Annotated[int, Field(ge=0)] | None = None
    chars_to_keep: Annotated[int, Field(ge=0)] | None = None
    """``4`` shows the last four digits of a card written with or without spaces, of any length."""
    from_end: bool = False

    @model_validator(mode="after")
    def _mask_or_keep(self) -> Mask:
        if self.chars_to_mask is not None and self.chars_to_keep is not None:
            raise ValueError("chars_to_mask and chars_to_keep cannot both be set")
        return self

    def apply(self, value: str, entity_type: str) -> str:
        if self.chars_to_keep is not None:
            n = len(value) if len(value) <= 2 * self.chars_to_keep else len(value) - self.chars_to_keep
        else:
            n = len(value) if self.chars_to_mask is None else min(self.chars_to_mask, len(value))
        if self.from_end:
            return value[: len(value) - n] + self.masking_char * n
        return self.masking_char * n + value[n:]


class Hash(_Operator):
    """The value becomes the hex digest of `salt` + value."""

    type: Literal["hash"] = "hash"
    hash_type: Literal["sha256", "sha512", "md5"] = "sha256"
    salt: str = ""

    def apply(self, value: str, entity_type: str) -> str:
        data = (self.salt + value).encode("utf-8", "surrogatepass")
        return hashlib.new(self.hash_type, data, usedforsecurity=False).hexdigest()


OPERATORS: dict[str, type[_Operator]] = {"replace": Replace, "redact": Redact, "mask": Mask, "hash": Hash}


def _operator_type(value: Any) -> str:
    """The discriminator: ``type``, ``replace`` when a mapping leaves it out (as it always could)."""
    if isinstance(value, dict):
        return value.get("type", "replace")
    return getattr(value, "type", "replace")


OperatorConfig = Annotated[
    Annotated[Replace, Tag("replace")] | Annotated[Redact, Tag("redact")] | Annotated[Mask, Tag("mask")]
    | Annotated[Hash, Tag("hash")],
    Discriminator(_operator_type),
]
"""How one entity is masked: one of the operator classes, chosen by ``type``."""
