"""One consumer floods the server with heavy DP queries; how long does another consumer wait?

    PYTHONPATH=src python benchmarks/bench_flood.py [--flood 24] [--enterprises 200000] [--repeats 5]

In one run, against the real server over loopback mTLS with the default `[server]` and
`[limits]` (8 engine workers, 32 requests in flight, 4 per consumer), it times
harbor-insurance's DP query on medical_claims three ways: alone (the baseline), while
city-bank has `--flood` maximum-size DP queries in flight with the admission caps on,
and the same with the per-consumer cap lifted (as main had it). It prints medians and
ratios to the baseline, how city-bank's requests ended, and checks that the audit log
holds exactly one record per request sent. Both CPUs are shared: compare ratios.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from dataops.certs import init_authority, issue_consumer
from dataops.client import Client, DataopsClientError, count, mean, quantile, total
from dataops.config import load_config
from dataops.demo.generate import generate
from dataops.server import build_server

REPO = Path(__file__).resolve().parent.parent


def prepare(enterprises: int) -> Path:
    data = REPO / "benchmarks" / ".data" / f"flood-{enterprises}"
    if not (data / "sandbox").exists():
        generate(data / "sandbox", enterprises=enterprises, claims=max(100_000, enterprises))
    if not (data / "pki" / "ca.key").exists():
        init_authority(data / "pki")
        for consumer in ("city-bank", "harbor-insurance"):
            issue_consumer(data / "pki", consumer)
    return data


def workdir(data: Path, name: str, extra_limits: str) -> Path:
    work = data / name
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()
    for sub in ("catalog", "policies"):
        shutil.copytree(REPO / sub, work / sub)
    (work / "dataops.toml").write_text(f"""
[server]
listen = "127.0.0.1:0"
[paths]
catalog = "catalog"
policies = "policies"
sandbox = {json.dumps(str(data / "sandbox"))}
state = "state"
[tls]
ca_cert = {json.dumps(str(data / "pki" / "ca.crt"))}
server_cert = {json.dumps(str(data / "pki" / "server.crt"))}
server_key = {json.dumps(str(data / "pki" / "server.key"))}
[limits]
rate_per_minute = 6000000
rate_burst = 1000000
{extra_limits}
""")
    return work


def run(data: Path, name: str, extra_limits: str, flood: int, repeats: int) -> dict:
    work = workdir(data, name, extra_limits)
    server = build_server(load_config(work / "dataops.toml")).start()
    target = f"localhost:{server.port}"
    eps = iter(range(1, 1_000_000))
    try:
        harbor = Client.from_directory(
            target, data / "pki" / "consumers" / "harbor-insurance", "harbor-insurance", timeout=120
        )
        city = Client.from_directory(
            target, data / "pki" / "consumers" / "city-bank", "city-bank", timeout=120
        )

        def other() -> float:
            started = time.perf_counter()
            harbor.query(
                "medical_claims",
                aggregates=[count(), total("amount")],
                group_by=["sex"],
                mode="dp",
                epsilon=0.01 + next(eps) * 1e-7,
            )
            return time.perf_counter() - started

        other()  # warm
        alone = [other() for _ in range(repeats)]

        def heavy(i: int) -> str:
            try:
                city.query(
                    "enterprise_credit",
                    aggregates=[
                        count(),
                        total("tax_paid"),
                        mean("registered_capital"),
                        quantile("tax_paid", 0.9),
                    ],
                    group_by=["district", "industry", "size_band"],
                    mode="dp",
                    epsilon=0.01 + i * 1e-6,
                )
                return "OK"
            except DataopsClientError as exc:
                return f"{exc.code.name}:{exc.rule}"

        with ThreadPoolExecutor(flood) as pool:
            futures = [pool.submit(heavy, i) for i in range(flood)]
            time.sleep(0.2)
            during = []
            while len(during) < repeats and not all(f.done() for f in futures):
                during.append(other())
            outcomes = Counter(f.result() for f in futures)
        harbor.close()
        city.close()
    finally:
        server.stop(5.0)
    records = [
        json.loads(line)
        for line in (work / "state" / "audit" / "audit.jsonl").read_bytes().split(b"\n")
        if line
    ]
    sent = 1 + repeats + len(during) + flood
    return {"alone": alone, "during": during, "outcomes": outcomes, "records": len(records), "sent": sent}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--flood", type=int, default=24)
    parser.add_argument("--enterprises", type=int, default=200_000)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    data = prepare(args.enterprises)
    capped = run(data, "capped", "", args.flood, args.repeats)
    uncapped = run(
        data,
        "uncapped",
        f"max_in_flight_per_consumer = {args.flood}\nmax_in_flight = {args.flood * 2}",
        args.flood,
        args.repeats,
    )
    baseline = statistics.median(capped["alone"])
    print(f"harbor-insurance DP query alone: median {baseline * 1000:.1f} ms")
    for name, result in (("caps on (defaults)", capped), ("per-consumer cap lifted", uncapped)):
        if result["during"]:
            during = statistics.median(result["during"])
            print(
                f"  during the flood, {name}: median {during * 1000:.1f} ms = {during / baseline:.1f}x "
                f"alone ({len(result['during'])} samples)"
            )
        else:
            print(f"  during the flood, {name}: the flood ended before a sample")
        print(f"    city-bank's {args.flood} requests: {dict(result['outcomes'])}")
        verdict = "PASS" if result["records"] == result["sent"] else "FAIL"
        print(f"    {verdict}: {result['records']} audit records for {result['sent']} requests sent")


if __name__ == "__main__":
    main()
