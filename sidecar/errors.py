"""The sidecar's one exception tree. Third-party errors are mapped into it at one boundary each.

- ``ConfigError``: bad configuration at start-up or reload; the message names the key.
- ``RequestError``: the client's body cannot be read (user-facing; 400 when config says reject).
- ``InferenceError``: the models could not answer (``Overloaded`` when admission refuses work,
  ``InferenceTimeout`` when the deadline passes, ``BodyTooLarge`` when the body is over
  ``failure.max_inspect_bytes`` and the models are not tried); the failure policy decides the answer.
- ``ModelLoadError``: a model directory could not be loaded.
"""

from __future__ import annotations


class SidecarError(Exception):
    """Base of every error the sidecar raises on purpose."""


class ConfigError(SidecarError):
    """Invalid configuration; ``key`` is the dotted path of the offending setting."""

    def __init__(self, key: str, problem: str):
        self.key = key
        self.problem = problem
        super().__init__(f"{key}: {problem}" if key else problem)


class RequestError(SidecarError):
    """A request body the sidecar cannot analyse. ``reason`` is a stable code for headers and metrics."""

    reason = "bad_request"

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


class EmptyBody(RequestError):
    reason = "empty_body"


class NotUtf8(RequestError):
    reason = "not_utf8"


class NotJson(RequestError):
    reason = "not_json"


class NotObject(RequestError):
    reason = "not_object"


class NoText(RequestError):
    reason = "no_text"


class TokenIds(RequestError):
    """A prompt or input given as token ids (completions, embeddings): text the sidecar cannot read, since only
    the backend's own tokenizer turns them back into words."""

    reason = "token_ids"


class DuplicateKey(RequestError):
    """A JSON object names one key twice: parsers disagree on which copy counts, so the body is refused."""

    reason = "duplicate_key"


class TooDeep(RequestError):
    """JSON nested deeper than the sidecar walks."""

    reason = "too_deep"


class InvalidModel(RequestError):
    """The body's ``model`` is too long or has characters a header cannot carry."""

    reason = "invalid_model"


class PiiInField(RequestError):
    """Personal data where it cannot be masked: a structural value (``model``, ids, ``role``) or the URL."""

    reason = "pii_in_field"


class UnsupportedEncoding(RequestError):
    """A ``Content-Encoding`` the sidecar cannot undo (answered 415), or a charset it cannot read."""

    reason = "unsupported_encoding"


class NotBuffered(RequestError):
    """Envoy sent the body in chunks (STREAMED, full duplex, or past its buffer in BUFFERED_PARTIAL): the
    sidecar never saw it whole."""

    reason = "not_buffered"


class InferenceError(SidecarError):
    """The models could not produce an answer for this request."""

    reason = "inference_error"


class Overloaded(InferenceError):
    """Admission refused: the queue is full. An answer, not a wait."""

    reason = "overloaded"


class InferenceTimeout(InferenceError):
    reason = "timeout"


class BodyTooLarge(InferenceError):
    """The body is over ``failure.max_inspect_bytes``: the models are not tried on it (fail_closed: 413)."""

    reason = "too_large"


class InferenceCancelled(InferenceError):
    """Work stopped because its caller has gone (the deadline passed); nobody waits for this error."""

    reason = "cancelled"


class ModelLoadError(SidecarError):
    """A model directory could not be turned into a working backend."""
