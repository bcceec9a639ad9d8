"""Mixed load over 1-16 client threads: admission lanes against one shared lane.

    PYTHONPATH=src python benchmarks/bench_lanes.py [--claims 500000] [--enterprises 100000]
        [--seconds 6] [--threads 1 2 4 8 16] [--scan-slots 2]

The issue 12 target: >= 300 req/s on the mixed load with p99 < 200 ms, now that exact
answers are table lookups. It prepares the load harness's demo work directory
(`bench_load.prepare_workdir`: benchmarks/.data/load-<claims>-<enterprises>, data and
certificates reused, state fresh), then runs `dataops serve` twice as a subprocess on
the same data, the same policies and the same [limits]:

- **lanes**: `[server] lanes = true`, `scan_slots = --scan-slots`: DP queries wait in
  their own lane, admitted by their datasets' row counts; cheap calls never wait there;
- **shared** (the baseline, measured in the same run): `lanes = false`, every call in
  one lane counted by `[limits] max_in_flight` alone, as before lanes.

On each, for every `--threads` level, that many client threads (the demo consumers in
turn, each its own `Client`) send bench_load's mix for `--seconds`: catalog calls,
exact aggregates (table lookups), fresh and repeated DP queries, estimates, budget
reads and requests that must be refused; every outcome is checked as bench_load
checks it. It prints per level the throughput and p50/p99 overall, for the cheap lane's
calls and for DP-mode queries, the ratios lanes / shared, an idle health-check RPC
(raw call, no audit) as a second baseline, and the load average (the machine is shared).
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time
from collections import Counter
from pathlib import Path

import bench_load as load
from dataops.client import count, count_units, mean, total
from dataops.config import load_config
from dataops.demo.session import CONSUMERS
from dataops.ir import Equals, InSet

# Requests in DP mode, reported apart ("DP"): those that run an engine wait for a slot in
# the scan lane; refusals and re-served releases (planned, but no engine) never do. All
# others are cheap calls.
SCAN_KINDS = {"dp.fresh", "dp.repeat", "dp.prime", "refused.over_budget", "refused.mode"}
NO_ENGINE_KINDS = {"dp.repeat", "refused.over_budget", "refused.mode"}  # DP requests that run no engine
TARGET_RPS, TARGET_P99 = 300.0, 0.200

# Exact answers are lookups in the published tables: bench_load's aggregate questions,
# kept to what the tables cover (their dimensions and measures), so each one is a lookup.
load.CREDIT_MEASURES = [[count_units(), mean("tax_paid")], [count(), total("tax_paid")], [count_units()]]
load.CLAIM_DIMENSIONS = [
    ("age_band",),
    ("age_band", "sex"),
    ("diagnosis_group",),
    ("sex", "visit_type"),
    ("age_band", "diagnosis_group"),
]
load.CLAIM_MEASURES = [[count(), mean("amount")], [count(), total("amount")], [mean("amount")]]
load.CLAIM_FILTERS = [
    [],
    [Equals("visit_type", "inpatient")],
    [Equals("sex", "F")],
    [InSet("age_band", ("45-59", "60-74", "75+")), Equals("visit_type", "outpatient")],
]


def configure(workdir: Path, lanes: bool, scan_slots: int, workers: int, engine_processes: int = 0) -> Path:
    """The work directory's dataops.toml, rewritten for one mode; returns its path."""
    toml = workdir / "dataops.toml"
    text = toml.read_text()
    text = re.sub(
        r"^(lanes|scan_slots|engine_processes|max_in_flight|max_in_flight_per_consumer) = .*\n",
        "",
        text,
        flags=re.M,
    )
    text = re.sub(r"^workers = \d+", f"workers = {workers}", text, count=1, flags=re.M)
    text = text.replace(
        "[server]\n",
        f"[server]\nlanes = {'true' if lanes else 'false'}\nscan_slots = {scan_slots}\n"
        # Only when set: a server from an older tree refuses a key it does not know.
        + (f"engine_processes = {engine_processes}\n" if engine_processes else ""),
        1,
    )
    # Caps far above the client threads: neither lane sheds for a consumer's own count.
    text = text.replace("[limits]\n", "[limits]\nmax_in_flight = 64\nmax_in_flight_per_consumer = 32\n", 1)
    toml.write_text(text)
    return toml


def ready(consumers: list[load.Consumer]) -> None:
    """Exact answers need their protected tables, DP its serving copies: wait for both."""
    for consumer in consumers:
        kind = "catalog.describe" if consumer.consumer == "river-bank" else "dp.prime"
        question = None if kind != "dp.prime" else load.REPEATED[consumer.consumer][0]
        for _ in range(180):
            outcomes = [consumer.request("aggregate", "ready"), consumer.request(kind, "ready", question)]
            if all(o.code == "OK" for o in outcomes):
                break
            wrong = [o for o in outcomes if o.code not in ("OK", "UNAVAILABLE")]
            if wrong:
                raise SystemExit(f"{consumer.consumer}: {wrong[0].kind}: {wrong[0].problem}")
            time.sleep(1.0)
        else:
            raise SystemExit(f"{consumer.consumer}: the server did not become ready in 3 minutes")


def summarize(outcomes: list[load.Outcome], seconds: float) -> dict:
    def pct(samples: list[float], q: float) -> float:
        return load.percentile(samples, q)

    every = [o.seconds for o in outcomes]
    cheap = [o.seconds for o in outcomes if o.kind not in SCAN_KINDS]
    scans = [o.seconds for o in outcomes if o.kind in SCAN_KINDS]
    return {
        "n": len(outcomes),
        "rps": len(outcomes) / seconds,
        "p50": pct(every, 0.5),
        "p99": pct(every, 0.99),
        "cheap_rps": len(cheap) / seconds,
        "cheap_p50": pct(cheap, 0.5),
        "cheap_p99": pct(cheap, 0.99),
        "scan_p50": pct(scans, 0.5),
        "scan_p99": pct(scans, 0.99),
        "no_engine_p50": pct([o.seconds for o in outcomes if o.kind in NO_ENGINE_KINDS], 0.5),
        # How many fresh DP questions ran an engine: once a grant is spent they are cheap
        # refusals, and the level's throughput is another mix's.
        "fresh": sum(1 for o in outcomes if o.kind == "dp.fresh"),
        "fresh_released": sum(1 for o in outcomes if o.kind == "dp.fresh" and o.code == "OK"),
        "unexpected": sum(1 for o in outcomes if o.problem),
        "problems": Counter(f"{o.kind}: {o.problem}" for o in outcomes if o.problem).most_common(3),
        "shed": sum(
            1 for o in outcomes if o.code in ("RESOURCE_EXHAUSTED", "DEADLINE_EXCEEDED") and o.problem
        ),
    }


def print_level(label: str, r: dict) -> None:
    """One level's line (a `summarize` result) and its unexpected outcomes."""
    print(
        f"  {label}: {r['rps']:7.1f} req/s  p50 {load.ms(r['p50'])} ms  "
        f"p99 {load.ms(r['p99'])} ms | cheap p50 {load.ms(r['cheap_p50'])} p99 {load.ms(r['cheap_p99'])} "
        f"| DP p50 {load.ms(r['scan_p50'])} p99 {load.ms(r['scan_p99'])} "
        f"(no engine p50 {load.ms(r['no_engine_p50'])}) | fresh DP released "
        f"{r['fresh_released']}/{r['fresh']} | unexpected {r['unexpected']}"
        f"  (load {os.getloadavg()[0]:.2f})",
        flush=True,
    )
    for problem, n in r["problems"]:
        print(f"      {n} x {problem}")


def start_server(args, workdir: Path, lanes: bool, log_name: str, src: Path | None = None):
    """`dataops serve` on the work directory configured for one mode: (server, config, pki
    directory). src: run it from that source tree (another checkout's src/), not ours."""
    # A server from another tree (--before) may not know engine_processes: it gets none.
    processes = 0 if src is not None else getattr(args, "engine_processes", 0)
    toml = configure(workdir, lanes, args.scan_slots, args.workers, processes)
    config = load_config(toml)
    env = None
    if src is not None:
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(src), os.environ.get("PYTHONPATH", "")])}
    return load.Server(toml, workdir / log_name, env=env), config, config.tls.ca_cert.parent


def run_mode(
    args, workdir: Path, lanes: bool, name: str | None = None, src: Path | None = None
) -> tuple[dict[int, dict], list[float]]:
    """One server's levels. src: run the server from that source tree (another checkout's
    src/), not ours: the code before a change, as a baseline in the same run."""
    name = name or ("lanes" if lanes else "shared")
    server, config, pki = start_server(args, workdir, lanes, f"server-{name}.log", src)
    results: dict[int, dict] = {}
    try:
        prober = load.HealthProber(server.target, pki)
        prober.check()
        health = load.time_it(prober.check, 200)
        prober.client.close()
        primers = [load.Consumer(server.target, pki, c, args.seed, load.WARMUP_BUDGET) for c in CONSUMERS]
        ready(primers)
        for primer in primers:  # the repeated questions, released once: later asks are reuses
            if primer.consumer in load.REPEATED:
                for question in load.REPEATED[primer.consumer]:
                    primer.request("dp.prime", "prime", question)
            primer.close()
        for threads in args.threads:
            # Fresh questions at every level and in each mode (the ledger is shared): no reuse.
            seed = args.seed + {"lanes": 0, "shared": 500_000}.get(name, 250_000) + 1000 * threads
            consumers = [
                load.Consumer(server.target, pki, CONSUMERS[i % len(CONSUMERS)], seed + i, load.WARMUP_BUDGET)
                for i in range(threads)
            ]
            load.run_phase("warm-up", min(1.0, args.seconds), consumers)
            outcomes, _, elapsed = load.run_phase("run", args.seconds, consumers)
            for consumer in consumers:
                consumer.close()
            results[threads] = summarize(outcomes, elapsed)
            print_level(f"{name:6} {threads:3} threads", results[threads])
    finally:
        code, _ = server.terminate(timeout=config.server.grace_seconds + 30)
        if code != 0:
            print(f"  {name}: dataops serve exited {code}; see {server.log_path}")
    return results, health


# (heading, key) of each ratio column.
SHARED_COLUMNS = (
    ("req/s", "rps"), ("p50", "p50"), ("p99", "p99"),
    ("cheap p50", "cheap_p50"), ("cheap p99", "cheap_p99"), ("DP p99", "scan_p99"),
)  # fmt: skip
BEFORE_COLUMNS = SHARED_COLUMNS[:5] + (("DP p50", "scan_p50"), ("DP p99", "scan_p99"))


def ratios(title: str, a_runs: dict, b_runs: dict, threads: list[int], columns) -> None:
    """One line per thread count: each column's figure in run a over run b."""
    print(f"\n== ratios, {title} ==")
    print(f"  {'threads':>7} " + " ".join(f"{heading:>10}" for heading, _ in columns))
    for n in threads:
        a, b = a_runs[n], b_runs[n]
        print(f"  {n:7} " + " ".join(f"{a[key] / b[key]:9.2f}x" for _, key in columns))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--claims", type=int, default=500_000)
    parser.add_argument("--enterprises", type=int, default=100_000)
    parser.add_argument("--seconds", type=float, default=6.0, help="measured seconds per level (default 6)")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    parser.add_argument(
        "--scan-slots", type=int, default=2, help="[server] scan_slots with lanes (default 2)"
    )
    parser.add_argument("--workers", type=int, default=8, help="[server] workers, both modes (default 8)")
    parser.add_argument(
        "--engine-processes",
        type=int,
        default=0,
        help="[server] engine_processes of this tree's servers, both modes (default 0; --before's: 0)",
    )
    parser.add_argument("--seed", type=int, default=20261202)
    parser.add_argument(
        "--before",
        type=Path,
        metavar="SRC",
        help="also run the lanes server from this source tree (e.g. main's src/, from "
        "`git archive main src | tar -x -C DIR`) first, and print ratios to it",
    )
    parser.add_argument(
        "--before-last",
        action="store_true",
        help="run --before's server last, not first (on a machine whose load drifts, run both orders)",
    )
    args = parser.parse_args()
    if not 0 < args.seconds <= 600 or not all(0 < t <= 64 for t in args.threads):
        parser.error("need 0 < --seconds <= 600 and 1..64 threads per level")
    # bench_load's work directory (its own arguments: a consumer per thread at most).
    args.consumers = max(args.threads)
    workdir = load.prepare_workdir(args)
    print(f"\n{os.cpu_count()} CPUs; load average at start {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print(f"data: {args.claims:,} claim rows, {args.enterprises:,} enterprises; {args.seconds:g} s per level")
    before = None
    if args.before is not None and not (args.before / "dataops" / "__init__.py").exists():
        parser.error(f"--before {args.before}: no dataops package there")
    if args.before is not None and not args.before_last:
        before, _ = run_mode(args, workdir, lanes=True, name="before", src=args.before.resolve())
    lanes, lanes_health = run_mode(args, workdir, lanes=True)
    shared, shared_health = run_mode(args, workdir, lanes=False)
    if args.before is not None and args.before_last:
        before, _ = run_mode(args, workdir, lanes=True, name="before", src=args.before.resolve())

    ratios("lanes / shared lane (same run, same data)", lanes, shared, args.threads, SHARED_COLUMNS)
    if before is not None:
        ratios(
            f"lanes now / lanes before ({args.before}; same run, same data)",
            lanes,
            before,
            args.threads,
            BEFORE_COLUMNS,
        )
    health = load.percentile(lanes_health, 0.5)
    print(
        f"\n  idle health-check RPC p50 (raw call, no audit): {load.ms(health)} ms with lanes, "
        f"{load.ms(load.percentile(shared_health, 0.5))} ms shared"
    )
    for threads in args.threads:
        print(
            f"  {threads:3} threads: cheap p50 / idle health p50 = {lanes[threads]['cheap_p50'] / health:.1f}x (lanes), "
            f"{shared[threads]['cheap_p50'] / health:.1f}x (shared)"
        )
    best = max(lanes.values(), key=lambda r: r["rps"])
    met = best["rps"] >= TARGET_RPS and best["p99"] < TARGET_P99
    print(
        f"\n  target >= {TARGET_RPS:g} req/s with p99 < {TARGET_P99 * 1e3:g} ms: best with lanes "
        f"{best['rps']:.1f} req/s, p99 {best['p99'] * 1e3:.1f} ms -> {'MET' if met else 'NOT MET'}"
    )
    print(f"  load average at end {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    unexpected = sum(r["unexpected"] for r in [*lanes.values(), *shared.values(), *(before or {}).values()])
    print(f"  unexpected outcomes: {unexpected}")
    return 1 if unexpected else 0


if __name__ == "__main__":
    sys.exit(main())
