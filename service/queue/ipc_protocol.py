"""Wire format between the API processes and the local model process of ``fundus serve --workers N``.

One Unix-domain stream socket per API process. Every message is one length-prefixed frame::

    frame   = u32 payload length (big-endian) | payload
    payload = u16 field count | { u16 key length | key | u32 value length | value } ...

The fields are those of :mod:`service.queue.redis_protocol` (the Redis entries and replies), so both
transports validate jobs and results with the same code and carry the same result fields, trust
signals included (uncertainty map, its mean, structure fidelity). Field ``t`` says what a frame is:

==========  ===============  ==========================================================================
``t``       direction        fields
==========  ===============  ==========================================================================
``job``     API → model      :func:`~service.queue.redis_protocol.encode_request` (``reply``, ``rmax``
                             and ``rttl`` are unused here)
``cancel``  API → model      ``jid``: the caller went away or its deadline passed; drop the job
``ping``    API → model      ``pid``: readiness probe
``pong``    model → API      ``pid``, ``ready`` (``1``/``0``), ``reason``, ``depth``
``res``     model → API      :func:`~service.queue.redis_protocol.encode_result` plus ``depth``
``err``     model → API      ``jid``, ``code``, ``msg``, ``ra`` (Retry-After seconds, optional),
                             ``depth``
==========  ===============  ==========================================================================

``depth`` is the model process's queue depth when the frame was written (the API's
``fundus_queue_depth``). Pixels never leave the machine and nothing here carries file names or tags.
"""

from __future__ import annotations

import asyncio
import struct
from collections.abc import Mapping
from dataclasses import dataclass

from service.queue.base import (
    BackendUnavailable,
    DeadlineExceeded,
    DuplicateRequest,
    InferenceFailed,
    Job,
    JobResult,
    QueueError,
    QueueFull,
)
from service.queue.redis_protocol import (
    PROTOCOL_VERSION,
    Fields,
    ProtocolError,
    decode_reply,
    encode_request,
    encode_result,
)

#: Largest frame accepted (a 512² job is 0.75 MiB, a result with its maps about 1.3 MiB).
MAX_FRAME_BYTES = 64 * 1024 * 1024

_LENGTH = struct.Struct(">I")
_COUNT = struct.Struct(">H")
_KEY = struct.Struct(">H")
_VALUE = struct.Struct(">I")

JOB, CANCEL, PING, PONG, RESULT, ERROR = "job", "cancel", "ping", "pong", "res", "err"

#: Error codes the model process sends, mapped back to the API's exception classes.
_ERRORS: dict[str, type[QueueError]] = {
    cls.code: cls
    for cls in (QueueFull, DeadlineExceeded, InferenceFailed, BackendUnavailable, DuplicateRequest)
}


@dataclass
class Pong:
    """The model process's answer to a readiness probe."""

    ping_id: str
    ready: bool
    reason: str
    depth: int


def pack(fields: Mapping[str, bytes | str]) -> bytes:
    """One frame holding ``fields`` (string values are UTF-8 encoded)."""
    parts: list[bytes] = [_COUNT.pack(len(fields))]
    for key, value in fields.items():
        raw_key = key.encode()
        raw_value = value.encode() if isinstance(value, str) else value
        parts += [_KEY.pack(len(raw_key)), raw_key, _VALUE.pack(len(raw_value)), raw_value]
    size = sum(len(part) for part in parts)
    if size > MAX_FRAME_BYTES:
        raise ValueError(f"frame of {size} bytes exceeds the {MAX_FRAME_BYTES}-byte limit")
    return b"".join([_LENGTH.pack(size), *parts])


def unpack(payload: bytes) -> dict[bytes, bytes]:
    """Fields of one frame's payload (keys and values as bytes); :class:`ProtocolError` if malformed."""
    view = memoryview(payload)
    try:
        (count,) = _COUNT.unpack_from(view, 0)
        offset = _COUNT.size
        fields: dict[bytes, bytes] = {}
        for _ in range(count):
            (key_length,) = _KEY.unpack_from(view, offset)
            offset += _KEY.size
            key = bytes(view[offset : offset + key_length])
            offset += key_length
            (value_length,) = _VALUE.unpack_from(view, offset)
            offset += _VALUE.size
            if offset + value_length > len(view):
                raise ProtocolError("frame is truncated")
            fields[key] = bytes(view[offset : offset + value_length])
            offset += value_length
    except struct.error as exc:
        raise ProtocolError("frame is truncated") from exc
    if offset != len(view):
        raise ProtocolError("frame has trailing bytes")
    return fields


async def read_frame(reader: asyncio.StreamReader) -> dict[bytes, bytes]:
    """The next frame's fields; raises ``IncompleteReadError`` at end of stream."""
    (size,) = _LENGTH.unpack(await reader.readexactly(_LENGTH.size))
    if size > MAX_FRAME_BYTES:
        raise ProtocolError(f"frame of {size} bytes exceeds the {MAX_FRAME_BYTES}-byte limit")
    return unpack(await reader.readexactly(size))


def kind(fields: Fields) -> str:
    """The frame's ``t`` field ('' when absent)."""
    value = fields.get(b"t", b"")
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


def text(fields: Fields, key: bytes, default: str = "") -> str:
    """A text field, ``default`` when absent."""
    value = fields.get(key)
    return default if value is None else value.decode(errors="replace")


def job_frame(job: Job, job_id: str) -> bytes:
    """A ``job`` frame (validates the pixels like the Redis entry encoder)."""
    fields = encode_request(job, job_id=job_id, reply_to="", reply_maxlen=1, reply_ttl_s=1)
    return pack({"t": JOB, **fields})


def cancel_frame(job_id: str) -> bytes:
    return pack({"t": CANCEL, "jid": job_id})


def ping_frame(ping_id: str) -> bytes:
    return pack({"t": PING, "pid": ping_id})


def pong_frame(ping_id: str, *, ready: bool, reason: str, depth: int) -> bytes:
    return pack(
        {"t": PONG, "pid": ping_id, "ready": "1" if ready else "0", "reason": reason, "depth": str(depth)}
    )


def result_frame(job_id: str, result: JobResult, *, depth: int) -> bytes:
    return pack({"t": RESULT, **encode_result(job_id, result), "depth": str(depth)})


def error_frame(job_id: str, error: QueueError, *, depth: int) -> bytes:
    fields: dict[str, bytes | str] = {
        "t": ERROR,
        "v": PROTOCOL_VERSION,
        "jid": job_id,
        "code": error.code,
        "msg": error.message,
        "depth": str(depth),
    }
    if error.retry_after_s is not None:
        fields["ra"] = repr(float(error.retry_after_s))
    return pack(fields)


def depth_of(fields: Fields) -> int | None:
    """The ``depth`` field of a model → API frame, when present and valid."""
    try:
        return max(0, int(text(fields, b"depth")))
    except ValueError:
        return None


def decode_answer(fields: Fields) -> tuple[str, JobResult | QueueError]:
    """``(job id, result or error)`` of a ``res`` or ``err`` frame."""
    if kind(fields) == RESULT:
        reply = decode_reply(fields)
        assert reply.result is not None
        return reply.job_id, reply.result
    job_id = text(fields, b"jid")
    if not job_id:
        raise ProtocolError("error frame without a job id")
    error_class = _ERRORS.get(text(fields, b"code"), InferenceFailed)
    try:
        retry_after = float(text(fields, b"ra")) if b"ra" in fields else None
    except ValueError:
        retry_after = None
    return job_id, error_class(text(fields, b"msg", "the model process failed"), retry_after_s=retry_after)


def decode_pong(fields: Fields) -> Pong:
    return Pong(
        ping_id=text(fields, b"pid"),
        ready=text(fields, b"ready") == "1",
        reason=text(fields, b"reason"),
        depth=depth_of(fields) or 0,
    )
