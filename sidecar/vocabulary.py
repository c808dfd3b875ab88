"""The closed sets of words the sidecar speaks: actions, route reasons, request kinds and ext_proc phases.

Each value goes on the wire or into the operator's tools as written here: the ``x-router-action`` and
``x-router-reason`` headers, the ``action`` metric label, log fields, the Classify API and the JSON of
``sidecar classify``, Envoy's ext_proc field names. They are `StrEnum`s, so a member *is* its string
(``Action.MASK == "mask"``, ``str(Action.MASK) == "mask"``, same hash): headers, labels and JSON stay
byte-identical, and plain strings from tests or configs compare equal. Changing a value changes a public
interface; tests/test_vocabulary.py pins every one.

Reason codes of refusals and failures (``not_json``, ``timeout``, ``stream_closed``, ...) are not here: most
belong to their exception class (`sidecar.errors`).
"""

from __future__ import annotations

from enum import StrEnum


class Action(StrEnum):
    """What became of a request: ``x-router-action``, the ``action`` metric label and log field, the Classify
    API's ``action``. A `Decision` is one of the first four; the rest are outcomes without a decision."""

    ALLOW = "allow"
    """Forwarded with its text unchanged: nothing kept by the policy, or an ``allow`` policy."""
    MASK = "mask"
    """Forwarded with the personal data the policy kept replaced by its operators' output."""
    PSEUDONYMIZE = "pseudonymize"
    """Forwarded with each value the policy kept replaced by a numbered placeholder; the answer gets the values
    back."""
    BLOCK = "block"
    """Refused with 403: the policy blocks an entity type found (or blocks all personal data)."""
    DEGRADED = "degraded"
    """The models could not answer (fail_open): default model, only the recognizers' findings masked."""
    SKIPPED = "skipped"
    """Forwarded unread and unrouted (``failure.bad_body: pass``, a streamed body, or no body came)."""
    REJECTED = "rejected"
    """Refused with an error answer (400, 413, 415, 503): unreadable, too large, unmaskable, or failed."""
    UNANSWERED = "unanswered"
    """The stream ended while the body was being decided: Envoy went on without the sidecar's answer."""


class RouteReason(StrEnum):
    """Why a request went to its backend: ``x-router-reason`` on a decision, the Classify API's
    ``route_reason``, the ``route_reason`` log field."""

    CATEGORY = "category"
    """The classifier's label, confident enough and in ``routing.categories``, picked the backend."""
    LOW_CONFIDENCE = "low_confidence"
    """The classifier's confidence was under ``routing.confidence_threshold``: the default model."""
    UNKNOWN_CATEGORY = "unknown_category"
    """The classifier's label is not in ``routing.categories``: the default model."""
    CLIENT_MODEL = "client_model"
    """The client named a model other than the virtual one: it is kept, no classification."""
    NO_CATEGORY_MODEL = "no_category_model"
    """No category model is loaded: the default model."""
    NO_USER_TEXT = "no_user_text"
    """The request has no text for the classifier (no user turn, no prompt): the default model."""
    DEGRADED = "degraded"
    """The models could not answer (fail_open): the default model, or the client's own choice."""
    UNROUTED = "unrouted"
    """A generic path: the body is scanned for personal data but not routed."""


class Kind(StrEnum):
    """The API a request path belongs to (``config.paths``): how its body is read and whether it is routed;
    the ``kind`` log field."""

    CHAT = "chat"
    """OpenAI chat completions (``messages``)."""
    COMPLETIONS = "completions"
    """OpenAI legacy completions (``prompt``)."""
    RESPONSES = "responses"
    """OpenAI Responses API (``input``, ``instructions``)."""
    MESSAGES = "messages"
    """Anthropic Messages API (``messages``, ``system``)."""
    GENERIC = "generic"
    """Any other path: a body is scanned for personal data (every string) but not routed."""


class Phase(StrEnum):
    """An ext_proc phase: the field of Envoy's ``ProcessingRequest``/``ProcessingResponse`` oneof that carries
    it, the `Processor` method that handles it, the ``phase`` log field of a processor error."""

    REQUEST_HEADERS = "request_headers"
    """The request's headers (``:path``, ``x-request-id``, ...)."""
    REQUEST_BODY = "request_body"
    """The request's body, whole when buffered; where decisions are made."""
    REQUEST_TRAILERS = "request_trailers"
    """The request's trailers."""
    RESPONSE_HEADERS = "response_headers"
    """The backend's response headers."""
    RESPONSE_BODY = "response_body"
    """The backend's response body (chunks)."""
    RESPONSE_TRAILERS = "response_trailers"
    """The backend's response trailers."""
