"""Wire format shared by the API side (``service.queue.redis_backend``) and the worker (``service.worker``).

Keys (all under one prefix, ``fundus`` by default; use a hash tag such as ``{fundus}`` to keep every
key in one Redis Cluster slot, since the worker writes replies and acks in one MULTI):

``<p>:requests``          request stream, consumer group ``workers``; entries are XACKed and XDELed
                          together once answered, so XLEN is the global backlog (waiting + running).
                          Never trimmed: a MAXLEN would drop entries still pending in the group.
``<p>:replies:<api>``     one reply stream per API process, read by a single background reader.
``<p>:dead``              dead letters (metadata only, never pixels), capped with ``MAXLEN ~``.
``<p>:worker:<name>``     heartbeat key of one worker (JSON, with a TTL).
``<p>:workers``           sorted set of worker names ever seen (pruned when their key is gone).
``<p>:epoch``             random token created by whichever process first finds it missing; a new
                          value means Redis lost its data (restart without persistence, flush).

A request entry carries the working-size uint8 pixels inline (capped at :data:`MAX_PIXEL_BYTES`),
the task, an internal job id, the caller's request id, the deadline and the reply stream name.
No file names and no DICOM tags ever enter Redis.

Clock note: ``deadline`` and ``enqueued_at`` are ``time.time()`` values of the API host, compared
with the worker host's clock; keep hosts NTP-synchronised (skew shortens or lengthens deadlines).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from service.queue.base import (
    BackendUnavailable,
    DeadlineExceeded,
    InferenceFailed,
    Job,
    JobResult,
    QueueError,
    Task,
)

PROTOCOL_VERSION = "1"
DEFAULT_PREFIX = "fundus"
GROUP = "workers"

# 512² × 3 = 768 KiB; anything above one MiB belongs on shared storage, not inline in Redis.
MAX_PIXEL_BYTES = 1024 * 1024

# Worker side defaults (the API side reads none of them except the heartbeat layout).
DEFAULT_BLOCK_MS = 1000  # every blocking call stays far below redis-py's 5 s socket timeout
# A live worker re-claims the batch it is running every heartbeat (TTL/3), so a slow batch never idles
# this long; a dead worker's entries are re-run after at most this + the janitor interval (claim/4),
# i.e. about 13 s, well within the default 30 s request timeout.
DEFAULT_CLAIM_IDLE_MS = 10_000
DEFAULT_MAX_DELIVERIES = 3
DEFAULT_HEARTBEAT_TTL_S = 10.0
DEAD_LETTER_MAXLEN = 10_000
DEFAULT_REPLY_TTL_S = 300

Fields = Mapping[bytes, bytes]


class ProtocolError(ValueError):
    """An entry or a reply that cannot be decoded (foreign writer, version mismatch, truncation)."""


@dataclass(frozen=True)
class StreamNames:
    """Every key name derived from one prefix."""

    prefix: str = DEFAULT_PREFIX

    @property
    def requests(self) -> str:
        return f"{self.prefix}:requests"

    @property
    def dead_letters(self) -> str:
        return f"{self.prefix}:dead"

    @property
    def workers(self) -> str:
        return f"{self.prefix}:workers"

    @property
    def epoch(self) -> str:
        return f"{self.prefix}:epoch"

    def admitted(self, job_id: str) -> str:
        """Marker of an admitted job (its entry id): admitting the same job id twice is a no-op."""
        return f"{self.prefix}:admitted:{job_id}"

    def heartbeat(self, worker: str) -> str:
        return f"{self.prefix}:worker:{worker}"

    def replies(self, api_id: str) -> str:
        return f"{self.prefix}:replies:{api_id}"


@dataclass
class RequestEntry:
    """A decoded request stream entry.

    Attributes:
        job_id: internal unique id (the reply key; request ids may repeat across clients).
        reply_to: reply stream of the API process waiting for it.
        reply_maxlen: approximate cap the worker applies to that reply stream.
        reply_ttl_s: expiry the worker sets on that reply stream after writing.
        job: the job, ``pixels`` uint8 [3, S, S].
    """

    job_id: str
    reply_to: str
    reply_maxlen: int
    reply_ttl_s: int
    job: Job


@dataclass
class Reply:
    """A decoded reply: either ``result`` or ``error`` is set."""

    job_id: str
    result: JobResult | None = None
    error: QueueError | None = None


def pixel_bytes(size: int) -> int:
    """Inline payload size of one working-size RGB image."""
    return 3 * size * size


def check_working_size(size: int) -> None:
    """Refuse working sizes whose inline payload would exceed :data:`MAX_PIXEL_BYTES`."""
    if size < 1 or pixel_bytes(size) > MAX_PIXEL_BYTES:
        limit = math.isqrt(MAX_PIXEL_BYTES // 3)
        raise ValueError(f"working size {size} is outside 1..{limit} allowed inline through Redis")


def _text(fields: Fields, key: bytes) -> str:
    value = fields.get(key)
    if value is None:
        raise ProtocolError(f"missing field {key.decode()}")
    return value.decode() if isinstance(value, bytes) else str(value)


def _number(fields: Fields, key: bytes) -> float:
    try:
        value = float(_text(fields, key))
    except ValueError as exc:
        raise ProtocolError(f"field {key.decode()} is not a number") from exc
    if not math.isfinite(value):
        raise ProtocolError(f"field {key.decode()} is not finite")
    return value


def _shape(fields: Fields, key: bytes) -> tuple[int, ...]:
    try:
        shape = tuple(int(part) for part in _text(fields, key).split(","))
    except ValueError as exc:
        raise ProtocolError(f"field {key.decode()} is not a shape") from exc
    if any(dim < 1 for dim in shape):
        raise ProtocolError(f"field {key.decode()} has a non-positive dimension")
    return shape


def _array(fields: Fields, data_key: bytes, shape_key: bytes) -> np.ndarray:
    shape = _shape(fields, shape_key)
    data = fields.get(data_key)
    if not isinstance(data, bytes | bytearray | memoryview):
        raise ProtocolError(f"missing field {data_key.decode()}")
    if len(data) != math.prod(shape):
        raise ProtocolError(
            f"field {data_key.decode()} has {len(data)} bytes, shape {shape} needs {math.prod(shape)}"
        )
    # A private, writable copy: callers may post-process in place (frombuffer views are read-only).
    return np.frombuffer(data, dtype=np.uint8).reshape(shape).copy()


def encode_request(
    job: Job, *, job_id: str, reply_to: str, reply_maxlen: int, reply_ttl_s: int
) -> dict[str, bytes | str]:
    """Stream fields for ``job``; ``job.pixels`` must be uint8 [3, S, S] within the inline cap."""
    pixels = job.pixels
    if (
        pixels.dtype != np.uint8
        or pixels.ndim != 3
        or pixels.shape[0] != 3
        or pixels.shape[1] != pixels.shape[2]
    ):
        raise ValueError(f"job pixels must be uint8 [3, S, S], got {pixels.dtype} {tuple(pixels.shape)}")
    if pixels.nbytes > MAX_PIXEL_BYTES:
        raise ValueError(f"job pixels are {pixels.nbytes} bytes; the inline cap is {MAX_PIXEL_BYTES}")
    return {
        "v": PROTOCOL_VERSION,
        "jid": job_id,
        "rid": job.request_id,
        "task": str(job.task),
        "deadline": repr(float(job.deadline)),
        "enq": repr(float(job.enqueued_at)),
        "shape": ",".join(str(d) for d in pixels.shape),
        "px": np.ascontiguousarray(pixels).tobytes(),
        "reply": reply_to,
        "rmax": str(int(reply_maxlen)),
        "rttl": str(int(reply_ttl_s)),
    }


def decode_request(fields: Fields) -> RequestEntry:
    """Inverse of :func:`encode_request`; raises :class:`ProtocolError` on anything malformed."""
    if not fields:
        raise ProtocolError("entry has no fields (deleted or foreign)")
    if _text(fields, b"v") != PROTOCOL_VERSION:
        raise ProtocolError(f"protocol version {_text(fields, b'v')!r}, expected {PROTOCOL_VERSION}")
    shape = _shape(fields, b"shape")
    if len(shape) != 3 or shape[0] != 3 or shape[1] != shape[2] or math.prod(shape) > MAX_PIXEL_BYTES:
        raise ProtocolError(f"pixel shape {shape} is not an inline [3, S, S] image")
    try:
        task = Task(_text(fields, b"task"))
    except ValueError as exc:
        raise ProtocolError("unknown task") from exc
    job = Job(
        request_id=_text(fields, b"rid"),
        task=task,
        pixels=_array(fields, b"px", b"shape"),
        deadline=_number(fields, b"deadline"),
        enqueued_at=_number(fields, b"enq"),
    )
    return RequestEntry(
        job_id=_text(fields, b"jid"),
        reply_to=_text(fields, b"reply"),
        reply_maxlen=max(1, int(_number(fields, b"rmax"))),
        reply_ttl_s=max(1, int(_number(fields, b"rttl"))),
        job=job,
    )


def peek_reply_target(fields: Fields) -> tuple[str, str] | None:
    """``(job_id, reply stream)`` of an entry that failed to decode, when those two fields survive."""
    try:
        return _text(fields, b"jid"), _text(fields, b"reply")
    except ProtocolError:
        return None


def encode_result(job_id: str, result: JobResult) -> dict[str, bytes | str]:
    """Reply fields for a successful job."""
    fields: dict[str, bytes | str] = {
        "v": PROTOCOL_VERSION,
        "jid": job_id,
        "status": "ok",
        "q": repr(float(result.queue_seconds)),
        "inf": repr(float(result.inference_seconds)),
        "bs": str(int(result.batch_size)),
    }
    for name, array in (("img", result.image), ("ves", result.vessels), ("unc", result.uncertainty)):
        if array is not None:
            data = np.ascontiguousarray(array, dtype=np.uint8)
            fields[name] = data.tobytes()
            fields[f"{name}_shape"] = ",".join(str(d) for d in data.shape)
    for name, value in (
        ("um", result.uncertainty_mean),
        ("qb", result.quality_before),
        ("qa", result.quality_after),
    ):
        if value is not None:
            fields[name] = repr(float(value))
    if result.fidelity is not None:
        fields["fid"] = json.dumps(result.fidelity)
    return fields


# Error codes a worker may send, mapped back to the API's exception classes.
_ERRORS: dict[str, type[QueueError]] = {
    DeadlineExceeded.code: DeadlineExceeded,
    InferenceFailed.code: InferenceFailed,
    BackendUnavailable.code: BackendUnavailable,
}


def encode_error(job_id: str, error: QueueError) -> dict[str, bytes | str]:
    """Reply fields for a job that will not produce a result."""
    return {"v": PROTOCOL_VERSION, "jid": job_id, "status": "error", "code": error.code, "msg": error.message}


def decode_reply(fields: Fields) -> Reply:
    """Inverse of :func:`encode_result` / :func:`encode_error`."""
    if _text(fields, b"v") != PROTOCOL_VERSION:
        raise ProtocolError(f"reply protocol version {_text(fields, b'v')!r}, expected {PROTOCOL_VERSION}")
    job_id = _text(fields, b"jid")
    status = _text(fields, b"status")
    if status == "error":
        kind = _ERRORS.get(_text(fields, b"code"), InferenceFailed)
        return Reply(job_id=job_id, error=kind(_text(fields, b"msg")))
    if status != "ok":
        raise ProtocolError(f"unknown reply status {status!r}")
    image = _array(fields, b"img", b"img_shape") if b"img" in fields else None
    vessels = _array(fields, b"ves", b"ves_shape") if b"ves" in fields else None
    uncertainty = _array(fields, b"unc", b"unc_shape") if b"unc" in fields else None
    try:
        fidelity = json.loads(_text(fields, b"fid")) if b"fid" in fields else None
    except ValueError as exc:
        raise ProtocolError("reply has a malformed fidelity field") from exc
    result = JobResult(
        image=image,
        vessels=vessels,
        queue_seconds=_number(fields, b"q"),
        inference_seconds=_number(fields, b"inf"),
        batch_size=int(_number(fields, b"bs")),
        uncertainty=uncertainty,
        uncertainty_mean=_number(fields, b"um") if b"um" in fields else None,
        fidelity=fidelity if isinstance(fidelity, dict) else None,
        quality_before=_number(fields, b"qb") if b"qb" in fields else None,
        quality_after=_number(fields, b"qa") if b"qa" in fields else None,
    )
    return Reply(job_id=job_id, result=result)


def encode_dead_letter(
    entry_id: str, fields: Fields, *, reason: str, deliveries: int, worker: str, at: float
) -> dict[str, str]:
    """Dead-letter record: ids, task, shape, why and how often, never the pixels."""
    keep = {}
    for key in (b"jid", b"rid", b"task", b"shape", b"deadline", b"enq"):
        value = fields.get(key)
        if isinstance(value, bytes):
            keep[key.decode()] = value.decode(errors="replace")[:200]
    keep.update(
        {
            "entry": entry_id,
            "reason": reason[:500],
            "deliveries": str(deliveries),
            "worker": worker,
            "at": repr(at),
        }
    )
    return keep


def heartbeat_value(
    *, worker: str, host: str, pid: int, device: str, model_version: str, started: float
) -> str:
    """JSON body of a worker's heartbeat key."""
    return json.dumps(
        {
            "worker": worker,
            "host": host,
            "pid": pid,
            "device": device,
            "model": model_version,
            "started": started,
        }
    )
