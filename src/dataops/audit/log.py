"""Append-only, hash-chained JSON Lines.

Each record carries `seq` (1, 2, …), `prev` (the previous record's hash, GENESIS for
the first) and `hash`: SHA-256 over the canonical encoding of the record without
`hash`. Changing, removing, inserting or reordering a record breaks the chain.

`append` is durable before it returns (write + fsync) and the server appends before
it sends a response, so every released answer has its record. If the append fails,
`AuditUnavailable` is raised and the server releases nothing (fail closed).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

GENESIS = "0" * 64


class AuditUnavailable(Exception):
    """The record could not be made durable; the request must fail."""


@dataclass(frozen=True)
class Receipt:
    sequence: int
    hash: str


def canonical(record: dict[str, Any]) -> bytes:
    """The one byte encoding a record is hashed and stored in."""
    return json.dumps(record, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                      allow_nan=False).encode("utf-8")


def record_hash(record: dict[str, Any]) -> str:
    body = {k: v for k, v in record.items() if k != "hash"}
    return hashlib.sha256(canonical(body)).hexdigest()


class AuditLog:
    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._seq, self._prev = self._recover()
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)

    def _recover(self) -> tuple[int, str]:
        """Resume the chain after a restart; drop a torn last line left by a crash.

        A torn line was never fsynced, so no response was ever sent for it.
        """
        if not self.path.exists():
            return 0, GENESIS
        with self.path.open("rb+") as f:
            data = f.read()
            end = data.rfind(b"\n") + 1
            if end < len(data):
                log.warning("audit log %s: dropping a torn last record (%d bytes)", self.path, len(data) - end)
                f.truncate(end)
                os.fsync(f.fileno())
        lines = data[:end].splitlines()
        if not lines:
            return 0, GENESIS
        last = json.loads(lines[-1])
        return int(last["seq"]), str(last["hash"])

    @property
    def head(self) -> Receipt:
        return Receipt(self._seq, self._prev)

    def append(self, record: dict[str, Any]) -> Receipt:
        with self._lock:
            body = {**record, "seq": self._seq + 1, "prev": self._prev}
            digest = record_hash(body)
            line = canonical({**body, "hash": digest}) + b"\n"
            try:
                written = os.write(self._fd, line)
                if written != len(line):
                    raise OSError(f"short write ({written} of {len(line)} bytes)")
                os.fsync(self._fd)
            except OSError as exc:
                raise AuditUnavailable(f"audit record could not be written: {exc}") from exc
            self._seq += 1
            self._prev = digest
            return Receipt(self._seq, digest)

    def close(self) -> None:
        with self._lock:
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1
