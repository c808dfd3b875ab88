"""structlog setup. Events carry ids, lengths, counts, types and timings; never request text or PII values.

Two defences: callers log fields, not content, and the ``drop_sensitive`` processor removes any field
whose name suggests content (``text``, ``body``, ...) at any depth before rendering. Exceptions are logged
as their type and stack frames, never their message (it may quote the input).
"""

from __future__ import annotations

import logging
import sys
import traceback
from typing import IO, Any

import structlog

from sidecar.config import LoggingConfig

SENSITIVE_KEYS = frozenset({"text", "texts", "body", "value", "values", "content", "prompt", "messages",
                            "masked_text", "exc_info", "exception", "stack"})
DROPPED = "[dropped]"

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}


def _scrub(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: (DROPPED if k in SENSITIVE_KEYS else _scrub(v)) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(_scrub(v) for v in value)
    return value


def drop_sensitive(_logger: Any, _method: str, event_dict: dict) -> dict:
    """structlog processor: fields named like content are replaced, at any depth, before rendering."""
    for key in list(event_dict):
        if key in SENSITIVE_KEYS:
            event_dict[key] = DROPPED
        elif key != "event":
            event_dict[key] = _scrub(event_dict[key])
    return event_dict


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
    renderer = (structlog.processors.JSONRenderer() if config.format == "json"
                else structlog.dev.ConsoleRenderer(colors=False))
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
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
