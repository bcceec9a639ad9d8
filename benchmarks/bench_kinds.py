"""Server CPU per request, by kind of request, and the throughput ceiling it sets.

    PYTHONPATH=src:benchmarks python benchmarks/bench_kinds.py [--claims 500000]
        [--enterprises 100000] [--requests 300] [--before SRC]

Throughput on a shared two-core machine moves with whatever else runs; the CPU a request
costs the server moves much less. This runs `dataops serve` (lanes on, as bench_lanes
runs it) on bench_load's work directory, then sends each kind of bench_load's mix from one
client thread, one request at a time, and reads the server's CPU time (all its threads
and its child processes: the audit signer) from /proc before and after. Printed per kind:

- server CPU per request, and its ratio to a health-check RPC's (raw call, no audit,
  measured the same way in the same run: the floor any RPC pays);
- the client's wall-time p50;
- the weighted mean over bench_load's mix as bench_lanes sends it (the three demo
  consumers in turn), each kind's share of it, and the ceiling it sets: the cores of
  this machine over the mean CPU per request, the most req/s the server could answer on
  this mix if the client cost nothing. A target above the ceiling cannot be met on this
  machine by scheduling; only by making the kinds that dominate the mean cheaper.

`--before SRC` runs the same on a server from another source tree (`git archive <rev>
src | tar -x -C DIR`, then DIR/src) first, and prints the ratios now / before per kind.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections import Counter
from pathlib import Path

import bench_lanes as lanes
import bench_load as load
from dataops.demo.session import CONSUMERS


def cpu_seconds(pid: int) -> float:
    """User + system CPU of a process, its threads and its live children."""
    ticks = os.sysconf("SC_CLK_TCK")
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    total = 0
    for p in [pid, *map(int, children)]:
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
        except FileNotFoundError:  # a child that ended between the listing and the read
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime (after the comm field)
    return total / ticks


def per_request(pid: int, action, n: int) -> tuple[float, list[float]]:
    """(server CPU seconds per call, each call's wall seconds) over n sequential calls."""
    walls = []
    before = cpu_seconds(pid)
    for _ in range(n):
        started = time.perf_counter()
        action()
        walls.append(time.perf_counter() - started)
    return (cpu_seconds(pid) - before) / n, walls


def run_server(args, workdir: Path, name: str, src: Path | None) -> tuple[dict, float]:
    """{(consumer, kind): (cpu s, wall p50 s, outcome codes)} and the health RPC's CPU per call."""
    # A fresh ledger, release store and log for each server (data, copies and tables are
    # kept): both are asked the same questions, and each question is fresh to each.
    load.prepare_workdir(args)
    server, config, pki = lanes.start_server(args, workdir, True, f"server-kinds-{name}.log", src)
    results: dict[tuple[str, str], tuple[float, float, Counter]] = {}
    try:
        consumers = [load.Consumer(server.target, pki, c, args.seed, load.WARMUP_BUDGET) for c in CONSUMERS]
        lanes.ready(consumers)
        for consumer in consumers:  # the repeated questions, released once: later asks are reuses
            for question in load.REPEATED.get(consumer.consumer, []):
                consumer.request("dp.prime", "prime", question)
        for consumer in consumers:
            # A re-served release needs no serving copy, a fresh one does: wait for every
            # copy before measuring anything (a server from other code may find a copy in
            # another layout and build it again, in a child whose CPU would be counted).
            for _ in range(180 if consumer.consumer in load.REPEATED else 0):
                if consumer.request("dp.fresh", "ready").code != "UNAVAILABLE":
                    break
                time.sleep(1.0)
        prober = load.HealthProber(server.target, pki)
        for _ in range(20):
            prober.check()
        health, _ = per_request(server.proc.pid, prober.check, args.requests * 4)
        prober.client.close()
        for consumer in consumers:
            for kind in consumer.mix:
                for _ in range(5):  # warm: the first of a kind may compile or load
                    consumer.request(kind, "warm-up")
                outcomes: list[load.Outcome] = []

                def ask(who: load.Consumer = consumer, k: str = kind, out: list = outcomes) -> None:
                    out.append(who.request(k, "run"))

                cpu, walls = per_request(server.proc.pid, ask, args.requests)
                unexpected = [o for o in outcomes if o.problem]
                if unexpected:
                    raise SystemExit(f"{consumer.consumer} {kind}: {unexpected[0].problem}")
                codes = Counter(o.reason or o.code for o in outcomes)
                results[consumer.consumer, kind] = (cpu, load.percentile(walls, 0.5), codes)
                print(
                    f"  {name:6} {consumer.consumer:17} {kind:20} server CPU {cpu * 1e3:7.2f} ms "
                    f"({cpu / health:5.1f}x health)  wall p50 {load.ms(load.percentile(walls, 0.5))} ms  "
                    f"{dict(codes)}",
                    flush=True,
                )
        for consumer in consumers:
            consumer.close()
    finally:
        server.terminate(timeout=config.server.grace_seconds + 30)
    print(f"  {name:6} health-check RPC: server CPU {health * 1e3:.2f} ms per call")
    return results, health


def mix_mean(results: dict) -> tuple[float, dict[str, float]]:
    """Mean server CPU per request of bench_load's mix as bench_lanes sends it, and each kind's share."""
    weighted: Counter = Counter()
    weights = 0.0
    for consumer in CONSUMERS:  # client threads take the consumers in turn: equal shares
        mix = load.RIVER_MIX if consumer == "river-bank" else load.MIX
        total = sum(mix.values())
        for kind, weight in mix.items():
            weighted[kind] += results[consumer, kind][0] * weight / total
        weights += 1
    mean = sum(weighted.values()) / weights
    return mean, {kind: cpu / weights / mean for kind, cpu in weighted.items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--claims", type=int, default=500_000)
    parser.add_argument("--enterprises", type=int, default=100_000)
    parser.add_argument(
        "--requests", type=int, default=300, help="sequential requests per kind (default 300)"
    )
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--scan-slots", type=int, default=2)
    parser.add_argument("--seed", type=int, default=20261203)
    parser.add_argument(
        "--before", type=Path, metavar="SRC", help="also measure a server from this source tree"
    )
    args = parser.parse_args()
    if args.before is not None and not (args.before / "dataops" / "__init__.py").exists():
        parser.error(f"--before {args.before}: no dataops package there")
    args.consumers = len(CONSUMERS)
    workdir = load.prepare_workdir(args)  # made once here; each server's run resets its state
    print(f"\n{os.cpu_count()} CPUs; load average at start {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print(
        f"data: {args.claims:,} claim rows, {args.enterprises:,} enterprises; {args.requests} requests per kind"
    )
    before = run_server(args, workdir, "before", args.before.resolve()) if args.before else None
    now, health = run_server(args, workdir, "now", None)

    mean, shares = mix_mean(now)
    cores = os.cpu_count() or 1
    print("\n== bench_load's mix, as bench_lanes sends it ==")
    print(f"  mean server CPU per request: {mean * 1e3:.2f} ms ({mean / health:.1f}x a health-check RPC)")
    for kind, share in sorted(shares.items(), key=lambda item: -item[1]):
        print(f"    {kind:20} {share * 100:5.1f}% of it")
    ceiling = cores / mean
    print(
        f"  ceiling on this machine: {cores} cores / {mean * 1e3:.2f} ms = {ceiling:.0f} req/s, before the "
        f"client's own CPU (bench_lanes' target: {lanes.TARGET_RPS:g} req/s)"
    )
    if before is not None:
        before_results, _ = before
        before_mean, _ = mix_mean(before_results)
        print("\n== ratios, server CPU per request now / before (same run, same data) ==")
        for key in now:
            print(f"  {key[0]:17} {key[1]:20} {now[key][0] / before_results[key][0]:6.2f}x")
        print(
            f"  mix mean: {mean / before_mean:.2f}x; ceiling {cores / before_mean:.0f} -> {ceiling:.0f} req/s"
        )
    print(f"  load average at end {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
