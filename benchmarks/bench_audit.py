"""Audit log costs: group commit throughput, the durable append each request pays, verifying a large log.

    PYTHONPATH=src python benchmarks/bench_audit.py [--records 1000000] [--appends 2000] [--dir DIR]
        [--calls 20000] [--threads 64]

Group commit: `--threads` threads append `--calls` small records through `AuditLog`
with the real signer process (as `dataops serve` runs it), and the same through the
ledger (`reserve`); each is printed next to a baseline from the same run with one
fsync (and, for the log, one signature) per record — the same code with the callers
serialised, and the ledger with SQLite's own fsync in every COMMIT.

The append figures are mostly the disk's fsync latency, so run it on the file system
the state directory lives on (--dir). They are printed next to two baselines measured
in the same run: a plain json.dumps + write (what a log without durability or chain
would cost) and the same plus fsync (the floor any durable log pays). The large log is
written with fsync off (generation speed only), from 64 threads, with default
checkpoints and segments.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from dataops.audit import AuditLog, verify_log
from dataops.audit.log import segment_paths
from dataops.audit.sample import sample_records
from dataops.audit.signer import LocalSigner, SignerClient, spawn_signer
from dataops.ledger import Ledger
from dataops.values import PrivacyLoss

SMALL = {
    "consumer": "city-bank",
    "method": "GetBudget",
    "decision": "allowed",
    "code": "OK",
    "epsilon_spent": 0.0,
    "delta_spent": 0.0,
    "latency_ms": 0.4,
}


def _throughput(call, calls: int, threads: int) -> float:
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(lambda _: call(), range(min(calls, 200))))  # warm up
        t0 = time.perf_counter()
        list(pool.map(lambda _: call(), range(calls)))
        return calls / (time.perf_counter() - t0)


def bench_group_commit(root: Path, calls: int, threads: int) -> None:
    rates = {}
    for name, serial in (("one fsync + signature per record (serialised)", True), ("group commit", False)):
        directory = root / ("serial" if serial else "group")
        process = spawn_signer(directory / "signer", "bench")  # one signer per log
        signer = SignerClient(process.socket_path)
        try:
            log = AuditLog(directory / "audit" / "audit.jsonl", signer=signer)
            gate = threading.Lock()

            def append(log=log, gate=gate, serial=serial):
                if serial:
                    with gate:
                        log.append(SMALL)
                else:
                    log.append(SMALL)

            rates[name] = _throughput(append, calls // 4 if serial else calls, threads)
            log.close()
            assert verify_log(log.directory, signer.public_key).ok
        finally:
            signer.close()
            process.stop()
    base = rates["one fsync + signature per record (serialised)"]
    print(f"audited small calls, {threads} threads, fsync on, signer process:")
    for name, rate in rates.items():
        print(f"  {name:48s} {rate:9,.0f} calls/s   x{rate / base:5.1f}")

    ledger_rates = {}
    for name, group in (("SQLite fsync in every COMMIT", False), ("group commit", True)):
        ledger = Ledger(root / f"ledger-{group}.sqlite3", group_commit=group)
        counter = iter(range(10**9))

        def reserve(ledger=ledger, counter=counter):
            r = ledger.reserve(
                f"c{next(counter) % 16}",
                "d",
                1e-6,
                0.0,
                grant_total=PrivacyLoss(1e5, 0.0),
                dataset_total=PrivacyLoss(1e5, 0.0),
            )
            ledger.commit(r)

        # Fewer calls and threads for the ledger: serialised on SQLite's write lock, the
        # baseline would otherwise starve some threads past the 30 s busy timeout.
        ledger_rates[name] = _throughput(reserve, calls // 20 if group else calls // 80, min(threads, 16))
        ledger.close()
    base = ledger_rates["SQLite fsync in every COMMIT"]
    print(f"ledger reserve + commit, {min(threads, 16)} threads:")
    for name, rate in ledger_rates.items():
        print(f"  {name:48s} {rate:9,.0f} debits/s   x{rate / base:5.1f}")


def summary(samples: list[float]) -> tuple[float, float]:
    ordered = sorted(samples)
    return statistics.median(ordered), ordered[int(0.99 * (len(ordered) - 1))]


def bench_append(root: Path, n: int) -> None:
    records = list(sample_records(n, seed=1))
    fd = os.open(root / "plain.jsonl", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o640)

    def plain(record):
        os.write(fd, json.dumps(record).encode() + b"\n")

    def plain_fsync(record):
        plain(record)
        os.fsync(fd)

    log = AuditLog(
        root / "durable" / "audit.jsonl", signer=LocalSigner(root / "durable-signer"), checkpoint_seconds=None
    )
    writers = {
        "baseline: json.dumps + write": plain,
        "baseline: json.dumps + write + fsync": plain_fsync,
        "AuditLog.append (fsync + tree + signature)": log.append,
    }
    # Interleaved, so that the disk's good and bad moments fall on all three alike.
    results: dict[str, list[float]] = {name: [] for name in writers}
    for record in records:
        for name, write in writers.items():
            t0 = time.perf_counter()
            write(record)
            results[name].append(time.perf_counter() - t0)
    log.close()
    os.close(fd)
    base, base_fsync = (statistics.median(results[k]) for k in list(results)[:2])
    print(f"per-request append, n={n}:")
    for name, samples in results.items():
        median, p99 = summary(samples)
        print(
            f"  {name:38s} median {median * 1e3:7.3f} ms   p99 {p99 * 1e3:7.3f} ms   "
            f"x{median / base:6.1f} plain   x{median / base_fsync:4.2f} plain+fsync"
        )


def bench_verify(root: Path, n: int) -> None:
    directory = root / "large"
    log = AuditLog(
        directory / "audit.jsonl",
        signer=LocalSigner(root / "large-signer"),
        fsync=False,
        checkpoint_seconds=None,
    )
    t0 = time.perf_counter()
    records = list(sample_records(n, seed=2))
    with ThreadPoolExecutor(64) as pool:  # concurrent appends: one signature per batch, as under load
        list(pool.map(log.append, records, chunksize=256))
    log.close()
    generated = time.perf_counter() - t0
    segments = segment_paths(directory / "audit.jsonl")
    size = sum(p.stat().st_size for p in segments)
    print(
        f"generated {n:,} records ({size / 2**20:,.0f} MiB in {len(segments)} segments) in {generated:.1f} s "
        f"({n / generated:,.0f} records/s, fsync off)"
    )
    t0 = time.perf_counter()
    result = verify_log(directory, log.public_key)
    elapsed = time.perf_counter() - t0
    assert result.ok and result.records == n, result.problems
    print(
        f"verify_log: {n:,} records, {len(result.checkpoints):,} checkpoints in {elapsed:.1f} s "
        f"({n / elapsed:,.0f} records/s, {size / 2**20 / elapsed:,.0f} MiB/s)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=200_000, help="size of the log to verify")
    parser.add_argument("--appends", type=int, default=2000, help="durable appends to time")
    parser.add_argument("--dir", type=Path, default=None, help="where to write (default: a temp dir)")
    parser.add_argument("--calls", type=int, default=20_000, help="small calls for the group-commit figures")
    parser.add_argument("--threads", type=int, default=64, help="concurrent callers")
    parser.add_argument(
        "--only-group-commit", action="store_true", help="skip the per-append and verify parts"
    )
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        bench_group_commit(Path(tmp), args.calls, args.threads)
        if args.only_group_commit:
            return
        bench_append(Path(tmp), args.appends)
        bench_verify(Path(tmp), args.records)


if __name__ == "__main__":
    main()
