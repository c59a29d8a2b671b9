"""Reading an image upload: a raw body with its Content-Type, or the ``file`` field of a multipart form.

The size limit is enforced while the body streams in: a declared ``Content-Length`` over the limit is
refused before anything is read, and a body that grows past it (chunked, or lying about its length)
is refused as soon as the limit is crossed, so an oversized upload never sits whole in memory. A body
must also arrive in time (:class:`BodyLimits`): a stalled or dripping client gets 408 and its slot
back, and a shutdown ends every read at once.
Multipart bodies are parsed incrementally and only the ``file`` part is kept.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from python_multipart import MultipartParser
from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import parse_options_header
from starlette.requests import ClientDisconnect, Request

from service.errors import ApiError

FILE_FIELD = "file"


@dataclass
class Upload:
    """The uploaded image bytes and the media type the client declared for them (None if absent)."""

    data: bytes
    declared_type: str | None


class _FilePart:
    """Collects the ``file`` field of a multipart body as the parser emits it."""

    def __init__(self) -> None:
        self.found = False
        self.content_type: str | None = None
        self.data = bytearray()
        self._in_file = False
        self._field = bytearray()
        self._value = bytearray()
        self._headers: dict[str, str] = {}

    def callbacks(self) -> dict[str, object]:
        return {
            "on_part_begin": self._part_begin,
            "on_header_field": self._header_field,
            "on_header_value": self._header_value,
            "on_header_end": self._header_end,
            "on_headers_finished": self._headers_finished,
            "on_part_data": self._part_data,
            "on_part_end": self._part_end,
        }

    def _part_begin(self) -> None:
        self._headers = {}
        self._in_file = False

    def _header_field(self, data: bytes, start: int, end: int) -> None:
        self._field += data[start:end]

    def _header_value(self, data: bytes, start: int, end: int) -> None:
        self._value += data[start:end]

    def _header_end(self) -> None:
        self._headers[self._field.decode("latin-1").lower()] = self._value.decode("latin-1")
        self._field.clear()
        self._value.clear()

    def _headers_finished(self) -> None:
        _, options = parse_options_header(self._headers.get("content-disposition", ""))
        name = options.get(b"name", b"").decode("latin-1")
        if name == FILE_FIELD and not self.found:
            self._in_file = True
            self.found = True
            self.content_type = self._headers.get("content-type") or None

    def _part_data(self, data: bytes, start: int, end: int) -> None:
        if self._in_file:
            self.data += data[start:end]

    def _part_end(self) -> None:
        self._in_file = False


def _too_large(limit: int) -> ApiError:
    return ApiError(413, "too_large", f"request body exceeds the upload limit of {limit} bytes")


@dataclass(frozen=True)
class BodyLimits:
    """How long a client may take to send its body.

    Attributes:
        total_s: the whole body must have arrived this long after the request did.
        idle_s: longest pause between two chunks.
        min_rate_bps: after ``grace_s``, the body must have come at least this fast on average
            (bytes per second; 0 = no minimum), so a client dripping a byte a second frees its slot
            long before the total deadline.
        grace_s: start-up time before the rate is checked.
        cancelled: returns True when the read must stop at once (the service is shutting down).
    """

    total_s: float = 30.0
    idle_s: float = 10.0
    min_rate_bps: float = 1024.0
    grace_s: float = 5.0
    cancelled: Callable[[], bool] = lambda: False


#: Longest single wait for the next chunk: a shutdown is noticed within this time.
POLL_S = 0.5


def _too_slow(message: str) -> ApiError:
    return ApiError(408, "request_timeout", message, headers={"Connection": "close"})


async def _chunks(request: Request, limits: BodyLimits) -> AsyncIterator[bytes]:
    """The body's chunks, enforcing :class:`BodyLimits`: 408 when too slow, 503 when shutting down."""
    stream = request.stream().__aiter__()
    started = time.monotonic()
    last = started
    received = 0
    # One pending read at a time, kept across waits: cancelling an async generator's read would end it.
    pending: asyncio.Future[bytes] | None = None
    try:
        while True:
            if pending is None:
                pending = asyncio.ensure_future(stream.__anext__())
            _check_limits(limits, started, last, received)
            now = time.monotonic()
            wait = min(POLL_S, limits.total_s - (now - started), limits.idle_s - (now - last))
            done, _ = await asyncio.wait({pending}, timeout=max(wait, 0.01))
            if not done:
                continue
            try:
                chunk = pending.result()
            except StopAsyncIteration:
                pending = None
                return
            pending = None
            if chunk:
                last = time.monotonic()
                received += len(chunk)
                yield chunk
    finally:
        if pending is not None and not pending.done():
            pending.cancel()


def _check_limits(limits: BodyLimits, started: float, last: float, received: int) -> None:
    """Raise 503 when shutting down, 408 when the body is late, stalled or too slow."""
    if limits.cancelled():
        raise ApiError(503, "shutting_down", "the service is shutting down", headers={"Retry-After": "5"})
    now = time.monotonic()
    if now - started > limits.total_s:
        raise _too_slow(f"the request body did not arrive within {limits.total_s:g} s")
    if now - last > limits.idle_s:
        raise _too_slow(f"no request body data for {limits.idle_s:g} s")
    elapsed = now - started
    if limits.min_rate_bps and elapsed > limits.grace_s and received < limits.min_rate_bps * elapsed:
        raise _too_slow(f"the request body arrives slower than {limits.min_rate_bps:g} bytes/s")


async def read_upload(request: Request, max_bytes: int, limits: BodyLimits | None = None) -> Upload:
    """Read the image from ``request`` within ``max_bytes`` and ``limits``; raises :class:`ApiError`
    (400/413, 408 for a body that is too slow, 503 during shutdown)."""
    limits = limits or BodyLimits()
    declared_length = request.headers.get("content-length")
    if declared_length is not None:
        try:
            length = int(declared_length)
        except ValueError:
            raise ApiError(400, "bad_request", "Content-Length is not an integer") from None
        if length > max_bytes:
            raise _too_large(max_bytes)

    content_type = request.headers.get("content-type")
    media_type, options = parse_options_header(content_type or "")
    is_multipart = media_type == b"multipart/form-data"
    parser: MultipartParser | None = None
    part: _FilePart | None = None
    if is_multipart:
        boundary = options.get(b"boundary")
        if not boundary:
            raise ApiError(400, "bad_request", "multipart body without a boundary")
        part = _FilePart()
        try:
            parser = MultipartParser(boundary, part.callbacks())  # type: ignore[arg-type]
        except (ValueError, TypeError, MultipartParseError):
            # e.g. a boundary over the parser's 256-character limit (RFC 2046 allows 70).
            raise ApiError(400, "bad_request", "the multipart boundary is invalid or too long") from None

    raw = bytearray()
    received = 0
    try:
        async for chunk in _chunks(request, limits):
            received += len(chunk)
            if received > max_bytes:
                raise _too_large(max_bytes)
            if parser is not None:
                parser.write(chunk)
            else:
                raw += chunk
        if parser is not None:
            parser.finalize()
    except MultipartParseError:
        # The parser's message can quote the body: never echo it.
        raise ApiError(400, "bad_request", "malformed multipart body") from None
    except ClientDisconnect:
        raise ApiError(400, "client_disconnected", "client closed the connection during upload") from None

    if part is not None:
        if not part.found:
            raise ApiError(400, "missing_file", f"multipart body has no '{FILE_FIELD}' field")
        data = bytes(part.data)
        declared = part.content_type
    else:
        data = bytes(raw)
        declared = content_type
    if not data:
        raise ApiError(400, "empty_body", "the request carries no image data")
    return Upload(data=data, declared_type=declared)
