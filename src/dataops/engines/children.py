"""Build children: a build that runs in its own memory-capped process (`python -m <module>`).

The serving copies (`dataops.engines.build`), and past 4M rows the protected tables
(`dataops.tables.build`) and subject layouts (`dataops.engines.subject_build`), are
built this way: the child caps its own memory (`cap_memory`)
before it imports polars, so a build that would need more memory fails inside the
child and never takes the server down; the server reads one line of JSON back, or the
exit status. Memory the child used goes back to the system when it exits, so a server
that built a large table does not keep the build's pages.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger(__name__)

# Freed memory goes back to the system at once: polars' jemalloc otherwise keeps a
# bucket's pages after it is done (the RSS grew bucket by bucket), and Arrow on the
# system allocator with few arenas does not hold its own pools.
ALLOCATOR = {
    "_RJEM_MALLOC_CONF": "dirty_decay_ms:0,muzzy_decay_ms:0",
    "ARROW_DEFAULT_MEMORY_POOL": "system",
    "MALLOC_ARENA_MAX": "2",
}


# For builds that allocate and free many small frames (a table's cube, margin by margin):
# returning every freed page at once made the 30M-row claims table's protection 1.8x
# slower than in the server process (183 s against 103-125 s); after a second, 1.4x
# (145 s), and the child still stays far under its cap.
ALLOCATOR_LAZY = {**ALLOCATOR, "_RJEM_MALLOC_CONF": "dirty_decay_ms:1000,muzzy_decay_ms:1000"}


class BuildFailed(Exception):
    """The build child failed (out of its memory limit, killed, or an error of its own)."""


class Children:
    """The build children one store runs: each run waits for its child; `kill` ends them all."""

    def __init__(self) -> None:
        self._guard = threading.Lock()
        self._running: set[subprocess.Popen] = set()

    def run(
        self, module: str, request: dict, what: str, memory_limit_bytes: int, allocator: dict = ALLOCATOR
    ) -> dict:
        """Run `python -m module` with the request on stdin; its last line of JSON, or BuildFailed."""
        environment = dict(os.environ)
        # The child imports this very tree of dataops, whatever the working directory.
        package_root = str(Path(__file__).resolve().parents[2])
        environment["PYTHONPATH"] = os.pathsep.join(
            p for p in (package_root, environment.get("PYTHONPATH")) if p
        )
        environment.update(allocator)
        child = subprocess.Popen(
            [sys.executable, "-m", module],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=environment,
            start_new_session=True,  # a Ctrl-C at the server's terminal is the server's to handle
        )
        with self._guard:
            self._running.add(child)
        try:
            out, err = child.communicate(json.dumps(request).encode())
        finally:
            with self._guard:
                self._running.discard(child)
        if child.returncode != 0:
            # Enough lines for a polars error's message above its context stack.
            tail = err.decode(errors="replace").strip().splitlines()[-12:]
            cause = (
                f"killed by signal {-child.returncode}"
                if child.returncode < 0
                else f"exit status {child.returncode}"
            )
            raise BuildFailed(
                f"the build of {what} failed ({cause}, memory limit {memory_limit_bytes / 2**30:.2f} GiB): "
                f"{' | '.join(tail) or 'no message'}"
            )
        try:
            return json.loads(out.decode().strip().splitlines()[-1])
        except (ValueError, IndexError):
            raise BuildFailed(f"the build of {what} did not report its result") from None

    def kill(self, timeout: float) -> None:
        """Kill every running child and wait for them (a child never interrupts native code here)."""
        with self._guard:
            children = list(self._running)
        for child in children:
            child.kill()
        deadline = time.monotonic() + timeout
        for child in children:
            try:
                child.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("the build process %d did not stop", child.pid)


def cap_memory(limit_bytes: int) -> None:
    """In a child, before polars is imported: its allocator and thread pool live under the cap too.

    The cap is RLIMIT_DATA: the heap and every private writable mapping, which is all
    the memory the build itself allocates. Not RLIMIT_AS, the address space: polars
    maps a local Parquet file whole to read it, so under an address-space cap a source
    larger than the cap could not be read at all (the 1.5 billion claim rows, 24 GB,
    failed under 4 GiB with "Cannot allocate memory"). The file's pages are the page
    cache's, which the kernel reclaims; polars drops the mapping once a slice is read.
    """
    import resource

    if limit_bytes > 0:
        resource.setrlimit(resource.RLIMIT_DATA, (limit_bytes, limit_bytes))


DEFAULT_MEMORY_LIMIT_BYTES = 4 * 2**30  # a build child's memory (RLIMIT_DATA), unless configured


def rows_if_reloadable(dataset) -> int | None:
    """The dataset's row count if a child can load it again from its catalog entry; None
    for one made in code (tests: only this process knows it) or whose file cannot be read
    here (the build in this process reports what is wrong with it)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if dataset.sandbox is None or dataset.source.suffix != ".toml":
        return None
    try:
        return int(pq.ParquetFile(dataset.path).metadata.num_rows)
    except (OSError, pa.ArrowInvalid):
        return None


def entry_request(dataset) -> dict:
    """What a child needs to load the dataset's catalog entry again, and to check it."""
    return {
        "catalog_entry": str(dataset.source),
        "sandbox": str(dataset.sandbox),
        "dataset_terms": repr(dataset),
    }


def entry_again(request: dict):
    """In a child: the catalog entry loaded again; SystemExit if it is not the one the
    server holds (edited since: the build would be of other terms than asked for)."""
    from dataops.catalog import load_entry

    dataset = load_entry(Path(request["catalog_entry"]), Path(request["sandbox"]))
    if repr(dataset) != request["dataset_terms"]:
        raise SystemExit(f"the catalog entry of {dataset.id} changed since the server loaded it")
    return dataset


def child_main(build: Callable[[dict], dict], what: str) -> int:
    """A build child's whole life: read the request from stdin, cap memory (before the
    build imports polars), build, and print its stats as one JSON line. Exit 3 when the
    build ran out of its memory limit."""
    request = json.loads(sys.stdin.read())
    cap_memory(int(request["memory_limit_bytes"]))
    try:
        stats = build(request)
    except MemoryError:
        print(f"the {what} ran out of its memory limit", file=sys.stderr)
        return 3
    print(json.dumps(stats), flush=True)
    return 0
