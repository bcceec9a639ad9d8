"""The `dataops` command line: one entry point for operators, consumers and reviewers.

    dataops demo                         build demo zones, run the real server, play a session
    dataops serve                        run the server from dataops.toml
    dataops certs init | issue NAME      the platform CA, server and consumer certificates
    dataops policy check | explain       validate policies; say which rule decides a query
    dataops ingest FILE --dataset --zone take a CSV/Parquet file into the sandbox
    dataops budget show                  privacy budget spent per grant and dataset
    dataops audit verify | show | export | report | receipt   the compliance reviewer's tools
    dataops datasets [ID]                (consumer) list or describe datasets over gRPC
    dataops query DATASET ...            (consumer) run a query over gRPC

Exit codes: 0 success, 1 refused or failed (with a message), 2 usage error.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import sys
from pathlib import Path
from typing import Any, Callable, Sequence

from dataops import ir
from dataops.errors import LoadError, RequestError

DEFAULT_CONFIG = Path("dataops.toml")


# --- query options, shared by `query` and `policy explain` -------------------


def add_query_options(parser: argparse.ArgumentParser, dataset_required: bool = True) -> None:
    parser.add_argument("dataset", help="dataset id", **({} if dataset_required else {"nargs": "?"}))
    parser.add_argument("--group-by", "-g", action="append", default=[], metavar="COLUMN")
    parser.add_argument(
        "--agg", "-a", action="append", default=[], metavar="SPEC",
        help="count | count_units | sum:COL | mean:COL | median:COL | quantile:Q:COL (repeatable)",
    )
    parser.add_argument("--eq", action="append", default=[], metavar="COL=VALUE")
    parser.add_argument("--in", dest="in_", action="append", default=[], metavar="COL=V1,V2,...")
    parser.add_argument("--range", action="append", default=[], metavar="COL=LOW:HIGH",
                        help="inclusive; leave an end empty for an open range")
    parser.add_argument("--mode", choices=[m.value for m in ir.Mode], default=ir.Mode.AGGREGATE.value)
    parser.add_argument("--epsilon", type=float)
    parser.add_argument("--delta", type=float, default=0.0)
    parser.add_argument("--target-half-width", type=float)
    parser.add_argument("--purpose", default="", help="the purpose of this query; must be your grant's")


def parse_aggregate(spec: str) -> ir.Aggregate:
    parts = spec.split(":")
    name = parts[0]
    if name in ("count", "count_units") and len(parts) == 1:
        return ir.Aggregate(ir.Function(name))
    if name in ("sum", "mean") and len(parts) == 2:
        return ir.Aggregate(ir.Function(name), parts[1])
    if name == "median" and len(parts) == 2:
        return ir.Aggregate(ir.Function.QUANTILE, parts[1], 0.5)
    if name == "quantile" and len(parts) == 3:
        return ir.Aggregate(ir.Function.QUANTILE, parts[2], float(parts[1]))
    raise ValueError(f"--agg {spec!r}: expected count, count_units, sum:COL, mean:COL, median:COL or quantile:Q:COL")


def _typed(text: str, column_type: str | None) -> Any:
    """A command-line value in its column's type (the catalog says which)."""
    if column_type == "int":
        return int(text)
    if column_type == "float":
        return float(text)
    if column_type == "bool":
        if text.lower() not in ("true", "false"):
            raise ValueError(f"{text!r} is not true or false")
        return text.lower() == "true"
    return text


def query_from_args(args: argparse.Namespace, column_types: dict[str, str]) -> ir.Query:
    def split(option: str, text: str) -> tuple[str, str]:
        column, sep, value = text.partition("=")
        if not sep or not column:
            raise ValueError(f"--{option} {text!r}: expected COLUMN=VALUE")
        return column, value

    filters: list[ir.Filter] = []
    for text in args.eq:
        column, value = split("eq", text)
        filters.append(ir.Equals(column, _typed(value, column_types.get(column))))
    for text in args.in_:
        column, values = split("in", text)
        filters.append(ir.InSet(column, tuple(_typed(v, column_types.get(column)) for v in values.split(","))))
    for text in args.range:
        column, bounds = split("range", text)
        low, sep, high = bounds.partition(":")
        if not sep:
            raise ValueError(f"--range {text!r}: expected COLUMN=LOW:HIGH")
        ctype = column_types.get(column)
        filters.append(ir.Between(column, _typed(low, ctype) if low else None, _typed(high, ctype) if high else None))
    mode = ir.Mode(args.mode)
    privacy = None
    if mode is ir.Mode.DP:
        privacy = ir.Privacy(epsilon=args.epsilon, delta=args.delta, target_half_width=args.target_half_width)
    return ir.Query(
        dataset=args.dataset,
        aggregates=tuple(parse_aggregate(s) for s in (args.agg or ["count"])),
        filters=tuple(filters),
        group_by=tuple(args.group_by),
        mode=mode,
        privacy=privacy,
        purpose=args.purpose,
    )


# --- operator commands -----------------------------------------------------


def _config(args: argparse.Namespace):
    from dataops.config import load_config

    return load_config(args.config)


def cmd_serve(args: argparse.Namespace) -> int:
    from dataops.server import build_server

    server = build_server(_config(args)).start()
    print(f"dataops serving on {server.target} (mTLS); SIGTERM or Ctrl-C stops it", flush=True)
    server.serve_until_signal()
    return 0


def cmd_certs_init(args: argparse.Namespace) -> int:
    from dataops.certs import init_authority

    config = _config(args)
    files = init_authority(config.tls.ca_cert.parent, force=args.force)
    print(f"CA certificate   {files.ca_cert}\nserver cert/key  {files.server_cert}, {files.server_key}")
    return 0


def cmd_certs_issue(args: argparse.Namespace) -> int:
    from dataops.certs import issue_consumer

    config = _config(args)
    files = issue_consumer(config.tls.ca_cert.parent, args.consumer, out_dir=args.out, force=args.force)
    print(f"give these three files to {files.consumer}:\n  {files.cert}\n  {files.key}\n  {files.ca_cert}")
    return 0


def cmd_certs_revoke(args: argparse.Namespace) -> int:
    from dataops.certs import revoke

    config = _config(args)
    pki = config.tls.ca_cert.parent
    cert = args.cert or pki / "consumers" / args.consumer / f"{args.consumer}.crt"
    path = revoke(pki, cert)
    print(f"revoked {cert}; the server refuses it from its next request (CRL {path})")
    return 0


def _catalog(config):
    from dataops.catalog import load_catalog

    return load_catalog(config.paths.catalog, config.paths.sandbox)


def cmd_policy_check(args: argparse.Namespace) -> int:
    from dataops.policy import load_policies

    config = _config(args)
    catalog = _catalog(config)
    policies = load_policies(args.policies or config.paths.policies, catalog)
    for policy in policies.consumers.values():
        state = "REVOKED" if policy.revoked else "ok"
        grants = ", ".join(
            f"{g.dataset} ({'/'.join(sorted(m.value for m in g.modes))}, until {g.expires})"
            for g in policy.grants.values()
        ) or "no grants"
        print(f"{state:7} {policy.consumer:20} zone {policy.zone}: {grants}")
    print(f"{len(policies.consumers)} policies valid against {len(catalog.datasets)} catalog entries; "
          f"version {policies.version[:12]}")
    return 0


def cmd_policy_explain(args: argparse.Namespace) -> int:
    from dataops.authorize import authorize
    from dataops.policy import load_policies

    config = _config(args)
    catalog = _catalog(config)
    policies = load_policies(config.paths.policies, catalog)
    dataset = catalog.get(args.dataset)
    types = {n: c.type.value for n, c in dataset.columns.items()} if dataset else {}
    query = query_from_args(args, types)
    today = dt.date.fromisoformat(args.date) if args.date else dt.datetime.now(dt.timezone.utc).date()
    try:
        decision = authorize(policies, catalog, args.consumer, query, today)
    except RequestError as exc:
        column = f", column {exc.column!r}" if exc.column else ""
        print(f"DENIED  {exc.reason} by rule {exc.rule!r}{column}\n        {exc.message}")
        return 1
    grant = decision.grant
    print(f"ALLOWED by the grant of {args.consumer!r} on {grant.dataset!r} "
          f"(purpose {grant.purpose!r}, expires {grant.expires}, policy {decision.policy.source})")
    if query.mode is ir.Mode.AGGREGATE:
        print(f"        output controls at run time: rows covering < {grant.min_group_size} units are "
              f"suppressed; SUM/MEAN cells fail if the top {grant.dominance.n} units exceed "
              f"{grant.dominance.percent:g}%; filters must leave >= {grant.min_group_size} units "
              "inside and outside")
    return 0


def cmd_ingest(args: argparse.Namespace) -> int:
    from dataops.ingest import ingest

    config = _config(args)
    result = ingest(
        args.file, dataset_id=args.dataset, zone=args.zone, catalog_dir=config.paths.catalog,
        sandbox_dir=config.paths.sandbox, title=args.title, provider=args.provider,
        unit_column=args.unit, force=args.force,
    )
    print(f"ingested {result.rows} rows into {result.parquet}\ncatalog entry {result.catalog_entry}: "
          "every column is 'unclassified' (unusable) until you classify it")
    return 0


def cmd_budget_show(args: argparse.Namespace) -> int:
    from dataops.ledger import Ledger
    from dataops.policy import load_policies
    from dataops.server.app import ledger_path

    config = _config(args)
    catalog = _catalog(config)
    policies = load_policies(config.paths.policies, catalog)
    path = ledger_path(config)
    spent: dict[tuple[str | None, str], tuple[float, float]] = {}
    if path.exists():
        # recover=False: a running server's in-flight reservations must stay open.
        with Ledger(path, recover=False) as ledger:
            spent = {(s.consumer, s.dataset): (s.epsilon_spent, s.delta_spent) for s in ledger.budgets()}
    rows = []
    for dataset in sorted(catalog.datasets.values(), key=lambda d: d.id):
        rows.append(("(all consumers)", dataset.id, dataset.budget.epsilon, dataset.budget.delta,
                     *spent.get((None, dataset.id), (0.0, 0.0))))
        for policy in sorted(policies.consumers.values(), key=lambda p: p.consumer):
            grant = policy.grants.get(dataset.id)
            if grant is not None:
                rows.append((policy.consumer, dataset.id, grant.budget.epsilon, grant.budget.delta,
                             *spent.get((policy.consumer, dataset.id), (0.0, 0.0))))
    if args.json:
        keys = ("consumer", "dataset", "epsilon_total", "delta_total", "epsilon_spent", "delta_spent")
        print(json.dumps([dict(zip(keys, row)) for row in rows], indent=2))
        return 0
    print(f"{'consumer':20} {'dataset':20} {'epsilon spent/total':>22} {'delta spent/total':>22}")
    for consumer, dataset, eps_total, delta_total, eps, delta in rows:
        print(f"{consumer:20} {dataset:20} {eps:>10.4g} / {eps_total:<9.4g} {delta:>10.3g} / {delta_total:<9.3g}")
    return 0


# --- consumer commands -----------------------------------------------------


def add_connection_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--target", default="localhost:50051", help="host:port of the server")
    parser.add_argument("--cert", type=Path, required=True, help="your certificate (dataops certs issue)")
    parser.add_argument("--key", type=Path, required=True)
    parser.add_argument("--ca", type=Path, required=True, help="the platform CA certificate")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")


def _client(args: argparse.Namespace):
    from dataops.client import Client

    return Client(args.target, cert=args.cert, key=args.key, ca=args.ca)


def cmd_datasets(args: argparse.Namespace) -> int:
    from google.protobuf.json_format import MessageToDict

    with _client(args) as client:
        if args.dataset:
            description = client.describe(args.dataset)
            if args.json:
                print(json.dumps({
                    "dataset": MessageToDict(description.dataset),
                    "columns": [MessageToDict(c) for c in description.columns],
                    "grant": MessageToDict(description.grant),
                }, indent=2))
                return 0
            print_description(description)
            return 0
        datasets = client.list_datasets()
        if args.json:
            print(json.dumps([MessageToDict(d) for d in datasets], indent=2))
        for d in datasets if not args.json else ():
            print(f"{d.id:24} {d.zone:12} {d.title}")
    return 0


def print_description(description: Any, out: Callable[[str], None] = print) -> None:
    from dataops.v1 import catalog_pb2

    d, g = description.dataset, description.grant
    out(f"{d.id} ({d.zone}): {d.title}\n  {d.description}\n  provider {d.provider}; "
        f"privacy unit {d.privacy_unit} (<= {d.max_rows_per_unit} rows each)")
    out(f"  grant: {g.purpose}, expires {g.expires}, k = {g.min_group_size}, "
        f"DP budget epsilon {g.epsilon:g} delta {g.delta:g}")
    for c in description.columns:
        uses = ",".join(catalog_pb2.ColumnUse.Name(u).removeprefix("COLUMN_USE_").lower() for u in c.allowed_uses)
        kind = catalog_pb2.Classification.Name(c.classification).removeprefix("CLASSIFICATION_").lower()
        out(f"  {c.name:20} {c.type:7} {kind:17} {uses or '-'}")


def cmd_query(args: argparse.Namespace) -> int:
    if args.sql is not None:
        options = (("--group-by", "group_by"), ("--agg", "agg"), ("--eq", "eq"), ("--in", "in_"), ("--range", "range"))
        structured = [flag for flag, dest in options if getattr(args, dest)]
        if args.dataset or structured:
            raise ValueError("--sql names the dataset, groups, aggregates and filters itself; "
                             f"drop {' '.join(([args.dataset] if args.dataset else []) + structured)}")
        with _client(args) as client:
            result = client.sql(args.sql, mode=args.mode, epsilon=args.epsilon, delta=args.delta,
                                target_half_width=args.target_half_width, purpose=args.purpose)
        return _show_query_result(args, result)
    if not args.dataset:
        raise ValueError("name a DATASET, or give the question as --sql \"SELECT ...\"")
    with _client(args) as client:
        description = client.describe(args.dataset)
        types = {c.name: c.type for c in description.columns}
        result = client.run(query_from_args(args, types))
    return _show_query_result(args, result)


def _show_query_result(args: argparse.Namespace, result: Any) -> int:
    if args.json:
        print(json.dumps({
            "rows": result.frame.to_dicts(),
            "rows_suppressed": result.rows_suppressed,
            "receipt": {"sequence": result.receipt.sequence, "hash": result.receipt.hash},
        }, indent=2, default=str))
        return 0
    print_result(result)
    return 0


def print_result(result: Any, out: Callable[[str], None] = print) -> None:
    import polars as pl

    with pl.Config(tbl_rows=20, tbl_cols=12, fmt_str_lengths=40, tbl_hide_dataframe_shape=True,
                   thousands_separator=True, float_precision=1):
        out(str(result.frame))
    notes = [f"{result.frame.height} rows", f"{result.rows_suppressed} suppressed"]
    if result.spend is not None and result.spend.epsilon:
        notes.append(f"spent epsilon {result.spend.epsilon:.4g} (remaining {result.spend.remaining_epsilon:.4g})")
    if result.reused:
        notes.append("reused an earlier release: nothing spent")
    notes.append(f"receipt #{result.receipt.sequence} {result.receipt.hash[:12]}")
    out("  " + "; ".join(notes))


# --- wiring ----------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dataops", description="Public-data operation sandbox.")
    parser.add_argument("--verbose", "-v", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)

    def command(name: str, func: Callable, help: str, parent: Any = sub, config: bool = True) -> argparse.ArgumentParser:
        p = parent.add_parser(name, help=help, description=help)
        p.set_defaults(func=func)
        if config:
            p.add_argument("--config", "-c", type=Path, default=DEFAULT_CONFIG, help="dataops.toml")
        return p

    from dataops.audit.commands import add_audit_parser
    from dataops.demo.session import add_demo_parser

    add_demo_parser(sub)
    add_audit_parser(sub)
    command("serve", cmd_serve, "run the sandbox server (mTLS gRPC) from dataops.toml")

    certs = sub.add_parser("certs", help="the platform CA and certificates").add_subparsers(dest="sub", required=True)
    p = command("init", cmd_certs_init, "make the platform CA and the server certificate", certs)
    p.add_argument("--force", action="store_true", help="replace an existing CA")
    p = command("issue", cmd_certs_issue, "make a consumer's key and certificate", certs)
    p.add_argument("consumer")
    p.add_argument("--out", type=Path, help="directory for the three files")
    p.add_argument("--force", action="store_true")
    p = command("revoke", cmd_certs_revoke, "revoke a consumer's certificate (CA-signed CRL)", certs)
    p.add_argument("consumer")
    p.add_argument("--cert", type=Path, help="the certificate to revoke (default: the one `issue` wrote)")

    policy = sub.add_parser("policy", help="validate and explain policies").add_subparsers(dest="sub", required=True)
    p = command("check", cmd_policy_check, "validate every policy against the catalog", policy)
    p.add_argument("--policies", type=Path, help="a policy directory other than the configured one")
    p = command("explain", cmd_policy_explain, "say which rule allows or denies a query", policy)
    p.add_argument("--consumer", required=True)
    p.add_argument("--date", help="decide as of this ISO date (default: today, UTC)")
    add_query_options(p)

    budget = sub.add_parser("budget", help="privacy budgets").add_subparsers(dest="sub", required=True)
    p = command("show", cmd_budget_show, "every grant's and dataset's privacy budget: spent and total", budget)
    p.add_argument("--json", action="store_true")

    p = command("ingest", cmd_ingest, "take a CSV or Parquet file into the sandbox")
    p.add_argument("file", type=Path)
    p.add_argument("--dataset", required=True)
    p.add_argument("--zone", required=True)
    p.add_argument("--title")
    p.add_argument("--provider", default="unknown")
    p.add_argument("--unit", help="the privacy-unit column (default: the first *_id column)")
    p.add_argument("--force", action="store_true")

    p = command("datasets", cmd_datasets, "list your datasets, or describe one", config=False)
    p.add_argument("dataset", nargs="?")
    add_connection_options(p)
    p = command("query", cmd_query, "run a query", config=False)
    add_query_options(p, dataset_required=False)  # --sql names the dataset itself
    p.add_argument("--sql", metavar="TEXT",
                   help='the question as one SQL SELECT (docs/api.md, "SQL"), e.g. '
                        '"SELECT district, COUNT(*) FROM enterprise_credit GROUP BY district"; '
                        "--mode/--epsilon/--delta/--purpose still apply")
    add_connection_options(p)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from dataops.certs import CertificateError
    from dataops.client import DataopsClientError

    try:
        return args.func(args)
    except (LoadError, CertificateError, ValueError, OSError) as exc:
        print(f"dataops: {exc}", file=sys.stderr)
        return 1
    except RequestError as exc:
        print(f"dataops: {exc.reason}: {exc.message}", file=sys.stderr)
        return 1
    except DataopsClientError as exc:
        where = "".join(f" {k}={v}" for k, v in exc.metadata.items() if not k.startswith("receipt"))
        print(f"dataops: refused: {exc.code.name} {exc.reason}{where}: {exc.message}", file=sys.stderr)
        for field, description in exc.field_violations:
            print(f"  {field}: {description}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
