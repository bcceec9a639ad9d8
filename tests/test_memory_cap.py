"""The build children's memory cap (`dataops.engines.children.cap_memory`).

A build child must be able to read a source far larger than its cap (polars maps a
local Parquet file whole to read it: the 1.5 billion claim rows are 24 GB under a
4 GiB cap), and must still fail when it allocates past the cap. Each case runs in a
fresh interpreter, since a cap cannot be lifted once set.

Switched off to the address-space cap it replaced (RLIMIT_AS), mapping the large file
fails: what made the 1.5 billion row build fail with "Cannot allocate memory".
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

CAP = 256 * 2**20

CHILD = """
import mmap, resource, sys
from dataops.engines.children import cap_memory
cap, path, limit = int(sys.argv[1]), sys.argv[2], sys.argv[3]
if limit == "data":
    cap_memory(cap)
else:  # the control switched off: the address space capped instead
    resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
try:
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
        # Touch a page in every MiB: the mapping is read, not only reserved.
        touched = sum(mapped[i] for i in range(0, len(mapped), 2**20))
    print("mapped", touched)
except OSError as exc:
    print("map failed", exc.errno)
try:
    held = bytearray(2 * cap)
    print("allocated", len(held))
except MemoryError:
    print("allocation failed")
"""


def _run(tmp_path: Path, limit: str) -> list[str]:
    big = tmp_path / "source.parquet"
    with open(big, "wb") as f:
        f.truncate(4 * CAP)  # a source four times the cap (sparse: no disk used)
    done = subprocess.run(
        [sys.executable, "-c", CHILD, str(CAP), str(big), limit],
        capture_output=True, text=True, timeout=120, check=True,
    )  # fmt: skip
    return done.stdout.split("\n")


def test_a_capped_child_reads_a_file_larger_than_its_cap_and_cannot_allocate_past_it(tmp_path: Path) -> None:
    lines = _run(tmp_path, "data")
    assert lines[0] == "mapped 0"  # a sparse file reads as zeros
    assert lines[1] == "allocation failed"


def test_switched_off_to_an_address_space_cap_the_large_file_cannot_be_read(tmp_path: Path) -> None:
    lines = _run(tmp_path, "address-space")
    assert lines[0].startswith("map failed")
    assert lines[1] == "allocation failed"
