"""Small file helpers shared by the audit log, its checkpoints and the stores of built data."""

from __future__ import annotations

import fcntl
import os
import shutil
import time
from pathlib import Path

from dataops.errors import StateInUse

# Scratch left this long untouched is no build in progress: a running build writes to its
# scratch all the time (one bucket file after another), so an hour of silence is a crash.
STALE_SECONDS = 3600


def fsync_dir(directory: Path) -> None:
    """Make a rename or a new file in `directory` survive a power cut, not only its bytes."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def last_touched(path: Path) -> float:
    """The newest mtime of a file, or of a directory and everything under it."""
    newest = path.stat().st_mtime
    if path.is_dir():
        for root, dirs, files in os.walk(path):
            for name in [*dirs, *files]:
                try:
                    newest = max(newest, os.stat(os.path.join(root, name)).st_mtime)
                except FileNotFoundError:  # removed while walked: a build that is still running
                    return time.time()
    return newest


def remove_stale(directory: Path, pattern: str, older_than: float = STALE_SECONDS) -> list[Path]:
    """Remove what matches `pattern` under `directory` and was not touched for `older_than`
    seconds: the scratch or half-written output of a build that crashed (raw rows, some of
    it), which no normal exit leaves. Recent ones are kept: another thread or server
    process sharing the state directory may be writing them. Returns what was removed."""
    removed: list[Path] = []
    try:
        candidates = list(directory.glob(pattern))
    except OSError:
        return removed
    for path in candidates:
        try:
            if time.time() - last_touched(path) <= older_than:
                continue
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
            removed.append(path)
        except FileNotFoundError:
            continue
    return removed


def take_pid_lock(path: Path) -> tuple[int | None, str]:
    """Lock `path` exclusively (flock, without waiting) and write our pid in it.

    Returns (its descriptor, "") — the lock lasts while the descriptor is open, and the
    kernel drops it however the process ends — or (None, the holder's pid as it wrote it).
    """
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        return None, holder
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd, ""


class StateLock:
    """An exclusive lock on a server's state directory, held while it serves.

    Two servers on one state directory would each append to its audit log with its own
    sequence numbers and hash chain, interleaving two chains in one file, and each
    would orphan the other's open reservations at start. gRPC binds its port with
    SO_REUSEPORT, so a second server may even share the first one's address. So
    `dataops serve` takes `state/server.lock` with flock (released by the kernel
    however the process ends, so a crash leaves no stale lock) and refuses to start
    if another process holds it. Tools that only read (audit verify, budget show) do
    not take it.
    """

    NAME = "server.lock"

    def __init__(self, state: Path) -> None:
        state.mkdir(parents=True, exist_ok=True)
        self.path = state / self.NAME
        fd, holder = take_pid_lock(self.path)
        if fd is None:
            raise StateInUse(
                f"{state}: another dataops serve (pid {holder}) is using this state directory; "
                "stop it first, or give this server its own [paths] state"
            )
        self._fd: int | None = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the only descriptor drops the flock
            self._fd = None
