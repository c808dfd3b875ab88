"""structlog setup. Events carry ids, lengths, counts, types and timings; never request text or PII values.

Two defences: callers log fields, not content, and the ``drop_sensitive`` processor removes any field
whose name suggests content (``text``, ``body``, ...) at any depth before rendering. Exceptions are logged
as their type and stack frames, never their message (it may quote the input).
"""

from __future__ import annotations

import logging
import sys
import time
import traceback
from typing import IO, Any

import orjson
import structlog

from sidecar.config import LoggingConfig

SENSITIVE_KEYS = frozenset({"text", "texts", "body", "value", "values", "content", "prompt", "messages",
                            "masked_text", "exc_info", "exception", "stack"})
DROPPED = "[dropped]"

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}


_CONTAINERS = (dict, list, tuple)


def _scrub(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: (DROPPED if k in SENSITIVE_KEYS else _scrub(v) if isinstance(v, _CONTAINERS) else v)
                for k, v in value.items()}
    return type(value)(_scrub(v) if isinstance(v, _CONTAINERS) else v for v in value)


def drop_sensitive(_logger: Any, _method: str, event_dict: dict) -> dict:
    """structlog processor: fields named like content are replaced, at any depth, before rendering.
    Every request logs an event, so plain values (most fields) cost one type check and nothing more."""
    for key, value in event_dict.items():  # values are replaced in place: the dict's size never changes
        if key in SENSITIVE_KEYS:
            event_dict[key] = DROPPED
        elif isinstance(value, _CONTAINERS) and key != "event":
            event_dict[key] = _scrub(value)
    return event_dict


def _utc_stamp(_logger: Any, _method: str, event_dict: dict) -> dict:
    """``timestamp`` in ISO 8601 UTC with microseconds, as structlog's TimeStamper(fmt="iso", utc=True)
    writes it, for a quarter of its cost: the part up to the second is formatted once per second."""
    global _second
    now = time.time()
    second, prefix = _second  # one read: other threads may replace it meanwhile
    if int(now) != second:
        second = int(now)
        prefix = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        _second = (second, prefix)
    event_dict["timestamp"] = f"{prefix}.{int((now - second) * 1e6):06d}Z"
    return event_dict


_second: tuple[int, str] = (-1, "")


def _dumps(obj: Any, default: Any = None, **_: Any) -> str:
    """JSONRenderer's serializer: orjson, about 3x faster than json.dumps on a request event."""
    return orjson.dumps(obj, default=default, option=orjson.OPT_NON_STR_KEYS).decode()


def exception_fields(exc: BaseException) -> dict[str, Any]:
    """An exception as log fields: its type and where it was raised (file:line function), no message."""
    frames = traceback.extract_tb(exc.__traceback__)
    return {
        "error_type": f"{type(exc).__module__}.{type(exc).__qualname__}",
        "error_at": [f"{f.filename}:{f.lineno} {f.name}" for f in frames[-8:]],
    }


class _CurrentStderr:
    """Writes to whatever ``sys.stderr`` is at write time, so a stream swapped out and closed later
    (by a test harness or a daemoniser) is never written to after the fact."""

    def write(self, data: str) -> int:
        return sys.stderr.write(data)

    def flush(self) -> None:
        sys.stderr.flush()


def configure_logging(config: LoggingConfig, stream: IO[str] | None = None) -> None:
    """Configure structlog (JSON lines or console) at the configured level; safe to call again on reload."""
    renderer = (structlog.processors.JSONRenderer(serializer=_dumps) if config.format == "json"
                else structlog.dev.ConsoleRenderer(colors=False))
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            _utc_stamp,
            drop_sensitive,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS[config.level]),
        logger_factory=structlog.PrintLoggerFactory(file=stream if stream is not None else _CurrentStderr()),
        cache_logger_on_first_use=False,
    )
    logging.basicConfig(level=max(_LEVELS[config.level], logging.WARNING), stream=stream or sys.stderr)


def get_logger(name: str) -> Any:
    """A lazy logger: it follows the configuration in force when it logs, so reloads apply everywhere."""
    return structlog.get_logger(component=name)
