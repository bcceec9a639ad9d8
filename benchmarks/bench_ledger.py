"""Per-request overhead of the budget ledger: reserve + commit, one DP request's worth.

    PYTHONPATH=src python benchmarks/bench_ledger.py [--ops 2000] [--dir DIR]

Each op is two write transactions, each ending in an fsync of the WAL
(synchronous=FULL), so the figure is mostly the disk's fsync latency: run it on the
file system the state directory lives on (--dir).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from dataops.ledger import Ledger
from dataops.values import PrivacyLoss


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ops", type=int, default=2000)
    parser.add_argument(
        "--dir", type=Path, default=None, help="where to put the ledger file (default: a temp dir)"
    )
    parser.add_argument("--payload-bytes", type=int, default=4096, help="size of the stored release")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        ledger = Ledger(Path(tmp) / "ledger.db")
        totals = dict(grant_total=PrivacyLoss(1e6, 1.0), dataset_total=PrivacyLoss(1e6, 1.0))
        payload = b"\0" * args.payload_bytes
        plain, with_release = [], []
        for i in range(args.ops):
            t0 = time.perf_counter()
            r = ledger.reserve("bank", "credit", 0.1, 1e-9, **totals)
            ledger.commit(r)
            t1 = time.perf_counter()
            r = ledger.reserve("bank", "credit", 0.1, 1e-9, **totals)
            ledger.commit(r, release_key=f"{i:064x}", payload=payload, metadata="{}")
            t2 = time.perf_counter()
            plain.append(t1 - t0)
            with_release.append(t2 - t1)
        ledger.close()

    for name, samples in (
        ("reserve+commit", plain),
        (f"reserve+commit+{args.payload_bytes}B release", with_release),
    ):
        samples.sort()
        p99 = samples[int(0.99 * (len(samples) - 1))]
        print(
            f"{name:36s} median {statistics.median(samples) * 1e3:.3f} ms   p99 {p99 * 1e3:.3f} ms   (n={len(samples)})"
        )


if __name__ == "__main__":
    main()
