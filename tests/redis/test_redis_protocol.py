"""Wire format: round trips, the inline size cap, and refusal of malformed entries."""

from __future__ import annotations

import numpy as np
import pytest

from service.queue.base import DeadlineExceeded, InferenceFailed, JobResult, Task
from service.queue.redis_backend import redact_url
from service.queue.redis_protocol import (
    MAX_PIXEL_BYTES,
    ProtocolError,
    check_working_size,
    decode_reply,
    decode_request,
    encode_dead_letter,
    encode_error,
    encode_request,
    encode_result,
)
from tests.redis.helpers import make_job


def as_wire(fields: dict[str, bytes | str]) -> dict[bytes, bytes]:
    return {k.encode(): v if isinstance(v, bytes) else v.encode() for k, v in fields.items()}


def test_request_round_trip() -> None:
    job = make_job("req-1", task=Task.SEGMENT, seed=3)
    fields = as_wire(
        encode_request(job, job_id="j1", reply_to="p:replies:a", reply_maxlen=50, reply_ttl_s=60)
    )
    entry = decode_request(fields)
    assert (entry.job_id, entry.reply_to, entry.reply_maxlen, entry.reply_ttl_s) == (
        "j1",
        "p:replies:a",
        50,
        60,
    )
    assert entry.job.task is Task.SEGMENT and entry.job.request_id == "req-1"
    np.testing.assert_array_equal(entry.job.pixels, job.pixels)
    assert entry.job.pixels.flags.writeable
    assert entry.job.deadline == pytest.approx(job.deadline)


def test_inline_cap_is_enforced() -> None:
    check_working_size(512)  # 768 KiB fits
    with pytest.raises(ValueError, match="working size"):
        check_working_size(1024)
    job = make_job("big", size=600)
    assert job.pixels.nbytes > MAX_PIXEL_BYTES
    with pytest.raises(ValueError, match="inline cap"):
        encode_request(job, job_id="j", reply_to="r", reply_maxlen=1, reply_ttl_s=1)


@pytest.mark.parametrize(
    "mutate",
    [
        lambda f: f.pop(b"px"),
        lambda f: f.update({b"px": f[b"px"][:-1]}),
        lambda f: f.update({b"v": b"99"}),
        lambda f: f.update({b"task": b"nonsense"}),
        lambda f: f.update({b"deadline": b"nan"}),
        lambda f: f.update({b"shape": b"3,16"}),
        lambda f: f.clear(),
    ],
)
def test_malformed_entries_are_refused(mutate: object) -> None:
    fields = as_wire(encode_request(make_job("m"), job_id="j", reply_to="r", reply_maxlen=1, reply_ttl_s=1))
    mutate(fields)  # type: ignore[operator]
    with pytest.raises(ProtocolError):
        decode_request(fields)


def test_reply_round_trips() -> None:
    image = np.arange(3 * 4 * 4, dtype=np.uint8).reshape(3, 4, 4)
    ok = decode_reply(as_wire(encode_result("j", JobResult(image, None, 0.5, 0.25, 3))))
    assert ok.error is None and ok.result is not None
    np.testing.assert_array_equal(ok.result.image, image)
    assert ok.result.vessels is None and ok.result.batch_size == 3 and ok.result.inference_seconds == 0.25
    late = decode_reply(as_wire(encode_error("j", DeadlineExceeded("too late"))))
    assert isinstance(late.error, DeadlineExceeded) and late.error.status_code == 504
    unknown = as_wire(encode_error("j", InferenceFailed("x")))
    unknown[b"code"] = b"something_new"
    assert isinstance(decode_reply(unknown).error, InferenceFailed)


def test_reply_carries_the_trust_signals() -> None:
    image = np.zeros((3, 4, 4), dtype=np.uint8)
    uncertainty = np.arange(16, dtype=np.uint8).reshape(4, 4)
    fidelity = {"dice": 0.81, "removed": 0.1, "added": 0.25}
    result = JobResult(
        image, None, 0.5, 0.25, 1, uncertainty=uncertainty, uncertainty_mean=0.0123, fidelity=fidelity
    )
    decoded = decode_reply(as_wire(encode_result("j", result))).result
    assert decoded is not None
    np.testing.assert_array_equal(decoded.uncertainty, uncertainty)
    assert decoded.uncertainty_mean == 0.0123 and decoded.fidelity == fidelity
    plain = decode_reply(as_wire(encode_result("j", JobResult(image, None, 0.5, 0.25, 1)))).result
    assert plain is not None and plain.uncertainty is None and plain.fidelity is None
    broken = as_wire(encode_result("j", result))
    broken[b"fid"] = b"{not json"
    with pytest.raises(ProtocolError):
        decode_reply(broken)


def test_dead_letter_keeps_no_pixels() -> None:
    fields = as_wire(encode_request(make_job("d"), job_id="j", reply_to="r", reply_maxlen=1, reply_ttl_s=1))
    record = encode_dead_letter("1-0", fields, reason="boom", deliveries=4, worker="w", at=1.0)
    assert "px" not in record and record["rid"] == "d" and record["deliveries"] == "4"


def test_passwords_are_redacted() -> None:
    assert redact_url("redis://:hunter2@db:6380/0") == "redis://:***@db:6380/0"
    assert redact_url("rediss://user:pw@db/1") == "rediss://user:***@db/1"
    assert redact_url("redis://db:6379") == "redis://db:6379"
