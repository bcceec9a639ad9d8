"""bench_lanes' mix against N `dataops serve` replicas on one host and one port.

    PYTHONPATH=src:benchmarks:tests python benchmarks/bench_replicas.py [--replicas 2]
        [--threads 2 8 16] [--rounds 2] [--seconds 6] [--claims 500000] [--enterprises 100000]

One server process answers with one interpreter lock for the Python half of every
request. Replicas on the same host share the budgets, stored releases, consent counts
and rate limits in PostgreSQL (docs/scale-out.md) and listen on the same address:
gRPC binds with SO_REUSEPORT on Linux, so the kernel spreads new connections over the
processes and each client channel (one connection) stays on one replica, which keeps
the audit witness's connection affinity.

It starts its own PostgreSQL (tests/pg_support.py) with fsync on, prepares bench_load's
work directory and, per round, runs the baseline (one replica on PostgreSQL) and then
`--replicas` replicas, each with its own state and audit origin, on a fresh database;
at each `--threads` level the demo consumers in turn send the mix for `--seconds`. It
prints req/s, p50/p99 overall and for DP, the servers' CPU, and the ratios N replicas /
one replica, round by round (the machine's speed drifts between rounds: compare within
a round).
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

import bench_lanes as lanes  # noqa: E402
import bench_load as load  # noqa: E402
from bench_kinds import cpu_seconds  # noqa: E402
from dataops.config import load_config  # noqa: E402
from dataops.demo.session import CONSUMERS  # noqa: E402
from pg_support import PostgresCluster  # noqa: E402

# What each replica builds and writes for itself: everything in state/ but its PKI and
# the consent service, which all replicas share (they are the same server to clients).
PER_REPLICA = ("prepared", "prepared.key", "tables", "audit", "ledger", "subjects", "consents")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def replica_dir(base: Path, i: int, url: str, port: int, args: argparse.Namespace) -> Path:
    """A copy of the work directory for replica i: same data, policies and PKI, its own
    state and audit origin, the shared database and the one port. Returns its toml."""
    work = base.parent / f"replica-{i}"
    if work.exists():
        shutil.rmtree(work)
    shutil.copytree(base, work, ignore=shutil.ignore_patterns("*.log", *PER_REPLICA), symlinks=True)
    toml = lanes.configure(work, True, args.scan_slots, args.workers)
    text = toml.read_text().replace('listen = "127.0.0.1:0"', f'listen = "127.0.0.1:{port}"')
    if f":{port}" not in text:
        raise SystemExit(f"{toml}: no loopback listen line to set the shared port in")
    text += f'\n[ledger]\nurl = "{url}"\n\n[audit]\norigin = "dataops-replica-{i}"\n'
    toml.write_text(text)
    return toml


def prime(target: str, pki: Path, replicas: int, seed: int) -> None:
    """Wait until every replica serves (fresh channels land on any of them), and release
    the repeated questions once: the store is shared, so later asks are reuses anywhere."""
    for attempt in range(4 * replicas):
        primers = [load.Consumer(target, pki, c, seed + attempt, load.WARMUP_BUDGET) for c in CONSUMERS]
        lanes.ready(primers)
        for primer in primers:
            if attempt == 0:
                for question in load.REPEATED.get(primer.consumer, []):
                    primer.request("dp.prime", "prime", question)
            primer.close()


def run(args: argparse.Namespace, base: Path, pg: PostgresCluster, replicas: int, rnd: int) -> dict:
    url, port = pg.new_database(), free_port()
    tomls = [replica_dir(base, i, url, port, args) for i in range(replicas)]
    pki = load_config(tomls[0]).tls.ca_cert.parent
    servers = []
    results: dict[int, dict] = {}
    try:
        servers = [load.Server(t, t.parent / "server.log") for t in tomls]
        target = servers[0].target
        prime(target, pki, replicas, args.seed + 99 * rnd)
        for threads in args.threads:
            seed = args.seed + 1000 * threads + 100_000 * rnd + 10_000 * replicas
            consumers = [
                load.Consumer(target, pki, CONSUMERS[i % len(CONSUMERS)], seed + i, load.WARMUP_BUDGET)
                for i in range(threads)
            ]
            load.run_phase("warm-up", min(1.0, args.seconds), consumers)
            cpu0 = sum(cpu_seconds(s.proc.pid) for s in servers)
            outcomes, _, elapsed = load.run_phase("run", args.seconds, consumers)
            cpu1 = sum(cpu_seconds(s.proc.pid) for s in servers)
            for consumer in consumers:
                consumer.close()
            r = results[threads] = {**lanes.summarize(outcomes, elapsed), "cores": (cpu1 - cpu0) / elapsed}
            plural = "s" if replicas > 1 else " "
            lanes.print_level(
                f"round {rnd} {replicas} replica{plural} {threads:3} threads, {r['cores']:.2f} cores", r
            )
    finally:
        for server in servers:
            server.terminate(timeout=60)
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--replicas", type=int, default=2, help="replicas on the one port (default 2)")
    parser.add_argument("--threads", type=int, nargs="+", default=[2, 8, 16])
    parser.add_argument("--rounds", type=int, default=2, help="baseline then replicas, this many times")
    parser.add_argument("--seconds", type=float, default=6.0)
    parser.add_argument("--claims", type=int, default=500_000)
    parser.add_argument("--enterprises", type=int, default=100_000)
    parser.add_argument(
        "--scan-slots", type=int, default=4, help="[server] scan_slots (default 4, the server's)"
    )
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--seed", type=int, default=20261204)
    args = parser.parse_args()
    if args.replicas < 2 or args.rounds < 1 or not 0 < args.seconds <= 600:
        parser.error("need --replicas >= 2, --rounds >= 1 and 0 < --seconds <= 600")
    args.consumers = max(args.threads)
    base = load.prepare_workdir(args)
    print(f"\n{os.cpu_count()} CPUs; load average at start {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    pg = PostgresCluster(fsync=True)
    try:
        rounds = []
        for rnd in range(args.rounds):
            one = run(args, base, pg, 1, rnd)
            many = run(args, base, pg, args.replicas, rnd)
            rounds.append((one, many))
    finally:
        pg.stop()
    print(f"\n== ratios, {args.replicas} replicas / 1 replica (same round, same data, both on PostgreSQL) ==")
    print(f"  {'round':>5} {'threads':>7} {'req/s':>8} {'p50':>8} {'p99':>8} {'DP p99':>8} {'cores':>8}")
    for rnd, (one, many) in enumerate(rounds):
        for n in args.threads:
            a, b = many[n], one[n]
            cells = [
                a[k] / b[k] if b[k] else float("nan") for k in ("rps", "p50", "p99", "scan_p99", "cores")
            ]
            print(f"  {rnd:5} {n:7} " + " ".join(f"{c:7.2f}x" for c in cells))
    best = max(
        (many[n] for _, many in rounds for n in args.threads if many[n]["p99"] < lanes.TARGET_P99),
        key=lambda r: r["rps"],
        default=None,
    )
    if best is not None:
        print(f"\n  best with {args.replicas} replicas and p99 < 200 ms: {best['rps']:.1f} req/s")
    print(f"  load average at end {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
