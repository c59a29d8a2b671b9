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


#: Loggers whose messages are this service's own (written without values from uploads).
OWN_LOGGERS = ("fundus", "uvicorn", "uvicorn.error")


class LibraryRecordFilter(logging.Filter):
    """Rewrites records of third-party libraries (pydicom, Pillow, python-multipart, warnings, ...).

    Their messages can quote the upload (a DICOM Specific Character Set, a multipart header, a file
    name), which may be patient data, so only the source and the kind of event are kept: the
    message becomes ``library warning`` with ``source`` (the logger) and, for Python warnings, the
    warning ``category``. The request id is added by the formatter as for every record.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name.startswith(OWN_LOGGERS):
            return False  # written by their own handlers (they propagate only for log capture)
        category = None
        if record.name == "py.warnings":
            text = str(record.msg)
            # "path:line: CategoryWarning: message" → keep the category only.
            parts = text.split(": ", 2)
            category = parts[1] if len(parts) > 2 else "Warning"
        record.msg = "library warning"
        record.args = None
        record.exc_info = None
        record.exc_text = None
        record.source = record.name  # type: ignore[attr-defined]
        if category:
            record.category = category  # type: ignore[attr-defined]
        return True


def configure_logging(level: str = "INFO") -> None:
    """Send every log line of the process to stderr as JSON; safe to call more than once.

    The ``fundus`` and uvicorn loggers log at ``level``; everything else (libraries, Python warnings,
    captured through :func:`logging.captureWarnings`) reaches the root logger and is written at
    WARNING and above, rewritten by :class:`LibraryRecordFilter` so no upload value leaks.
    """
    handler_name = "fundus-json"
    for name in OWN_LOGGERS:
        logger = logging.getLogger(name)
        logger.setLevel(level)
        if not any(getattr(h, "name", None) == handler_name for h in logger.handlers):
            handler = logging.StreamHandler(sys.stderr)
            handler.set_name(handler_name)
            handler.setFormatter(JsonFormatter())
            logger.handlers = [h for h in logger.handlers if not isinstance(h, logging.StreamHandler)]
            logger.addHandler(handler)
        logger.propagate = name == "fundus"
    root = logging.getLogger()
    if not any(getattr(h, "name", None) == handler_name for h in root.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.set_name(handler_name)
        handler.setFormatter(JsonFormatter())
        handler.addFilter(LibraryRecordFilter())
        handler.setLevel(logging.WARNING)
        root.handlers = [h for h in root.handlers if not isinstance(h, logging.StreamHandler)]
        root.addHandler(handler)
    if root.level > logging.WARNING or root.level == logging.NOTSET:
        root.setLevel(logging.WARNING)
    logging.captureWarnings(True)
