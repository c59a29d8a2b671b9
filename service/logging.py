"""Structured JSON logs carrying the request id; never file names, DICOM tags or pixel data.

The request id lives in a context variable set by the request middleware, so every record logged
while a request is handled (including in worker threads started with ``contextvars``) carries it.
"""

from __future__ import annotations

import contextvars
import datetime as dt
import json
import logging
import sys
from typing import Any

_request_id: contextvars.ContextVar[str | None] = contextvars.ContextVar("fundus_request_id", default=None)

# LogRecord attributes that are plumbing, not payload.
_STANDARD_ATTRS = set(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {"message", "asctime"}


def current_request_id() -> str | None:
    return _request_id.get()


def set_request_id(request_id: str | None) -> contextvars.Token[str | None]:
    return _request_id.set(request_id)


def reset_request_id(token: contextvars.Token[str | None]) -> None:
    _request_id.reset(token)


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, request id and any ``extra`` fields."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": dt.datetime.fromtimestamp(record.created, dt.UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        request_id = getattr(record, "request_id", None) or current_request_id()
        if request_id:
            entry["request_id"] = request_id
        for key, value in record.__dict__.items():
            if key not in _STANDARD_ATTRS and key not in entry:
                entry[key] = value
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def configure_logging(level: str = "INFO") -> None:
    """Send the ``fundus`` loggers (and uvicorn's) to stderr as JSON; safe to call more than once."""
    handler_name = "fundus-json"
    for name in ("fundus", "uvicorn", "uvicorn.error"):
        logger = logging.getLogger(name)
        logger.setLevel(level)
        if not any(getattr(h, "name", None) == handler_name for h in logger.handlers):
            handler = logging.StreamHandler(sys.stderr)
            handler.set_name(handler_name)
            handler.setFormatter(JsonFormatter())
            logger.handlers = [h for h in logger.handlers if not isinstance(h, logging.StreamHandler)]
            logger.addHandler(handler)
        logger.propagate = name == "fundus"
