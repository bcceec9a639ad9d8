"""Append-only, hash-chained JSON Lines with signed checkpoints.

The encoding and hash of a record are in `dataops.audit.chain`. This module writes:

    STATE/audit/audit.jsonl          the active segment, one record per line
    STATE/audit/audit-000001.jsonl   older segments, renamed from audit.jsonl when it
                                     grew past `segment_bytes`; the chain runs on across them
    STATE/audit/checkpoints.jsonl    signed checkpoints over the head (see `signing`)
    STATE/audit/signing.key          the Ed25519 key that signs them (0600), made on first open
    STATE/audit/signing.pub          its public half, for `dataops audit verify`

`append` is durable before it returns (write + fsync) and the server appends before
it sends a response, so every released answer has its record. If the append fails,
`AuditUnavailable` is raised and the server releases nothing (fail closed).

A checkpoint is signed every `checkpoint_every` records, every `checkpoint_seconds`
if records were added, before a segment is rotated (so every segment's end is signed)
and at `close()`.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dataops._fs import fsync_dir
from dataops.audit.chain import GENESIS, canonical, line_hash_ok, record_hash
from dataops.audit.signing import (
    CHECKPOINTS, SIGNING_KEY, checkpoint_hash, key_id, load_or_create_signing_key, sign_checkpoint,
)

log = logging.getLogger(__name__)

__all__ = ["ACTIVE", "GENESIS", "AuditLog", "AuditUnavailable", "Receipt", "canonical", "record_hash",
           "segment_paths"]

ACTIVE = "audit.jsonl"


class AuditUnavailable(OSError):
    """The record could not be made durable (or the log cannot be trusted); the request must fail.

    An OSError so `dataops serve` reports it as the I/O problem it is.
    """


@dataclass(frozen=True)
class Receipt:
    sequence: int
    hash: str


def segment_paths(active: Path) -> list[Path]:
    """Every segment of the log in chain order: rotated ones by number, then the active one."""
    active = Path(active)
    stem, suffix = active.stem, active.suffix
    rotated = []
    for p in active.parent.glob(f"{stem}-*{suffix}"):
        number = p.name[len(stem) + 1:-len(suffix)]
        if number.isdigit():
            rotated.append((int(number), p))
    return [p for _, p in sorted(rotated)] + ([active] if active.exists() else [])


class AuditLog:
    def __init__(
        self,
        path: Path,
        *,
        fsync: bool = True,  # False only for benchmarks and tests: a crash may lose records
        checkpoint_every: int = 1000,
        checkpoint_seconds: float | None = 60.0,
        segment_bytes: int = 64 * 2**20,
        origin: str = "dataops-audit",
    ) -> None:
        self.path = Path(path)
        self.directory = self.path.parent
        self.directory.mkdir(parents=True, exist_ok=True)
        self.checkpoints_path = self.directory / CHECKPOINTS
        self.fsync = fsync
        self.checkpoint_every = checkpoint_every
        self.checkpoint_seconds = checkpoint_seconds
        self.segment_bytes = segment_bytes
        self.origin = origin
        self._last_checkpoint = self._recover_checkpoints()
        key_path = self.directory / SIGNING_KEY
        signed_by = self._last_checkpoint["key_id"] if self._last_checkpoint else None
        if signed_by and not key_path.exists():
            # A fresh key would quietly start a log no reviewer's key verifies.
            raise AuditUnavailable(f"{key_path} is missing but {self.checkpoints_path} is signed by key id "
                                   f"{signed_by}; restore the key, or start a new audit directory")
        self._key = load_or_create_signing_key(key_path)
        self.public_key = self._key.public_key()
        self.key_id = key_id(self.public_key)
        if signed_by and signed_by != self.key_id:
            raise AuditUnavailable(f"{key_path} (key id {self.key_id}) is not the key that signed "
                                   f"{self.checkpoints_path} (key id {signed_by})")
        self._lock = threading.Lock()
        self._broken: str | None = None
        self._seq, self._prev = self._recover()
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
        self._segment_size = os.fstat(self._fd).st_size
        fsync_dir(self.directory)
        self._stop = threading.Event()
        self._timer: threading.Thread | None = None
        if checkpoint_seconds:
            self._timer = threading.Thread(target=self._checkpoint_timer, name="audit-checkpoint", daemon=True)
            self._timer.start()

    # --- recovery -------------------------------------------------------------

    def _recover(self) -> tuple[int, str]:
        """Resume the chain after a restart, across segments.

        A torn last line (a crash mid-write) is dropped: it was never fsynced, so no
        response was ever sent for it. Records after the last checkpoint are checked
        against it before the log is reopened: otherwise the next checkpoint would sign
        whatever someone wrote there while the server was down.
        """
        _drop_torn_line(self.path)
        lines: list[bytes] = []
        for segment in reversed(segment_paths(self.path)):
            lines = segment.read_bytes().splitlines()
            if lines:
                break
        if not lines:
            seq, head = 0, GENESIS
        else:
            try:
                last = json.loads(lines[-1])
                seq, head = int(last["seq"]), str(last["hash"])
            except (ValueError, KeyError, TypeError) as exc:
                raise AuditUnavailable(f"{segment}: the last record cannot be read ({exc!r}); "
                                       "run `dataops audit verify`") from None
        self._check_tail(lines, seq, head)
        return seq, head

    def _check_tail(self, lines: list[bytes], seq: int, head: str) -> None:
        checkpoint = self._last_checkpoint
        if checkpoint is None:
            return
        size, signed = checkpoint["size"], checkpoint["head"]
        problem = None
        if seq < size:
            problem = f"the log ends at seq {seq} but checkpoint #{checkpoint['checkpoint']} signed {size} records"
        else:
            try:
                problem = _tail_problem(lines, size, signed, seq, head)
            except (ValueError, KeyError, TypeError) as exc:
                problem = f"a record after seq {size} cannot be read ({exc!r})"
        if problem:
            raise AuditUnavailable(f"{self.directory}: {problem}; refusing to extend a log that may have "
                                   "been altered — run `dataops audit verify`")

    def _recover_checkpoints(self) -> dict[str, Any] | None:
        if not self.checkpoints_path.exists():
            return None
        _drop_torn_line(self.checkpoints_path)
        lines = self.checkpoints_path.read_bytes().splitlines()
        if not lines:
            return None
        try:
            checkpoint = json.loads(lines[-1])
            int(checkpoint["checkpoint"]), int(checkpoint["size"]), str(checkpoint["key_id"])
        except (ValueError, KeyError, TypeError) as exc:
            raise AuditUnavailable(f"{self.checkpoints_path}: the last checkpoint cannot be read ({exc!r}); "
                                   "run `dataops audit verify`") from None
        return checkpoint

    # --- writing --------------------------------------------------------------

    @property
    def head(self) -> Receipt:
        return Receipt(self._seq, self._prev)

    @property
    def last_checkpoint(self) -> dict[str, Any] | None:
        return self._last_checkpoint

    def append(self, record: dict[str, Any]) -> Receipt:
        with self._lock:
            if self._fd < 0 or self._broken:
                raise AuditUnavailable(f"audit log unavailable: {self._broken or 'closed'}")
            body = {**record, "seq": self._seq + 1, "prev": self._prev}
            digest = record_hash(body)
            line = canonical({**body, "hash": digest}) + b"\n"
            try:
                self._write(self._fd, line, self._segment_size)
            except OSError as exc:
                raise AuditUnavailable(f"audit record could not be written: {exc}") from exc
            self._seq += 1
            self._prev = digest
            self._segment_size += len(line)
            rotate = self._segment_size >= self.segment_bytes
            if rotate or self._seq - self._signed_size >= self.checkpoint_every:
                # The record is durable: a failed checkpoint is retried, never fails the request.
                if self._checkpoint_quietly() and rotate:
                    self._rotate()
            return Receipt(self._seq, digest)

    def _write(self, fd: int, line: bytes, size_before: int) -> None:
        """Write one line durably, or leave the file as it was and raise OSError.

        A half-written or unsynced line must not stay: the next line would follow it
        and the chain would hold a record nobody got a receipt for.
        """
        try:
            written = os.write(fd, line)
            if written != len(line):
                raise OSError(f"short write ({written} of {len(line)} bytes)")
            if self.fsync:
                os.fsync(fd)
        except OSError:
            try:
                if os.fstat(fd).st_size > size_before:
                    os.ftruncate(fd, size_before)
            except OSError as exc:
                self._broken = f"a failed write could not be undone ({exc}); restart the server"
                log.error("audit log %s: %s", self.path, self._broken)
            raise

    @property
    def _signed_size(self) -> int:
        return self._last_checkpoint["size"] if self._last_checkpoint else 0

    def checkpoint(self) -> dict[str, Any] | None:
        """Sign the head now; None if nothing was added since the last checkpoint."""
        with self._lock:
            return self._sign_head()

    def _sign_head(self) -> dict[str, Any] | None:
        if self._seq == self._signed_size or self._broken:
            return None
        previous = self._last_checkpoint
        checkpoint = sign_checkpoint(self._key, {
            "checkpoint": previous["checkpoint"] + 1 if previous else 1,
            "origin": self.origin,
            "key_id": self.key_id,
            "size": self._seq,
            "head": self._prev,
            "time": dt.datetime.now(dt.timezone.utc).isoformat(timespec="microseconds"),
            "prev": checkpoint_hash(previous) if previous else GENESIS,
        })
        first = previous is None
        fd = os.open(self.checkpoints_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            self._write(fd, canonical(checkpoint) + b"\n", os.fstat(fd).st_size)
        finally:
            os.close(fd)
        if first and self.fsync:
            fsync_dir(self.directory)
        self._last_checkpoint = checkpoint
        return checkpoint

    def _checkpoint_quietly(self) -> bool:
        try:
            self._sign_head()
            return True
        except OSError:
            log.exception("audit log %s: could not write a checkpoint; will retry", self.path)
            return False

    def _rotate(self) -> None:
        """Rename the active segment to the next number and start a new one."""
        numbers = [int(p.name[len(self.path.stem) + 1:-len(self.path.suffix)])
                   for p in segment_paths(self.path)[:-1]]
        target = self.directory / f"{self.path.stem}-{max(numbers, default=0) + 1:06d}{self.path.suffix}"
        os.close(self._fd)
        self._fd = -1
        try:
            os.rename(self.path, target)
            fsync_dir(self.directory)
        except OSError:
            log.exception("audit log %s: could not rotate to %s; continuing in the same file", self.path, target)
        try:
            self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
            self._segment_size = os.fstat(self._fd).st_size
            fsync_dir(self.directory)  # a new file's name is durable only once its directory is synced
        except OSError as exc:
            self._broken = f"cannot open {self.path} after rotation ({exc})"
            log.error("audit log: %s", self._broken)

    def _checkpoint_timer(self) -> None:
        while not self._stop.wait(self.checkpoint_seconds):
            with self._lock:
                if self._fd >= 0:
                    self._checkpoint_quietly()

    def close(self) -> None:
        self._stop.set()
        if self._timer is not None and self._timer is not threading.current_thread():
            self._timer.join()
        with self._lock:
            if self._fd >= 0:
                self._checkpoint_quietly()
                os.close(self._fd)
                self._fd = -1


def _tail_problem(lines: list[bytes], size: int, signed: str, seq: int, head: str) -> str | None:
    """Why the records after a checkpoint at `size` (head `signed`) do not continue it, or None."""
    tail = []
    for raw in reversed(lines):  # the unsigned records are at the end of the last segment
        record = json.loads(raw)
        if record["seq"] <= size:
            break
        tail.append((raw, record))
    expected_seq, prev = size + 1, signed
    for raw, record in reversed(tail):
        if record["seq"] != expected_seq or record["prev"] != prev or not line_hash_ok(raw, record):
            return f"record seq {record['seq']} does not continue the chain signed at seq {size}"
        expected_seq, prev = expected_seq + 1, record["hash"]
    if prev != head or expected_seq != seq + 1:
        return f"the records after seq {size} do not continue the signed checkpoint"
    return None


def _drop_torn_line(path: Path) -> None:
    if not path.exists():
        return
    with path.open("rb+") as f:
        data = f.read()
        end = data.rfind(b"\n") + 1
        if end < len(data):
            log.warning("%s: dropping a torn last line (%d bytes)", path, len(data) - end)
            f.truncate(end)
            os.fsync(f.fileno())

