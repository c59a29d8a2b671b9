"""The node's durable spool: every instance lives on disk from its C-STORE until the PACS has it.

Layout under ``FUNDUS_DIMSE_SPOOL_DIR`` (one file system; every move is a ``rename``)::

    tmp/                 partial writes; emptied at start (nothing in it was ever acknowledged)
    incoming/<id>.dcm    received instances, not yet processed. The C-STORE response is sent only
                         after the file is written, fsynced, renamed here and the directory fsynced.
    outbox/<id>/         the derived instances (and the original, when forwarded) waiting for the
                         destination, with ``state.json`` (which parts were sent, failed attempts)
    quarantine/<id>.dcm  instances that cannot be processed, with ``<id>.json`` saying why
    failed/<id>/         outbox items set aside after FUNDUS_DIMSE_SEND_MAX_ATTEMPTS failed sends

States move forward only: ``incoming → outbox → (deleted once sent)``, or ``incoming → quarantine``,
or ``outbox → failed``. Each move is one atomic rename followed by an fsync of both directories, so
after a crash (SIGKILL, power loss) an item is in exactly one state, or (between the outbox commit
and the removal of its incoming file) in two, which :meth:`Spool.open` resolves in favour of the
later one. Items are named ``<receive time ns>-<random>``: never a UID or anything from the file.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger("fundus.dimse.spool")

STATES = ("incoming", "outbox", "quarantine", "failed")
STATE_FILE = "state.json"
_DICOM_SUFFIX = ".dcm"


def fsync_dir(path: Path) -> None:
    """Make the directory's entries (created, renamed, removed files) durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_durably(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` (a new file) and fsync it; the caller renames it into place."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
    try:
        view = memoryview(data)
        while view:
            written = os.write(fd, view)
            view = view[written:]
        os.fsync(fd)
    finally:
        os.close(fd)


def received_at(item_id: str) -> float:
    """Receive time (Unix seconds) encoded in an item id."""
    try:
        return int(item_id.split("-", 1)[0]) / 1e9
    except ValueError:
        return time.time()


@dataclass
class Part:
    """One instance of an outbox item.

    Attributes:
        file: its file name inside the item's directory.
        kind: ``original``, ``enhanced`` or ``segmentation`` (metric label).
        sop_class_uid / transfer_syntax_uid: what the association has to offer for it.
        sent: the destination answered success (or a warning) for it.
    """

    file: str
    kind: str
    sop_class_uid: str
    transfer_syntax_uid: str
    sent: bool = False


@dataclass
class OutboxItem:
    """An item whose derived instances wait for the destination (the content of ``state.json``)."""

    item_id: str
    parts: list[Part]
    attempts: int = 0
    last_error: str = ""
    directory: Path = field(default=Path(), repr=False)

    @property
    def received_at(self) -> float:
        return received_at(self.item_id)

    @property
    def unsent(self) -> list[Part]:
        return [part for part in self.parts if not part.sent]

    def to_json(self) -> dict[str, Any]:
        return {
            "version": 1,
            "parts": [asdict(part) for part in self.parts],
            "attempts": self.attempts,
            "last_error": self.last_error,
        }

    @classmethod
    def from_json(cls, item_id: str, directory: Path, data: dict[str, Any]) -> OutboxItem:
        parts = [Part(**part) for part in data["parts"]]
        return cls(
            item_id=item_id,
            parts=parts,
            attempts=int(data.get("attempts", 0)),
            last_error=str(data.get("last_error", "")),
            directory=directory,
        )


@dataclass(frozen=True)
class NewPart:
    """A part to commit: its bytes (or ``None`` with ``link_incoming`` for the original) and identity."""

    file: str
    kind: str
    sop_class_uid: str
    transfer_syntax_uid: str
    data: bytes | None = None
    link_incoming: bool = False


class SpoolError(RuntimeError):
    """The spool directory cannot be used (not writable, not a directory)."""


class Spool:
    """Durable state transitions of spooled items (thread-safe: every item has its own files)."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.tmp = self.root / "tmp"
        self.incoming = self.root / "incoming"
        self.outbox = self.root / "outbox"
        self.quarantine_dir = self.root / "quarantine"
        self.failed = self.root / "failed"

    # -- start-up --------------------------------------------------------------------------------------

    def open(self) -> None:
        """Create the layout, drop partial writes, and finish moves a crash interrupted.

        Raises:
            SpoolError: the directory cannot be created or written.
        """
        try:
            for directory in (self.tmp, self.incoming, self.outbox, self.quarantine_dir, self.failed):
                directory.mkdir(parents=True, exist_ok=True)
            fsync_dir(self.root)
            for leftover in self.tmp.iterdir():
                if leftover.is_dir() and not leftover.is_symlink():
                    shutil.rmtree(leftover)
                else:
                    leftover.unlink()
            fsync_dir(self.tmp)
            probe = self.tmp / f"probe-{secrets.token_hex(4)}"
            write_durably(probe, b"")
            probe.unlink()
        except OSError as exc:
            reason = exc.strerror or str(exc)
            raise SpoolError(f"FUNDUS_DIMSE_SPOOL_DIR {self.root} is not usable: {reason}") from exc
        # An outbox commit that crashed before its incoming file was removed: the outbox copy wins.
        removed = False
        for path in self.incoming.glob(f"*{_DICOM_SUFFIX}"):
            if (self.outbox / path.stem).is_dir():
                path.unlink()
                removed = True
        if removed:
            fsync_dir(self.incoming)

    # -- incoming --------------------------------------------------------------------------------------

    @staticmethod
    def new_id() -> str:
        return f"{time.time_ns():020d}-{secrets.token_hex(6)}"

    def accept(self, data: bytes) -> str:
        """Store a received instance durably in ``incoming/``; returns its item id.

        Only when this returns may the C-STORE be answered with success.
        """
        item_id = self.new_id()
        partial = self.tmp / f"{item_id}.part"
        try:
            write_durably(partial, data)
            os.rename(partial, self.incoming / f"{item_id}{_DICOM_SUFFIX}")
        except BaseException:
            with contextlib.suppress(OSError):
                partial.unlink()
            raise
        fsync_dir(self.incoming)
        return item_id

    def pending_incoming(self) -> list[str]:
        """Ids in ``incoming/``, oldest first."""
        return sorted(path.stem for path in self.incoming.glob(f"*{_DICOM_SUFFIX}"))

    def incoming_path(self, item_id: str) -> Path:
        return self.incoming / f"{item_id}{_DICOM_SUFFIX}"

    def read_incoming(self, item_id: str) -> bytes:
        return self.incoming_path(item_id).read_bytes()

    def has_incoming(self, item_id: str) -> bool:
        return self.incoming_path(item_id).is_file()

    # -- incoming → outbox -----------------------------------------------------------------------------

    def commit(self, item_id: str, parts: list[NewPart]) -> OutboxItem:
        """Move an item to ``outbox/`` with its parts, then drop its incoming file (all durably)."""
        staging = self.tmp / f"{item_id}.out"
        if staging.exists():
            shutil.rmtree(staging)
        staging.mkdir()
        item = OutboxItem(
            item_id=item_id,
            parts=[Part(p.file, p.kind, p.sop_class_uid, p.transfer_syntax_uid) for p in parts],
            directory=self.outbox / item_id,
        )
        try:
            for part in parts:
                target = staging / part.file
                if part.link_incoming:
                    self._link_or_copy(self.incoming_path(item_id), target)
                else:
                    assert part.data is not None
                    write_durably(target, part.data)
            write_durably(staging / STATE_FILE, _json_bytes(item.to_json()))
            fsync_dir(staging)
            os.rename(staging, item.directory)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        fsync_dir(self.outbox)
        self.incoming_path(item_id).unlink()
        fsync_dir(self.incoming)
        return item

    @staticmethod
    def _link_or_copy(source: Path, target: Path) -> None:
        try:
            os.link(source, target)  # same file system: no copy, and the data is already fsynced
        except OSError:
            write_durably(target, source.read_bytes())

    # -- incoming → quarantine -------------------------------------------------------------------------

    def quarantine(self, item_id: str, reason: dict[str, Any]) -> None:
        """Set an unusable received instance aside with ``<id>.json`` saying why (no patient data)."""
        note = self.tmp / f"{item_id}.reason"
        if note.exists():
            note.unlink()
        write_durably(note, _json_bytes({"item": item_id, "quarantined_at": time.time(), **reason}))
        os.rename(note, self.quarantine_dir / f"{item_id}.json")
        os.rename(self.incoming_path(item_id), self.quarantine_dir / f"{item_id}{_DICOM_SUFFIX}")
        fsync_dir(self.quarantine_dir)
        fsync_dir(self.incoming)

    def quarantined(self) -> list[str]:
        return sorted(path.stem for path in self.quarantine_dir.glob(f"*{_DICOM_SUFFIX}"))

    def quarantine_reason(self, item_id: str) -> dict[str, Any]:
        data: dict[str, Any] = json.loads((self.quarantine_dir / f"{item_id}.json").read_text())
        return data

    # -- outbox ------------------------------------------------------------------------------------------

    def outbox_items(self) -> list[OutboxItem]:
        """Every item in ``outbox/``, oldest first; one whose state cannot be read is set aside."""
        items = []
        for directory in sorted(path for path in self.outbox.iterdir() if path.is_dir()):
            try:
                data = json.loads((directory / STATE_FILE).read_text())
                items.append(OutboxItem.from_json(directory.name, directory, data))
            except (OSError, ValueError, KeyError, TypeError):
                log.error("outbox item unreadable; set aside in failed/", extra={"item": directory.name})
                self._move_to_failed(directory.name)
        return items

    def save(self, item: OutboxItem) -> None:
        """Rewrite an outbox item's ``state.json`` atomically (sent parts, attempts)."""
        partial = item.directory / f"{STATE_FILE}.{secrets.token_hex(4)}.part"
        write_durably(partial, _json_bytes(item.to_json()))
        os.rename(partial, item.directory / STATE_FILE)
        fsync_dir(item.directory)

    def finish(self, item: OutboxItem) -> None:
        """Remove a delivered item: one rename out of ``outbox/`` makes it gone, then delete the files."""
        doomed = self.tmp / f"{item.item_id}.sent"
        os.rename(item.directory, doomed)
        fsync_dir(self.outbox)
        shutil.rmtree(doomed, ignore_errors=True)

    def set_aside(self, item: OutboxItem) -> None:
        """Move an item that keeps failing to ``failed/`` (its state says why); an operator decides."""
        self.save(item)
        self._move_to_failed(item.item_id)

    def _move_to_failed(self, item_id: str) -> None:
        os.rename(self.outbox / item_id, self.failed / item_id)
        fsync_dir(self.failed)
        fsync_dir(self.outbox)

    # -- figures -----------------------------------------------------------------------------------------

    def depth(self, state: str) -> int:
        """Items in one state (``incoming``, ``outbox``, ``quarantine``, ``failed``)."""
        directory = {
            "incoming": self.incoming,
            "outbox": self.outbox,
            "quarantine": self.quarantine_dir,
            "failed": self.failed,
        }[state]
        try:
            with os.scandir(directory) as entries:
                if state == "outbox" or state == "failed":
                    return sum(1 for entry in entries if entry.is_dir())
                return sum(1 for entry in entries if entry.name.endswith(_DICOM_SUFFIX))
        except FileNotFoundError:
            return 0


def _json_bytes(data: dict[str, Any]) -> bytes:
    return json.dumps(data, indent=1, sort_keys=True).encode()
