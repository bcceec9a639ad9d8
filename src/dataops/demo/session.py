"""`dataops demo`: the whole system on embedded defaults, nothing started by hand.

Builds the demo zones (data, catalog, policies), a CA and consumer certificates in a
work directory, starts the real server on loopback with mTLS, plays a short scripted
session for each consumer, prints what each is told, and stops the server cleanly.

The work directory keeps a `dataops.toml`, so afterwards an operator or reviewer can
point any other command at it (`dataops policy check -c demo-work/dataops.toml`).
The data and certificates are reused between runs; the state (audit log, ledger)
starts fresh each run so the session is the same every time.
"""

from __future__ import annotations

import json
import math
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from dataops.certs import init_authority, issue_consumer
from dataops.client import Client, DataopsClientError, count, count_units, mean, median, total
from dataops.config import ServerConfig, load_config
from dataops.consent_service import ConsentService
from dataops.demo.generate import generate
from dataops.ir import Equals

CONSUMERS = ("city-bank", "river-bank", "harbor-insurance")

CONFIG_TEMPLATE = """\
# Written by `dataops demo`: the demo's own server configuration.
[server]
listen = "127.0.0.1:0"   # the demo picks a free loopback port
workers = 4
grace_seconds = 5.0
policy_poll_seconds = 0.5

[limits]
rate_per_minute = 60000  # generous: benchmarks reuse this work directory
rate_burst = 1000

[paths]
catalog = "catalog"
policies = "policies"
sandbox = "sandbox"
state = "state"
products = "products"     # the published tables exact answers are looked up in
"""


def add_demo_parser(sub: Any) -> None:
    p = sub.add_parser(
        "demo",
        help="run the demo: data, certificates, server and a scripted session",
        description=__doc__.splitlines()[0],
    )
    p.add_argument("--workdir", type=Path, default=Path("demo-work"))
    p.add_argument("--claims", type=int, default=1_000_000, help="medical claim rows (default 1M)")
    p.add_argument("--enterprises", type=int, default=200_000)
    p.set_defaults(func=lambda args: run_demo(args.workdir, claims=args.claims, enterprises=args.enterprises))


def defaults(name: str) -> Path:
    """The embedded demo catalog or policies directory."""
    return Path(str(resources.files("dataops.demo") / name))


def prepare(
    workdir: Path, *, claims: int, enterprises: int, out: Callable[[str], None] = print
) -> ServerConfig:
    workdir.mkdir(parents=True, exist_ok=True)
    for name in ("catalog", "policies", "products"):
        shutil.rmtree(workdir / name, ignore_errors=True)
        shutil.copytree(defaults(name), workdir / name)
    (workdir / "dataops.toml").write_text(CONFIG_TEMPLATE)
    config = load_config(workdir / "dataops.toml")

    marker = config.paths.sandbox / ".demo-size.json"
    size = {"claims": claims, "enterprises": enterprises}
    if not marker.exists() or json.loads(marker.read_text()) != size:
        started = time.perf_counter()
        generate(config.paths.sandbox, enterprises=enterprises, claims=claims)
        marker.write_text(json.dumps(size))
        out(
            f"generated {enterprises:,} enterprises and {claims:,} claim rows "
            f"in {time.perf_counter() - started:.1f} s"
        )

    pki = config.tls.ca_cert.parent
    if not config.tls.ca_cert.exists():
        init_authority(pki)
    for consumer in CONSUMERS:
        if not (pki / "consumers" / consumer / f"{consumer}.crt").exists():
            issue_consumer(pki, consumer)
    # A certificate from a CA the platform never trusted: the TLS handshake refuses it.
    outsider = workdir / "outsider-ca"
    if not (outsider / "ca.crt").exists():
        init_authority(outsider)
        issue_consumer(outsider, "city-bank")

    # Fresh state per run: the same session gives the same audit trail and budgets.
    state = config.state_paths
    for directory in (state.audit_dir, state.ledger.parent, state.consents_dir):
        shutil.rmtree(directory, ignore_errors=True)
    # A new log needs a signer that has signed nothing yet (it refuses to sign a tree
    # that does not extend its last one), so the demo's signer starts afresh too.
    shutil.rmtree(config.signer_dir, ignore_errors=True)
    # The consent service the data subjects use; the platform trusts its key.
    consent_service(config).init()
    return config


def consent_service(config: ServerConfig) -> ConsentService:
    return ConsentService(config.state_paths.consent_service, config.paths.consents)


@dataclass
class Session:
    """Prints each step's question and what the server answered."""

    client: Client
    out: Callable[[str], None]

    def step(self, title: str, action: Callable[[], Any]) -> Any:
        from dataops.cli import print_result

        self.out(f"\n  ▸ {title}")
        try:
            result = action()
        except DataopsClientError as exc:
            where = f" (rule {exc.rule!r}" + (f", column {exc.column!r})" if exc.column else ")")
            self.out(f"    REFUSED {exc.code.name} {exc.reason}{where}: {exc.message}")
            return exc
        if hasattr(result, "frame"):
            # print_result shows the accuracy of noisy columns too.
            print_result(result, lambda text: self.out("    " + text.replace("\n", "\n    ")))
        elif hasattr(result, "accuracy") and hasattr(result, "spend"):  # an estimate
            self.out(
                f"    would spend epsilon {result.spend.epsilon:.3g} of {result.spend.remaining_epsilon:.3g} "
                "remaining; nothing spent now"
            )
            for accuracy in result.accuracy:
                if math.isfinite(accuracy.half_width_95):
                    self.out(f"    {accuracy.column}: ± {accuracy.half_width_95:,.1f} at 95%")
        elif isinstance(result, list):
            for item in result:
                self.out(f"    {item.id:22} {item.title}")
        elif hasattr(result, "tables"):  # a dataset description: the tables it publishes
            from dataops.cli import print_description

            print_description(result, lambda text: self.out("    " + text.replace("\n", "\n    ")))
        return result


def play(target: str, pki: Path, out: Callable[[str], None]) -> dict[str, list[Any]]:
    """The scripted session; returns every consumer's step results (the tests read them)."""
    results: dict[str, list[Any]] = {}

    def connect(consumer: str) -> Client:
        return Client.from_directory(target, pki / "consumers" / consumer, consumer)

    out("\n══ city-bank (finance zone): pre-loan review ══")
    with connect("city-bank") as client:
        s = Session(client, out)
        # One DP question, estimated, answered, then asked again (answered from the release store).
        penalties_question: dict[str, Any] = dict(
            dataset="enterprise_credit",
            aggregates=[count("enterprises"), total("penalties")],
            group_by=["district"],
            mode="dp",
            epsilon=1.0,
        )

        def penalties_by_district() -> Any:
            return client.query(**penalties_question)

        results["city-bank"] = [
            s.step("Which datasets may I use?", client.list_datasets),
            s.step(
                "Enterprises and mean tax paid by size band (a lookup in the published table)",
                lambda: client.query(
                    "enterprise_credit",
                    aggregates=[count_units("enterprises"), mean("tax_paid")],
                    group_by=["size_band"],
                ),
            ),
            s.step(
                "Tax paid by district × industry (cells the protection suppressed are not returned)",
                lambda: client.query(
                    "enterprise_credit",
                    aggregates=[count_units("enterprises"), total("tax_paid")],
                    group_by=["district", "industry"],
                ),
            ),
            s.step(
                "Group by the enterprise id (an identifier)",
                lambda: client.query("enterprise_credit", aggregates=[count()], group_by=["enterprise_id"]),
            ),
            s.step(
                "Reach into the insurance zone", lambda: client.query("medical_claims", aggregates=[count()])
            ),
            s.step(
                "Which published tables may I read exactly?", lambda: client.describe("enterprise_credit")
            ),
            s.step(
                "Exact counts by founding year (no published table has that dimension)",
                lambda: client.query(
                    "enterprise_credit", aggregates=[count_units("enterprises")], group_by=["year_founded"]
                ),
            ),
            s.step(
                "DP: what would enterprises and total penalties by district cost, at epsilon 1?",
                lambda: client.estimate(**penalties_question),
            ),
            s.step(
                "DP: the same question, answered (noisy, debited from the budget)",
                penalties_by_district,
            ),
            s.step(
                "DP: asked again — the same release comes back and nothing is spent",
                penalties_by_district,
            ),
            s.step(
                "DP: a histogram of founding years (catalog bins) for manufacturers, epsilon 2",
                lambda: client.query(
                    "enterprise_credit",
                    aggregates=[count("enterprises")],
                    group_by=["year_founded"],
                    filters=[Equals("industry", "Manufacturing")],
                    mode="dp",
                    epsilon=2.0,
                ),
            ),
            s.step(
                "DP: median tax paid by size band at epsilon 3 — more than the budget has left",
                lambda: client.query(
                    "enterprise_credit",
                    aggregates=[median("tax_paid")],
                    group_by=["size_band"],
                    mode="dp",
                    epsilon=3.0,
                ),
            ),
        ]

    out("\n══ river-bank (finance zone): post-loan monitoring, a narrower grant ══")
    with connect("river-bank") as client:
        s = Session(client, out)
        results["river-bank"] = [
            s.step(
                "Mean administrative penalties by district (allowed)",
                lambda: client.query(
                    "enterprise_credit",
                    aggregates=[count_units("enterprises"), mean("penalties")],
                    group_by=["district"],
                ),
            ),
            s.step(
                "Total tax paid (a column this grant does not cover)",
                lambda: client.query("enterprise_credit", aggregates=[total("tax_paid")]),
            ),
            s.step(
                "Mean penalties of large enterprises in Lingang (one cell: returned only if released)",
                lambda: client.query(
                    "enterprise_credit",
                    aggregates=[mean("penalties")],
                    filters=[Equals("district", "Lingang"), Equals("size_band", "large")],
                ),
            ),
        ]

    out("\n══ harbor-insurance (insurance zone): health insurance pricing ══")
    with connect("harbor-insurance") as client:
        s = Session(client, out)
        results["harbor-insurance"] = [
            s.step(
                "Mean inpatient claim by age band and sex (a lookup in the published table)",
                lambda: client.query(
                    "medical_claims",
                    aggregates=[count("visits"), mean("amount")],
                    group_by=["age_band", "sex"],
                    filters=[Equals("visit_type", "inpatient")],
                ),
            ),
            s.step(
                "Inpatient claims of 18-29 year olds by sex × diagnosis (suppressed cells not returned)",
                lambda: client.query(
                    "medical_claims",
                    aggregates=[count("visits"), mean("amount")],
                    group_by=["sex", "diagnosis_group"],
                    filters=[Equals("visit_type", "inpatient"), Equals("age_band", "18-29")],
                ),
            ),
            s.step(
                "Outpatient visits by district and sex (the same table's district margin)",
                lambda: client.query(
                    "medical_claims",
                    aggregates=[count("visits"), mean("amount")],
                    group_by=["district", "sex"],
                    filters=[Equals("visit_type", "outpatient")],
                ),
            ),
            s.step(
                "The same by hospital level (not a dimension of any published table)",
                lambda: client.query(
                    "medical_claims", aggregates=[count("visits")], group_by=["hospital_level"]
                ),
            ),
            s.step(
                "Filter on one person's id",
                lambda: client.query(
                    "medical_claims", aggregates=[count()], filters=[Equals("person_id", "P0000001")]
                ),
            ),
            s.step(
                "Reach into the finance zone", lambda: client.query("enterprise_credit", aggregates=[count()])
            ),
            s.step(
                "DP: median and mean claim by age band, epsilon 1",
                lambda: client.query(
                    "medical_claims",
                    aggregates=[median("amount"), mean("amount")],
                    group_by=["age_band"],
                    mode="dp",
                    epsilon=1.0,
                ),
            ),
        ]
    return results


def outsider_refused(target: str, workdir: Path, out: Callable[[str], None]) -> bool:
    out("\n══ an outsider: a 'city-bank' certificate from a CA the platform never trusted ══")
    outsider = workdir / "outsider-ca" / "consumers" / "city-bank"
    # Trust the real server's CA so only the client side of the handshake is wrong.
    real_ca = workdir / "state" / "pki" / "ca.crt"
    with Client(
        target, cert=outsider / "city-bank.crt", key=outsider / "city-bank.key", ca=real_ca, timeout=5
    ) as client:
        try:
            client.list_datasets()
        except DataopsClientError as exc:
            out(f"  ▸ refused at the TLS handshake: {exc.code.name}")
            return True
    out("  ▸ NOT REFUSED — this is a bug")
    return False


def run_demo(
    workdir: Path, *, claims: int = 1_000_000, enterprises: int = 200_000, out: Callable[[str], None] = print
) -> int:
    from dataops.server import build_server

    out(f"dataops demo in {workdir.resolve()}")
    config = prepare(workdir, claims=claims, enterprises=enterprises, out=out)
    server = build_server(config).start()
    target = f"localhost:{server.port}"
    out(f"server listening on {target} with mutual TLS (CA {config.tls.ca_cert})")
    try:
        started = time.perf_counter()
        # Exact answers wait for their table anyway; waiting here keeps the script's pace even.
        ready = server.tables.wait_ready(timeout=600)
        # DP queries would otherwise be told to retry while the serving copies build.
        ready = server.sandbox.prepared.wait_ready(server.sandbox.catalog.datasets.values(), 600) and ready
        out(
            f"{len(server.tables.tables)} published tables protected for this data version "
            f"in {time.perf_counter() - started:.1f} s" + ("" if ready else " (some are not ready yet)")
        )
        play(target, config.tls.ca_cert.parent, out)
        from dataops.demo.subjects import play_subjects

        play_subjects(target, config, out)
        refused = outsider_refused(target, workdir, out)
    finally:
        server.stop(grace=config.server.grace_seconds)
    out(f"\nserver stopped cleanly. Audit log: {config.state_paths.audit_dir}")
    toml = workdir / "dataops.toml"
    out(f"Try: dataops audit verify -c {toml}   (or: audit show, audit report --out report.html)")
    out(f"     dataops budget show -c {toml};  dataops policy check -c {toml}")
    return 0 if refused else 1


if __name__ == "__main__":
    sys.exit(run_demo(Path(sys.argv[1]) if len(sys.argv) > 1 else Path("demo-work")))
