"""The `dataops` command line: one entry point for operators, consumers and reviewers.

Consumers (over gRPC; connection from flags, DATAOPS_* variables or a profile file):
    dataops datasets [ID]                list or describe your datasets
    dataops query DATASET ...            run a query: rows, accuracy, spend, receipt
    dataops estimate DATASET ...         what a query would cost and how accurate it would be
    dataops budget [--dataset ID]        your privacy budget: spent and remaining

Operators (read dataops.toml):
    dataops init DIR                     scaffold a working directory that `serve` runs
    dataops serve [--listen HOST:PORT]   run the server
    dataops certs init | issue | revoke | list   the platform CA and certificates
    dataops policy check | explain | schema      validate; say which rule decides; JSON Schema
    dataops ingest FILE --dataset --zone take a CSV/Parquet file into the sandbox
    dataops budget show                  privacy budget spent per grant and dataset
    dataops demo                         demo zones, the real server and a scripted session

Reviewers:
    dataops audit verify | show | export | report | receipt

Exit codes: 0 success; 1 refused: the server refused the request or could not be
reached, `policy explain` denies, `policy check` finds errors; 2 usage: a wrong command
line or a local file it names (an option value, an unreadable certificate or config).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import logging
import math
import os
import re
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from dataops import ir
from dataops.errors import LoadError, RequestError

DEFAULT_CONFIG = Path("dataops.toml")
OK, REFUSED, USAGE = 0, 1, 2
EXIT_CODES = (
    "exit codes: 0 success; 1 refused (by the server, or the server cannot be reached; "
    "a denied explain, a failed check); 2 usage (command line or a local file it names)"
)


class UsageError(Exception):
    """The command line or a local file it names is wrong: exit 2."""


class Refused(Exception):
    """The answer is no (a check failed, an explain denies): exit 1, message already printed."""


def version() -> str:
    try:
        from importlib.metadata import version as _version

        return _version("dataops")
    except Exception:  # running from a source tree that was never installed
        return "0+unknown"


# --- values and query options, shared by `query`, `estimate` and `policy explain` -----

_INT = re.compile(r"[+-]?(0|[1-9][0-9]*)")
_FLOAT = re.compile(r"[+-]?([0-9]+\.[0-9]*|\.[0-9]+|[0-9]+)([eE][+-]?[0-9]+)?")


def parse_literal(text: str) -> Any:
    """A filter value as typed: 2000 is an int, 1.5 a float, true a bool, anything else a string.

    Quote a value to keep it a string ('"2000"'); dates stay strings (the server reads them).
    No catalog look-up: typing the value here spares a DescribeDataset call per query.
    """
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "\"'":
        return text[1:-1]
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    if _INT.fullmatch(text):
        return int(text)
    if _FLOAT.fullmatch(text) and any(c in text for c in ".eE") and math.isfinite(float(text)):
        return float(text)
    return text


def add_query_options(parser: argparse.ArgumentParser, dataset_required: bool = True) -> None:
    parser.add_argument("dataset", help="dataset id", nargs=None if dataset_required else "?")
    parser.add_argument("--group-by", "-g", action="append", default=[], metavar="COLUMN")
    parser.add_argument(
        "--agg",
        "-a",
        action="append",
        default=[],
        metavar="SPEC",
        help="count | count_units | sum:COL | mean:COL | median:COL | quantile:Q:COL, or mean(COL) "
        "(repeatable; default count)",
    )
    parser.add_argument(
        "--eq",
        action="append",
        default=[],
        metavar="COL=VALUE",
        help="numbers and true/false are typed; quote to force a string: 'COL=\"0101\"'",
    )
    parser.add_argument("--in", dest="in_", action="append", default=[], metavar="COL=V1,V2,...")
    parser.add_argument(
        "--range",
        action="append",
        default=[],
        metavar="COL=LOW:HIGH",
        help="inclusive; leave an end empty for an open range",
    )
    parser.add_argument("--mode", choices=[m.value for m in ir.Mode], default=ir.Mode.AGGREGATE.value)
    parser.add_argument("--epsilon", type=float)
    parser.add_argument("--delta", type=float, default=0.0)
    parser.add_argument(
        "--target-half-width",
        type=float,
        metavar="W",
        help="DP: spend just enough for a 95%% half-width of W",
    )
    parser.add_argument("--purpose", default="", help="the purpose of this query; must be your grant's")


def parse_aggregate(spec: str) -> ir.Aggregate:
    from dataops.client import DataopsClientError
    from dataops.client import parse_aggregate as parse

    try:
        return parse(spec)
    except DataopsClientError as exc:
        raise UsageError(exc.message.replace("aggregate ", "--agg ", 1)) from None


def query_from_args(args: argparse.Namespace) -> ir.Query:
    def split(option: str, text: str) -> tuple[str, str]:
        column, sep, value = text.partition("=")
        if not sep or not column:
            raise UsageError(f"--{option} {text!r}: expected COLUMN=VALUE")
        return column, value

    filters: list[ir.Filter] = []
    try:
        for text in args.eq:
            column, value = split("eq", text)
            filters.append(ir.Equals(column, parse_literal(value)))
        for text in args.in_:
            column, values = split("in", text)
            filters.append(ir.InSet(column, tuple(parse_literal(v) for v in values.split(","))))
        for text in args.range:
            column, bounds = split("range", text)
            low, sep, high = bounds.partition(":")
            if not sep:
                raise UsageError(f"--range {text!r}: expected COLUMN=LOW:HIGH")
            filters.append(
                ir.Between(column, parse_literal(low) if low else None, parse_literal(high) if high else None)
            )
        mode = ir.Mode(args.mode)
        privacy = None
        if mode is ir.Mode.DP:
            privacy = ir.Privacy(
                epsilon=args.epsilon, delta=args.delta, target_half_width=args.target_half_width
            )
        elif args.epsilon is not None or args.target_half_width is not None:
            raise UsageError("--epsilon and --target-half-width apply to --mode dp only")
        return ir.Query(
            dataset=args.dataset,
            aggregates=tuple(parse_aggregate(s) for s in (args.agg or ["count"])),
            filters=tuple(filters),
            group_by=tuple(args.group_by),
            mode=mode,
            privacy=privacy,
            purpose=args.purpose,
        )
    except RequestError as exc:  # the IR's own shape checks
        raise UsageError(exc.message) from None


# --- output ------------------------------------------------------------------------


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if not math.isfinite(value):
            return str(value)
        return f"{value:,.1f}" if abs(value) >= 100 else f"{value:.4g}"
    return str(value)


def format_table(header: Sequence[str], rows: Sequence[Sequence[Any]], *, right: Sequence[bool] = ()) -> str:
    """A plain text table; every cell in full (no truncation), numbers right-aligned."""
    cells = [[_fmt(v) for v in row] for row in rows]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(header)]
    numeric = list(right) or [
        bool(rows)
        and all(isinstance(r[i], (int, float)) and not isinstance(r[i], bool) or r[i] is None for r in rows)
        for i in range(len(header))
    ]

    def line(values: Sequence[str]) -> str:
        return "  ".join(v.rjust(w) if n else v.ljust(w) for v, w, n in zip(values, widths, numeric)).rstrip()

    return "\n".join([line(header), line(["-" * w for w in widths])] + [line(r) for r in cells])


def _print(text: str = "") -> None:
    print(text)


# --- connection: flags > environment > profile file ---------------------------------

CONNECTION_KEYS = ("target", "cert", "key", "ca", "server_name", "timeout")
ENVIRONMENT = {key: f"DATAOPS_{key.upper()}" for key in CONNECTION_KEYS}


def profile_path(given: Path | None) -> Path | None:
    if given is not None:
        return given
    if os.environ.get("DATAOPS_PROFILE"):
        return Path(os.environ["DATAOPS_PROFILE"])
    base = Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config")
    default = base / "dataops" / "profile.toml"
    return default if default.exists() else None


def load_profile(path: Path) -> dict[str, Any]:
    """A profile: target, cert, key, ca, server_name, timeout; paths relative to the file."""
    from dataops._toml import read_toml

    doc = read_toml(path, LoadError)
    values: dict[str, Any] = {}
    for key in CONNECTION_KEYS:
        if key == "timeout":
            timeout = doc.number(key, None, minimum=0.001)
            if timeout is not None:
                values[key] = timeout
            continue
        value = doc.string(key, None)
        if value is not None:
            values[key] = (path.parent / Path(value).expanduser()) if key in ("cert", "key", "ca") else value
    doc.reject_unknown()
    return values


def connection(args: argparse.Namespace) -> dict[str, Any]:
    """Each setting from its flag, else DATAOPS_<NAME>, else the profile, else the default."""
    path = profile_path(args.profile)
    try:
        profile = load_profile(path) if path is not None else {}
    except LoadError as exc:
        raise UsageError(f"profile: {exc}") from None
    settings: dict[str, Any] = {"target": "localhost:50051", "timeout": 60.0, "server_name": None}
    settings.update(profile)
    for key, variable in ENVIRONMENT.items():
        if os.environ.get(variable):
            settings[key] = os.environ[variable]
    for key in CONNECTION_KEYS:
        if getattr(args, key, None) is not None:
            settings[key] = getattr(args, key)
    missing = [k for k in ("cert", "key", "ca") if not settings.get(k)]
    if missing:
        raise UsageError(
            f"no {', '.join(missing)}: pass --{missing[0]} FILE, set {ENVIRONMENT[missing[0]]}, or write them "
            f"in a profile ({profile_path(None) or '~/.config/dataops/profile.toml'} or --profile FILE)"
        )
    try:
        settings["timeout"] = float(settings["timeout"])
    except ValueError:
        raise UsageError(f"timeout {settings['timeout']!r} is not a number of seconds") from None
    return settings


def add_connection_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(
        "connection",
        "each from its flag, else DATAOPS_TARGET, DATAOPS_CERT, DATAOPS_KEY, DATAOPS_CA, "
        "DATAOPS_SERVER_NAME, DATAOPS_TIMEOUT, else the profile file (--profile, "
        "DATAOPS_PROFILE or ~/.config/dataops/profile.toml)",
    )
    group.add_argument("--target", help="host:port of the server (default localhost:50051)")
    group.add_argument("--cert", type=Path, help="your certificate (from `dataops certs issue`)")
    group.add_argument("--key", type=Path, help="your private key")
    group.add_argument("--ca", type=Path, help="the platform CA certificate")
    group.add_argument(
        "--server-name", help="the name to verify the server certificate against, if not the target's"
    )
    group.add_argument("--timeout", type=float, help="seconds to wait for an answer (default 60)")
    group.add_argument("--profile", type=Path, metavar="FILE", help="a profile TOML file")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")


def _client(args: argparse.Namespace):
    from dataops.client import Client

    s = connection(args)
    return Client(
        s["target"],
        cert=s["cert"],
        key=s["key"],
        ca=s["ca"],
        server_name=s["server_name"],
        timeout=s["timeout"],
    )


# --- consumer commands ---------------------------------------------------------------


def _finite(value: Any) -> Any:
    """NaN and infinity are not JSON: they become null (e.g. a ratio's unknown half-width)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def _json(value: Any) -> None:
    print(json.dumps(_finite(value), indent=2, default=str, ensure_ascii=False, allow_nan=False))


def cmd_datasets(args: argparse.Namespace) -> int:
    with _client(args) as client:
        if args.dataset:
            description = client.describe(args.dataset)
            if args.json:
                _json(
                    {
                        "dataset": dataclasses.asdict(description.dataset),
                        "columns": [dataclasses.asdict(c) for c in description.columns],
                        "grant": dataclasses.asdict(description.grant),
                        "tables": [dataclasses.asdict(t) for t in description.tables],
                    }
                )
            else:
                print_description(description)
            return OK
        datasets = client.list_datasets()
    if args.json:
        _json([dataclasses.asdict(d) for d in datasets])
    else:
        print(format_table(("dataset", "zone", "title"), [(d.id, d.zone, d.title) for d in datasets]))
    return OK


def print_description(description: Any, out: Callable[[str], None] = print) -> None:
    d, g = description.dataset, description.grant
    out(
        f"{d.id} ({d.zone}): {d.title}\n  {d.description}\n  provider {d.provider}; "
        f"privacy unit {d.privacy_unit} "
        + (
            f"(<= {d.max_rows_per_unit} rows each)"
            if d.max_rows_per_unit
            else "(rows per unit not set: DP is off)"
        )
    )
    out(
        f"  grant: {g.purpose}, expires {g.expires}, modes {'/'.join(g.modes)}, "
        f"DP budget epsilon {g.epsilon:g} delta {g.delta:g}"
    )
    for t in getattr(description, "tables", ()):
        rules = (
            f"min {t.rules.min_units} units, dominance {t.rules.dominance_n}/{t.rules.dominance_percent:g}%"
        )
        if t.rules.p_percent is not None:
            rules += f", p% {t.rules.p_percent:g}"
        out(
            f"  table {t.id}: {' x '.join(d.column for d in t.dimensions)}; "
            f"{', '.join(m.name for m in t.measures)} ({rules})"
        )
    rows = [(c.name, c.type, c.classification, ",".join(c.allowed_uses) or "-") for c in description.columns]
    out(
        "  "
        + format_table(("column", "type", "classification", "you may use it as"), rows).replace("\n", "\n  ")
    )


def _accuracy_json(accuracy: Any) -> list[dict[str, Any]]:
    return [dataclasses.asdict(a) for a in accuracy]


def add_sql_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--sql",
        metavar="TEXT",
        help='the question as one SQL SELECT (docs/api.md, "SQL"), e.g. '
        '"SELECT district, COUNT(*) FROM enterprise_credit GROUP BY district"; '
        "--mode/--epsilon/--delta/--target-half-width/--purpose still apply",
    )


def _sql_kwargs(args: argparse.Namespace) -> dict[str, Any] | None:
    """The SqlQuery options when --sql is given (then no structured option may be)."""
    if args.sql is None:
        if not args.dataset:
            raise UsageError('name a DATASET, or give the question as --sql "SELECT ..."')
        return None
    options = (
        ("--group-by", "group_by"),
        ("--agg", "agg"),
        ("--eq", "eq"),
        ("--in", "in_"),
        ("--range", "range"),
    )
    structured = [flag for flag, dest in options if getattr(args, dest)]
    if args.dataset or structured:
        raise UsageError(
            "--sql names the dataset, groups, aggregates and filters itself; "
            f"drop {' '.join(([args.dataset] if args.dataset else []) + structured)}"
        )
    return {
        "mode": args.mode,
        "epsilon": args.epsilon,
        "delta": args.delta,
        "target_half_width": args.target_half_width,
        "purpose": args.purpose,
    }


def cmd_query(args: argparse.Namespace) -> int:
    sql = _sql_kwargs(args)
    query = query_from_args(args) if sql is None else None
    with _client(args) as client:
        result = client.run(query) if sql is None else client.sql(args.sql, **sql)
    if args.json:
        table = result.table
        _json(
            {
                "columns": table.column_names,
                "rows": table.to_pylist(),
                "rows_suppressed": result.rows_suppressed,
                "accuracy": _accuracy_json(result.accuracy.values()),
                "spend": dataclasses.asdict(result.spend) if result.spend is not None else None,
                "reused": result.reused,
                "receipt": dataclasses.asdict(result.receipt),
            }
        )
        return OK
    print_result(result)
    return OK


def print_result(result: Any, out: Callable[[str], None] = print) -> None:
    table = result.table
    rows = [[row[name] for name in table.column_names] for row in table.to_pylist()]
    out(format_table(table.column_names, rows))
    notes = [f"{table.num_rows} rows", f"{result.rows_suppressed} suppressed"]
    if result.spend is not None and (result.spend.epsilon or result.spend.delta):
        notes.append(
            f"spent epsilon {result.spend.epsilon:.4g}"
            + (f" delta {result.spend.delta:.3g}" if result.spend.delta else "")
            + f" (remaining {result.spend.remaining_epsilon:.4g})"
        )
    if result.reused:
        notes.append("reused an earlier release: nothing spent")
    notes.append(f"receipt #{result.receipt.sequence} {result.receipt.hash[:12]}")
    out("  " + "; ".join(notes))
    print_accuracy(result.accuracy.values(), out)


def print_accuracy(accuracy: Any, out: Callable[[str], None] = print) -> None:
    noisy = [a for a in accuracy if a.noise_scale]
    if noisy:
        out(
            "  accuracy: "
            + "; ".join(
                (
                    f"{a.column} ± {_fmt(a.half_width_95)} at 95%"
                    if math.isfinite(a.half_width_95)
                    else f"{a.column} ± (no closed form)"
                )
                + f" ({a.mechanism}, scale {_fmt(a.noise_scale)})"
                for a in noisy
            )
        )


def cmd_estimate(args: argparse.Namespace) -> int:
    sql = _sql_kwargs(args)
    query = query_from_args(args) if sql is None else None
    with _client(args) as client:
        estimate = client.estimate_query(query) if sql is None else client.estimate_sql(args.sql, **sql)
    s = estimate.spend
    if args.json:
        _json(
            {
                "spend": dataclasses.asdict(s),
                "accuracy": _accuracy_json(estimate.accuracy),
                "receipt": dataclasses.asdict(estimate.receipt),
            }
        )
        return OK
    if (query.mode if query is not None else ir.Mode(args.mode)) is ir.Mode.DP:
        enough = s.epsilon <= s.remaining_epsilon + 1e-12 and s.delta <= s.remaining_delta + 1e-15
        print(
            f"would spend epsilon {s.epsilon:.4g}"
            + (f" delta {s.delta:.3g}" if s.delta else "")
            + f" of {s.remaining_epsilon:.4g} remaining"
            + ("" if enough else ": NOT ENOUGH BUDGET")
            + "; nothing was run or spent"
        )
        rows = [(a.column, a.mechanism, a.noise_scale, a.half_width_95) for a in estimate.accuracy]
        print(format_table(("column", "mechanism", "noise scale", "± at 95%"), rows))
    else:
        print(
            "an exact aggregate query spends no privacy budget; output controls apply at run time "
            "(small or dominated cells are suppressed)"
        )
    return OK


def cmd_budget(args: argparse.Namespace) -> int:
    with _client(args) as client:
        budgets = client.budgets(args.dataset or "")
    if args.json:
        _json(
            [
                {
                    "dataset_id": b.dataset_id,
                    "epsilon_total": b.epsilon_total,
                    "delta_total": b.delta_total,
                    "epsilon_spent": b.epsilon_spent,
                    "delta_spent": b.delta_spent,
                    "epsilon_remaining": b.epsilon_remaining,
                    "delta_remaining": b.delta_remaining,
                }
                for b in budgets
            ]
        )
        return OK
    print(
        format_table(
            ("dataset", "epsilon spent", "epsilon total", "epsilon left", "delta spent", "delta total"),
            [
                (
                    b.dataset_id,
                    b.epsilon_spent,
                    b.epsilon_total,
                    b.epsilon_remaining,
                    b.delta_spent,
                    b.delta_total,
                )
                for b in budgets
            ],
        )
    )
    return OK


# --- operator commands -----------------------------------------------------------------


def _config(args: argparse.Namespace):
    from dataops.config import load_config

    try:
        return load_config(args.config)
    except LoadError as exc:
        hint = "" if args.config.exists() else " (run `dataops init DIR`, or pass -c PATH/dataops.toml)"
        raise UsageError(f"{exc}{hint}") from None


def cmd_init(args: argparse.Namespace) -> int:
    from dataops.scaffold import scaffold

    made = scaffold(args.directory, server_names=args.server_name, ips=args.ip, listen=args.listen)
    print(f"created {args.directory}/ with {', '.join(made)}")
    print(
        f"next: dataops ingest FILE --dataset ID --zone ZONE -c {args.directory}/dataops.toml, classify "
        f"its columns in catalog/ID.toml, grant a consumer in policies/, `dataops certs issue NAME`, "
        f"then `dataops serve -c {args.directory}/dataops.toml`"
    )
    return OK


def cmd_serve(args: argparse.Namespace) -> int:
    from dataops.server import build_server

    config = _config(args)
    if args.listen:
        from dataops.config import parse_listen

        try:
            parse_listen(args.listen)  # the check the file's [server] listen gets
        except ValueError:
            raise UsageError(
                f"--listen {args.listen!r}: expected HOST:PORT (IPv6 in brackets, [::1]:50051)"
            ) from None
        config = dataclasses.replace(config, server=dataclasses.replace(config.server, listen=args.listen))
    server = build_server(config).start()
    print(f"dataops serving on {server.target} (mTLS); SIGTERM or Ctrl-C stops it", flush=True)
    server.serve_until_signal()
    # Stopped cleanly: audit log and ledger are closed. A background thread may still be
    # inside polars building a prepared copy (written to a temporary name, then renamed);
    # interpreter finalisation would abort it ("FATAL: exception not rethrown"), so leave now.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(OK)


def _pki_dir(args: argparse.Namespace) -> Path:
    """The PKI directory: --dir, else the config's, else ./state/pki when there is no dataops.toml."""
    if getattr(args, "dir", None) is not None:
        return args.dir
    if not args.config.exists() and args.config == DEFAULT_CONFIG:
        from dataops.config import ServerConfig

        return ServerConfig.default(Path.cwd()).tls.ca_cert.parent
    return _config(args).tls.ca_cert.parent


def cmd_certs_init(args: argparse.Namespace) -> int:
    from dataops.certs import init_authority

    names = ["localhost", *[n for n in args.server_name if n != "localhost"]]
    ips = ["127.0.0.1", "::1", *[i for i in args.ip if i not in ("127.0.0.1", "::1")]]
    files = init_authority(_pki_dir(args), server_names=names, server_ips=ips, force=args.force)
    print(
        f"CA certificate   {files.ca_cert}\nserver cert/key  {files.server_cert}, {files.server_key}\n"
        f"server names     {', '.join(names + ips)}"
    )
    return OK


def cmd_certs_issue(args: argparse.Namespace) -> int:
    from dataops.certs import issue_consumer

    files = issue_consumer(_pki_dir(args), args.consumer, out_dir=args.out, force=args.force)
    print(f"give these three files to {files.consumer}:\n  {files.cert}\n  {files.key}\n  {files.ca_cert}")
    return OK


def cmd_certs_revoke(args: argparse.Namespace) -> int:
    from dataops.certs import revoke

    pki = _pki_dir(args)
    cert = args.cert or pki / "consumers" / args.consumer / f"{args.consumer}.crt"
    path = revoke(pki, cert)
    print(f"revoked {cert}; the server refuses it from its next request (CRL {path})")
    return OK


def cmd_certs_list(args: argparse.Namespace) -> int:
    from dataops.certs import list_certificates

    entries = list_certificates(_pki_dir(args))
    if args.json:
        _json([dataclasses.asdict(e) for e in entries])
        return OK
    print(
        format_table(
            ("role", "name", "status", "expires", "names (SAN)", "file"),
            [(e.role, e.name, e.status, e.expires[:10], ", ".join(e.names), e.path) for e in entries],
            right=[False] * 6,
        )
    )
    return OK


def _catalog(config):
    from dataops.catalog import load_catalog

    return load_catalog(config.paths.catalog, config.paths.sandbox)


def cmd_policy_check(args: argparse.Namespace) -> int:
    from dataops.check import check_all

    config = _config(args)
    report = check_all(config, policies_dir=args.policies)
    for line in report.summary:
        print(line)
    if report.errors:
        print(f"{len(report.errors)} error(s); `dataops serve` would refuse to start:", file=sys.stderr)
        for error in report.errors:
            print(f"  {error}", file=sys.stderr)
        return REFUSED
    return OK


def cmd_policy_schema(args: argparse.Namespace) -> int:
    from dataops.schema import SCHEMAS

    schema = SCHEMAS[args.kind]()
    text = json.dumps(schema, indent=2) + "\n"
    if args.out:
        args.out.write_text(text)
        print(f"wrote {args.out}")
    else:
        sys.stdout.write(text)
    return OK


def _products(config, catalog):
    from dataops.products import load_products

    return load_products(config.paths.products, catalog)


def cmd_policy_explain(args: argparse.Namespace) -> int:
    from dataops.authorize import authorize
    from dataops.policy import load_policies

    config = _config(args)
    catalog = _catalog(config)
    products = _products(config, catalog)
    policies = load_policies(config.paths.policies, catalog, products)
    query = query_from_args(args)
    today = args.date or dt.datetime.now(dt.UTC).date()
    try:
        # The server's own authorization, table coverage included.
        decision = authorize(policies, catalog, args.consumer, query, today, products.tables)
        budget_note = _explain_budget(config, decision, query, args.consumer)
    except RequestError as exc:
        column = f", column {exc.column!r}" if exc.column else ""
        print(f"DENIED  {exc.reason} by rule {exc.rule!r}{column}\n        {exc.message}")
        return REFUSED
    grant = decision.grant
    print(
        f"ALLOWED by the grant of {args.consumer!r} on {grant.dataset!r} "
        f"(purpose {grant.purpose!r}, expires {grant.expires}, policy {decision.policy.source})"
    )
    if budget_note:
        print(f"        {budget_note}")
    if decision.coverage is not None:
        table = products.tables[decision.coverage.table]
        rules = table.rules
        print(
            f"        answered from table {table.id!r} ({' x '.join(table.dimensions)}), a lookup: "
            f"{decision.coverage.grid_size} result rows requested; a row needing a cell the "
            f"protection suppressed (< {rules.min_units} units, dominance {rules.dominance_n}/"
            f"{rules.dominance_percent:g}%, or secondary) is not returned"
        )
    return OK


def cmd_tables_show(args: argparse.Namespace) -> int:
    """The protection result of each table for its dataset's current data version."""
    from dataops.catalog import check_data
    from dataops.tables import TableStore, summary
    from dataops.versions import Fingerprints

    config = _config(args)
    catalog = _catalog(config)
    products = _products(config, catalog)
    if args.table and args.table not in products.tables:
        known = ", ".join(sorted(products.tables)) or "none"
        raise UsageError(f"no table product {args.table!r} in {config.paths.products} (known: {known})")
    store, fingerprints = TableStore(config.paths.state), Fingerprints()
    for table_id in [args.table] if args.table else sorted(products.tables):
        product = products.tables[table_id]
        dataset = catalog.get(product.dataset)
        check_data(dataset)
        # Built (and stored) if the server has not protected this data version yet.
        print(summary(store.get(product, dataset, fingerprints.of(dataset))))
    return OK


def _explain_budget(config: Any, decision: Any, query: ir.Query, consumer: str) -> str:
    """For a DP query: its cost against what is left of the grant and the dataset; denies if short."""
    if query.mode is not ir.Mode.DP:
        return ""
    from dataops.engines import dp as dp_engine
    from dataops.engines._base import Plan
    from dataops.errors import BudgetExhausted
    from dataops.ledger import Ledger
    from dataops.server.app import ledger_location
    from dataops.values import PrivacyLoss

    dp_engine.enable_opendp()  # this command compiles the query as the server would
    compiled = dp_engine.DPQuery.compile(Plan(query, decision.dataset, decision.grant))
    cost = compiled.calibrate(query.dp_privacy).cost
    path = ledger_location(config)
    grant_spent = dataset_spent = PrivacyLoss.zero()
    if isinstance(path, str) or path.exists():  # a PostgreSQL URL, or a SQLite file
        # recover=False: a running server's in-flight reservations must stay open.
        with Ledger(path, recover=False) as ledger:
            grant_spent = ledger.spent(consumer, decision.dataset.id)
            dataset_spent = ledger.dataset_spent(decision.dataset.id)
    checks = [
        ("grant", "budget.grant", decision.grant.budget, grant_spent),
        ("dataset", "budget.dataset", decision.dataset.budget, dataset_spent),
    ]
    slack = PrivacyLoss(1e-12, 1e-15)  # the ledger's units: a cost equal to what is left fits
    for what, rule, budget, spent in checks:
        left = budget.remaining_after(spent)
        if not cost <= left + slack:
            raise BudgetExhausted(
                f"the query costs epsilon {cost.epsilon:.4g} delta {cost.delta:.3g}; the {what}'s budget has "
                f"epsilon {left.epsilon:.4g} delta {left.delta:.3g} left",
                rule=rule,
            )
    left = decision.grant.budget.remaining_after(grant_spent).epsilon
    return (
        f"costs epsilon {cost.epsilon:.4g}"
        + (f" delta {cost.delta:.3g}" if cost.delta else "")
        + f"; the grant has epsilon {left:.4g} left (unless an identical release is reused: then nothing)"
    )


def cmd_ingest(args: argparse.Namespace) -> int:
    from dataops.ingest import ingest

    config = _config(args)
    try:
        result = ingest(
            args.file,
            dataset_id=args.dataset,
            zone=args.zone,
            catalog_dir=config.paths.catalog,
            sandbox_dir=config.paths.sandbox,
            title=args.title,
            provider=args.provider,
            unit_column=args.unit,
            force=args.force,
        )
    except (LoadError, OSError) as exc:
        raise UsageError(str(exc)) from None
    print(
        f"ingested {result.rows} rows into {result.parquet}\ncatalog entry {result.catalog_entry}: "
        "every column is 'unclassified' (unusable) until you classify it, and DP stays off "
        "until you set privacy_unit.max_rows"
    )
    return OK


def cmd_budget_show(args: argparse.Namespace) -> int:
    from dataops.ledger import Ledger
    from dataops.policy import load_policies
    from dataops.server.app import ledger_location
    from dataops.values import PrivacyLoss

    config = _config(args)
    catalog = _catalog(config)
    policies = load_policies(config.paths.policies, catalog, _products(config, catalog))
    path = ledger_location(config)
    spent: dict[tuple[str | None, str], PrivacyLoss] = {}
    if isinstance(path, str) or path.exists():  # a PostgreSQL URL, or a SQLite file
        # recover=False: a running server's in-flight reservations must stay open.
        with Ledger(path, recover=False) as ledger:
            spent = {(s.consumer, s.dataset): s.spent for s in ledger.budgets()}
    rows = []
    for dataset in sorted(catalog.datasets.values(), key=lambda d: d.id):
        rows.append(
            (
                "(all consumers)",
                dataset.id,
                dataset.budget.epsilon,
                dataset.budget.delta,
                *spent.get((None, dataset.id), PrivacyLoss.zero()),
            )
        )
        for policy in sorted(policies.consumers.values(), key=lambda p: p.consumer):
            grant = policy.grants.get(dataset.id)
            if grant is not None:
                rows.append(
                    (
                        policy.consumer,
                        dataset.id,
                        grant.budget.epsilon,
                        grant.budget.delta,
                        *spent.get((policy.consumer, dataset.id), PrivacyLoss.zero()),
                    )
                )
    if args.json:
        keys = ("consumer", "dataset", "epsilon_total", "delta_total", "epsilon_spent", "delta_spent")
        _json([dict(zip(keys, row)) for row in rows])
        return OK
    print(
        format_table(
            ("consumer", "dataset", "epsilon spent", "epsilon total", "delta spent", "delta total"),
            [(c, d, eps, eps_total, delta, delta_total) for c, d, eps_total, delta_total, eps, delta in rows],
        )
    )
    return OK


# --- wiring: one registration function per command group ---------------------------------


@dataclasses.dataclass
class Registry:
    """What a command group needs to add its commands (`register_*(registry)`)."""

    sub: Any  # the top-level subparsers

    def command(
        self,
        name: str,
        func: Callable[[argparse.Namespace], int],
        help: str,
        parent: Any = None,
        config: bool = True,
    ) -> argparse.ArgumentParser:
        p = (parent or self.sub).add_parser(name, help=help, description=help, epilog=EXIT_CODES)
        p.set_defaults(func=func)
        if config:
            p.add_argument("--config", "-c", type=Path, default=DEFAULT_CONFIG, help="dataops.toml")
        return p

    def group(self, name: str, help: str, *, required: bool = True) -> Any:
        parser = self.sub.add_parser(name, help=help, description=help, epilog=EXIT_CODES)
        groups = parser.add_subparsers(dest=f"{name}_command", required=required, metavar="COMMAND")
        groups.parser = parser  # so a group with a default action can take options too
        return groups


def register_consumer(r: Registry) -> None:
    p = r.command("datasets", cmd_datasets, "list your datasets, or describe one", config=False)
    p.add_argument("dataset", nargs="?")
    add_connection_options(p)
    p = r.command(
        "query", cmd_query, "run a query: rows, then accuracy, spend and the audit receipt", config=False
    )
    add_query_options(p, dataset_required=False)  # --sql names the dataset itself
    add_sql_option(p)
    add_connection_options(p)
    p = r.command(
        "estimate",
        cmd_estimate,
        "what a query would spend and how accurate it would be; nothing is run or spent",
        config=False,
    )
    add_query_options(p, dataset_required=False)
    add_sql_option(p)
    add_connection_options(p)


def register_budget(r: Registry) -> None:
    budget = r.group(
        "budget",
        "privacy budgets: yours over gRPC (`dataops budget`), or every grant's "
        "from the ledger (`dataops budget show`, operators)",
        required=False,
    )
    budget.parser.set_defaults(func=cmd_budget)
    budget.parser.add_argument("--dataset", "-d", help="one dataset only")
    add_connection_options(budget.parser)
    p = r.command(
        "show",
        cmd_budget_show,
        "every grant's and dataset's privacy budget: spent and total (operators; reads the ledger)",
        budget,
    )
    p.add_argument("--json", action="store_true", dest="json_show")


def register_operator(r: Registry) -> None:
    p = r.command(
        "init",
        cmd_init,
        "scaffold a working directory: dataops.toml, catalog/, policies/, "
        "products/, sandbox/, state/ and the certificates",
        config=False,
    )
    p.add_argument("directory", type=Path)
    p.add_argument(
        "--server-name",
        action="append",
        default=[],
        metavar="NAME",
        help="a DNS name the server certificate covers (repeatable; localhost always)",
    )
    p.add_argument(
        "--ip",
        action="append",
        default=[],
        metavar="ADDR",
        help="an IP address the server certificate covers (repeatable; 127.0.0.1 and ::1 always)",
    )
    p.add_argument("--listen", default="127.0.0.1:50051", help="[server] listen (default 127.0.0.1:50051)")

    p = r.command("serve", cmd_serve, "run the sandbox server (mTLS gRPC) from dataops.toml")
    p.add_argument("--listen", metavar="HOST:PORT", help="override [server] listen, e.g. 0.0.0.0:50051")

    certs = r.group("certs", "the platform CA and certificates")

    def pki_option(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--dir",
            type=Path,
            help="the PKI directory (default: the config's [tls] ca_cert "
            "directory; ./state/pki without a dataops.toml)",
        )

    p = r.command("init", cmd_certs_init, "make the platform CA and the server certificate", certs)
    p.add_argument(
        "--server-name",
        action="append",
        default=[],
        metavar="NAME",
        help="a DNS name clients reach the server by (repeatable; localhost is always included)",
    )
    p.add_argument(
        "--ip",
        action="append",
        default=[],
        metavar="ADDR",
        help="an IP address clients reach the server by (repeatable; 127.0.0.1 and ::1 always)",
    )
    p.add_argument("--force", action="store_true", help="replace an existing CA")
    pki_option(p)
    p = r.command("issue", cmd_certs_issue, "make a consumer's key and certificate", certs)
    p.add_argument("consumer")
    p.add_argument("--out", type=Path, help="directory for the three files")
    p.add_argument("--force", action="store_true", help="replace the consumer's existing key")
    pki_option(p)
    p = r.command("revoke", cmd_certs_revoke, "revoke a consumer's certificate (CA-signed CRL)", certs)
    p.add_argument("consumer")
    p.add_argument("--cert", type=Path, help="the certificate to revoke (default: the one `issue` wrote)")
    pki_option(p)
    p = r.command(
        "list", cmd_certs_list, "the CA, server and consumer certificates: names, expiry, revocation", certs
    )
    p.add_argument("--json", action="store_true")
    pki_option(p)

    policy = r.group("policy", "validate and explain policies")
    p = r.command(
        "check",
        cmd_policy_check,
        "check everything `serve` checks at start: config, catalog "
        "and data files, policies, products; every error at once",
        policy,
    )
    p.add_argument("--policies", type=Path, help="a policy directory other than the configured one")
    p = r.command(
        "explain", cmd_policy_explain, "say which rule allows or denies a query, budget included", policy
    )
    p.add_argument("--consumer", required=True)
    p.add_argument("--date", type=_iso_date, help="decide as of this ISO date (default: today, UTC)")
    add_query_options(p)
    tables = r.group("tables", "published, protected tables (exact answers are lookups in them)")
    p = r.command(
        "show",
        cmd_tables_show,
        "a table's protection result: cells suppressed (primary, "
        "secondary), information loss, the LP audit's verdict",
        tables,
    )
    p.add_argument("table", nargs="?", help="a table product id (default: every table)")
    p = r.command(
        "schema",
        cmd_policy_schema,
        "print the JSON Schema of policy or catalog files (for editors)",
        policy,
        config=False,
    )
    p.add_argument("kind", choices=["policy", "catalog"], nargs="?", default="policy")
    p.add_argument("--out", type=Path)

    p = r.command("ingest", cmd_ingest, "take a CSV or Parquet file into the sandbox")
    p.add_argument("file", type=Path)
    p.add_argument("--dataset", required=True)
    p.add_argument("--zone", required=True)
    p.add_argument("--title")
    p.add_argument("--provider", default="unknown")
    p.add_argument("--unit", help="the privacy-unit column (default: the first *_id column)")
    p.add_argument("--force", action="store_true")


def register_others(r: Registry) -> None:
    from dataops.audit.commands import add_audit_parser

    try:
        from dataops.demo.session import add_demo_parser
    except ImportError:  # a client-only install: the demo runs the server

        def add_demo_parser(sub: Any) -> None:
            def needs_server(args: argparse.Namespace) -> int:
                raise UsageError("the demo runs the server: pip install 'dataops[server]'")

            sub.add_parser("demo", help="run the demo (needs dataops[server])").set_defaults(
                func=needs_server
            )

    add_demo_parser(r.sub)
    add_audit_parser(r.sub)


def register_consents(r: Registry) -> None:
    """`dataops consent`: the stand-in consent service of the demo and tests."""
    from dataops.consent_service import add_consent_parser

    add_consent_parser(r.sub)


# Each command group registers itself; a new group is one function added here.
REGISTRARS: list[Callable[[Registry], None]] = [
    register_consumer,
    register_budget,
    register_operator,
    register_others,
    register_consents,
]


def _iso_date(text: str) -> dt.date:
    try:
        return dt.date.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an ISO date such as 2027-01-31") from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dataops", description="Public-data operation sandbox.", epilog=EXIT_CODES
    )
    parser.add_argument("--verbose", "-v", action="store_true")
    parser.add_argument("--version", action="version", version=f"dataops {version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    registry = Registry(sub)
    for register in REGISTRARS:
        register(registry)
    return parser


def _refusal(exc: Any) -> tuple[int, list[str]]:
    """The message lines and exit code for a DataopsClientError."""
    from dataops.client import ConnectionFailed, InvalidRequest

    if isinstance(exc, InvalidRequest):
        lines = [f"dataops: {exc.message}"] + [f"  {f}: {d}" for f, d in exc.field_violations]
        return USAGE, lines
    if isinstance(exc, ConnectionFailed):
        return REFUSED, [f"dataops: {exc.message}"]
    if exc.reason == "CONFIGURATION":
        return USAGE, [f"dataops: {exc.message}"]
    order = {"rule": 0, "column": 1}  # a protobuf map has no order: print the same line every time
    keys = sorted(
        (k for k in exc.metadata if not k.startswith("receipt")), key=lambda k: (order.get(k, 2), k)
    )
    where = "".join(f" {k}={exc.metadata[k]}" for k in keys)
    lines = [f"dataops: refused: {exc.code.name} {exc.reason or ''}{where}: {exc.message}".replace("  ", " ")]
    lines += [f"  {field}: {description}" for field, description in exc.field_violations]
    lines += [f"  {subject}: {description}" for subject, description in exc.quota_violations]
    if exc.rule == "query.value":
        lines.append(
            "  hint: values that look like numbers or true/false are sent typed; quote a string, "
            "e.g. --eq 'district=\"0101\"'"
        )
    if exc.receipt is not None:
        lines.append(f"  audit receipt #{exc.receipt.sequence} {exc.receipt.hash[:12]}")
    return REFUSED, lines


def _reader_went_away() -> None:
    """`dataops audit show | head`: the reader closed the pipe. Not an error worth a word.

    Point stdout at /dev/null so the interpreter's final flush does not fail again.
    """
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version (0) and usage errors (2)
        return int(exc.code or 0)
    if getattr(args, "json_show", False):
        args.json = True
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    from dataops.certs import CertificateError  # cryptography is in the base install (audit signatures)
    from dataops.client import DataopsClientError

    try:
        return args.func(args)
    except BrokenPipeError:
        _reader_went_away()
        return OK
    except DataopsClientError as exc:
        code, lines = _refusal(exc)
        for line in lines:
            print(line, file=sys.stderr)
        return code
    except Refused:
        return REFUSED
    except UsageError as exc:
        print(f"dataops: {exc}", file=sys.stderr)
        return USAGE
    except (LoadError, CertificateError) as exc:
        print(f"dataops: {exc}", file=sys.stderr)
        return USAGE
    except RequestError as exc:
        print(f"dataops: {exc.reason}: {exc.message}", file=sys.stderr)
        return USAGE
    except OSError as exc:
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"dataops: {where}{exc.strerror or exc}", file=sys.stderr)
        return USAGE
    except ValueError as exc:
        print(f"dataops: {exc}", file=sys.stderr)
        return USAGE
    except ImportError as exc:
        print(
            f"dataops: this command needs the server stack: pip install 'dataops[server]' ({exc})",
            file=sys.stderr,
        )
        return USAGE


if __name__ == "__main__":
    sys.exit(main())
