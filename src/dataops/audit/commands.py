"""`dataops audit …`: the compliance reviewer's commands.

    dataops audit verify [--public-key FILE] [--witness FILE]      tree, chain, signatures; 0 ok, 1 tampered, 2 error
    dataops audit receipt SEQ HASH                                 is this receipt in the verified log?
    dataops audit show [--consumer …] [--since …] [--json]         filter and read records
    dataops audit export --format csv|parquet --out FILE           a verified range, verifiable on its own
    dataops audit verify-export FILE [--public-key FILE]           check such an export
    dataops audit report --out FILE.html                           one offline HTML page with charts
    dataops audit public-key [--signer-dir DIR] [--out FILE]       the key reviewers verify with
    dataops audit consents [--consent ID] [--subject ID]           every use of a consent; exit 1 if one ran invalid
    dataops audit merge DIR DIR... [--public-key FILE]... [--json] several replicas' logs, each verified, as one

Each reads `-c dataops.toml` for the state directory (the log is STATE/audit) or takes
`--log-dir DIR` to point at an audit directory directly, e.g. a copy on a reviewer's
machine. Exit codes: 0 success, 1 the log or export does not verify (or a receipt is
not in it), 2 usage or I/O error.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from dataops.audit.signing import PUBLIC_KEY, key_id, load_public_key
from dataops.audit.verify import Verification

OK, TAMPERED, ERROR = 0, 1, 2


class _UsageError(Exception):
    """A problem with the command line or the files it names: exit 2."""


def add_audit_parser(subparsers: Any) -> argparse.ArgumentParser:
    audit = subparsers.add_parser(
        "audit", help="verify, read, export and report on the audit log", description=__doc__.split("\n\n")[0]
    )
    sub = audit.add_subparsers(dest="audit_command", required=True)

    def command(name: str, func: Callable[[argparse.Namespace], int], help: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=help)
        p.set_defaults(func=_guarded(func))
        p.add_argument("--config", "-c", type=Path, default=Path("dataops.toml"), help="dataops.toml")
        p.add_argument(
            "--log-dir", type=Path, help="an audit directory (default: STATE/audit from the config)"
        )
        return p

    def public_key_option(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--public-key",
            type=Path,
            metavar="FILE",
            help=f"the log's public key (PEM); default: {PUBLIC_KEY} in the audit directory",
        )

    def held_option(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--witness",
            "--checkpoint",
            dest="checkpoint",
            type=Path,
            action="append",
            default=[],
            metavar="FILE",
            help="checkpoints held outside the host (a client's checkpoint file, a copy of "
            "checkpoints.jsonl; repeatable): the log must still contain exactly what they signed",
        )

    p = command(
        "verify", cmd_verify, "check the hash chain and checkpoint signatures with only the public key"
    )
    public_key_option(p)
    held_option(p)

    p = command("receipt", cmd_receipt, "check that a receipt (sequence and hash) is in the verified log")
    p.add_argument("sequence", type=int)
    p.add_argument("hash", help="the receipt hash (at least its first 12 hex digits)")
    public_key_option(p)
    held_option(p)

    p = command("show", cmd_show, "list records, filtered (does not verify: run `audit verify`)")
    add_filter_options(p)
    p.add_argument("--limit", type=int, metavar="N", help="only the last N matching records")
    p.add_argument("--json", action="store_true", help="JSON Lines, one stored record per line")

    p = command(
        "export",
        cmd_export,
        "write a verified range of records as CSV or Parquet, with the "
        "checkpoint and public key that let it be verified on its own",
    )
    p.add_argument("--format", choices=["csv", "parquet"], default="csv")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--from-seq", type=int, default=1)
    p.add_argument(
        "--to-seq",
        type=int,
        help="default: the last signed checkpoint; a range is extended "
        "to the next checkpoint so that a signature covers its end",
    )
    public_key_option(p)

    p = command("verify-export", cmd_verify_export, "check an export made by `audit export` on its own")
    p.add_argument("file", type=Path)
    p.add_argument(
        "--public-key",
        type=Path,
        metavar="FILE",
        help="the key you hold for the log (default: the key shipped in the export)",
    )

    p = command(
        "report",
        cmd_report,
        "write one self-contained HTML page: verification, privacy budget, queries, denials, suppressions",
    )
    p.add_argument("--out", type=Path, default=Path("audit-report.html"))
    add_filter_options(p)
    public_key_option(p)

    p = command("public-key", cmd_public_key, "write the log's public key (PEM) for reviewers")
    p.add_argument(
        "--signer-dir",
        type=Path,
        metavar="DIR",
        help="the signer's directory (run as the signer's user): its key is the one that signs",
    )
    p.add_argument("--out", type=Path, help="file to write (default: print it)")

    from dataops.audit.consents import cmd_consents

    p = command(
        "consents",
        cmd_consents,
        "every use of a consent, and a check that no subject evaluation "
        "ran without a valid one (exit 1 if one did)",
    )
    p.add_argument("--consent", metavar="ID", help="only this consent's uses")
    p.add_argument("--subject", metavar="ID", help="only this subject's (hashed with the server's key)")
    p.add_argument("--json", action="store_true")

    p = command(
        "merge",
        cmd_merge,
        "verify the audit logs of several server replicas, each on its own, and list their "
        "records as one, by time, with the spend per grant over all of them",
    )
    p.add_argument("log_dirs", type=Path, nargs="+", metavar="DIR", help="one audit directory per replica")
    p.add_argument(
        "--public-key",
        type=Path,
        action="append",
        default=[],
        metavar="FILE",
        help=f"each log's public key, in the order of the directories (default: {PUBLIC_KEY} in each)",
    )
    p.add_argument("--json", action="store_true", help='JSON Lines: {"replica": ..., "record": {...}}')
    return audit


def add_filter_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--consumer")
    p.add_argument("--dataset")
    p.add_argument("--since", metavar="ISO", help="from this date or time (inclusive; UTC if no zone)")
    p.add_argument("--until", metavar="ISO", help="before this date or time (exclusive)")
    p.add_argument("--decision", choices=["allowed", "denied", "invalid", "error"])
    p.add_argument("--reason", help="ErrorInfo reason, e.g. POLICY_DENIED (any case)")
    p.add_argument("--method", help="RPC name, e.g. RunQuery (any case)")


def _guarded(func: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """Usage and I/O errors exit 2 with one line, so 1 always means 'does not verify'."""

    def run(args: argparse.Namespace) -> int:
        from dataops.errors import LoadError

        try:
            return func(args)
        except BrokenPipeError:
            raise  # the reader closed the pipe (`| head`): `dataops` ends quietly
        except (_UsageError, LoadError, OSError, ValueError) as exc:
            print(f"dataops audit: {exc}", file=sys.stderr)
            return ERROR

    return run


# --- where things are ------------------------------------------------------------


def log_dir(args: argparse.Namespace) -> Path:
    if args.log_dir is not None:
        if not args.log_dir.is_dir():
            raise _UsageError(f"--log-dir {args.log_dir}: not a directory")
        return args.log_dir
    from dataops.config import load_config

    return load_config(args.config).state_paths.audit_dir


def public_key(args: argparse.Namespace, directory: Path):
    if getattr(args, "public_key", None) is not None:
        return load_public_key(args.public_key)
    if (directory / PUBLIC_KEY).exists():
        return load_public_key(directory / PUBLIC_KEY)
    raise _UsageError(f"no public key in {directory}; pass --public-key FILE")


def _filter(args: argparse.Namespace):
    from dataops.audit.reader import RecordFilter, parse_time

    return RecordFilter(
        consumer=args.consumer,
        dataset=args.dataset,
        decision=args.decision,
        reason=args.reason,
        method=args.method,
        since=parse_time(args.since) if args.since else None,
        until=parse_time(args.until) if args.until else None,
    )


# --- commands --------------------------------------------------------------------


def cmd_verify(args: argparse.Namespace) -> int:
    from dataops.audit.verify import verify_log

    directory = log_dir(args)
    held = list(args.checkpoint) + _signer_anchor(args)
    v = verify_log(directory, public_key(args, directory), held=held)
    print_verification(v)
    return OK if v.ok else TAMPERED


def _signer_anchor(args: argparse.Namespace) -> list[Path]:
    """The signer's last checkpoint as one more witness, when this user can read it.

    It is newer than anything in checkpoints.jsonl and out of the server's reach; read
    from the config's `[audit] signer_dir` (not with --log-dir: a copied log has none).
    """
    if args.log_dir is not None:
        return []
    from dataops.audit.signer import STATE
    from dataops.config import load_config

    anchor = load_config(args.config).signer_dir / STATE
    try:
        readable = anchor.is_file() and os.access(anchor, os.R_OK)
    except OSError:
        readable = False
    if readable:
        print(f"note: also checking against the signer's last checkpoint ({anchor})", file=sys.stderr)
        return [anchor]
    return []


def print_verification(v: Verification, out: Callable[[str], None] = print) -> None:
    if v.ok:
        head = f"head seq {v.head[0]} {v.head[1]}" if v.head else "empty log"
        out(
            f"OK: {v.records} records, {len(v.checkpoints)} signed checkpoints (signed up to seq {v.signed_size}), "
            f"public key id {v.key_id}; {head}"
        )
    else:
        first, *rest = v.problems
        out(f"TAMPERED: {first}")
        for problem in rest:
            out(f"  also: {problem}")
        out(f"  ({v.records} records chain correctly before this; public key id {v.key_id})")
    for note in v.notes:
        out(f"  note: {note}")


def cmd_merge(args: argparse.Namespace) -> int:
    from dataops.audit.merge import merge_logs

    for directory in args.log_dirs:
        if not directory.is_dir():
            raise _UsageError(f"{directory}: not a directory")
    if args.public_key and len(args.public_key) != len(args.log_dirs):
        raise _UsageError("give one --public-key per directory, in the same order, or none")
    keys = []
    for i, directory in enumerate(args.log_dirs):
        if args.public_key:
            keys.append(load_public_key(args.public_key[i]))
        elif (directory / PUBLIC_KEY).exists():
            keys.append(load_public_key(directory / PUBLIC_KEY))
        else:
            raise _UsageError(f"no public key in {directory}; pass --public-key FILE for each directory")
    merged = merge_logs(args.log_dirs, keys)
    for name, v in merged.verifications:

        def to_stderr(line: str, name: str = name) -> None:  # each line names its replica
            print(f"{name}: {line}", file=sys.stderr)

        print_verification(v, to_stderr)
    if not merged.ok:
        print("TAMPERED: not merged; every log must verify on its own first", file=sys.stderr)
        return TAMPERED
    if args.json:
        for name, record in merged.records:
            print(json.dumps({"replica": name, "record": record}, sort_keys=True, ensure_ascii=False))
        return OK
    columns = ("replica", "seq", "time", "consumer", "method", "dataset", "decision", "epsilon")
    rows = [
        {
            "replica": name,
            "seq": r.get("seq"),
            "time": (r.get("time") or "")[:23].replace("T", " "),
            "consumer": r.get("consumer"),
            "method": r.get("method"),
            "dataset": r.get("dataset"),
            "decision": r.get("decision"),
            "epsilon": f"{r['epsilon_spent']:.4g}" if r.get("epsilon_spent") else None,
        }
        for name, r in merged.records
    ]
    widths = {c: max([len(c)] + [len(_cell(row[c])) for row in rows]) for c in columns}
    print("  ".join(f"{c:<{widths[c]}}" for c in columns).rstrip())
    for row in rows:
        print("  ".join(f"{_cell(row[c]):<{widths[c]}}" for c in columns).rstrip())
    print(f"{len(rows)} records from {len(merged.verifications)} logs")
    for (consumer, dataset), (eps, delta) in merged.spend.items():
        print(
            f"spent by {consumer} on {dataset}, all replicas: epsilon {eps / 1e12:.6g}, delta {delta / 1e18:.3g}"
        )
    return OK


def cmd_receipt(args: argparse.Namespace) -> int:
    from dataops.audit.verify import find_receipt

    directory = log_dir(args)
    check = find_receipt(
        directory, args.sequence, args.hash, public_key(args, directory), held=args.checkpoint
    )
    label = {"verified": "FOUND", "unsigned": "FOUND (not yet signed)"}.get(check.status, "NOT VERIFIED")
    print(f"{label}: receipt #{args.sequence} {args.hash[:12]}: {check.message}")
    return OK if check.ok else TAMPERED


SHOW_COLUMNS = (
    "seq",
    "time",
    "consumer",
    "method",
    "dataset",
    "decision",
    "reason",
    "rule",
    "column",
    "rows",
    "supp",
    "epsilon",
)
# Filters that compare a record field, and the plural used to list the values that do exist.
FILTER_FIELDS = (
    ("consumer", "consumers"),
    ("dataset", "datasets"),
    ("method", "methods"),
    ("decision", "decisions"),
    ("reason", "reasons"),
)


def cmd_show(args: argparse.Namespace) -> int:
    from dataops.audit.reader import iter_records

    wanted = _filter(args)
    matches: collections.deque = collections.deque(
        maxlen=args.limit if args.limit and args.limit > 0 else None
    )
    seen: dict[str, set] = {name: set() for name, _ in FILTER_FIELDS}
    total = 0
    for _, record in iter_records(log_dir(args)):
        total += 1
        for name, _ in FILTER_FIELDS:
            seen[name].add(record.get(name))
        if wanted.matches(record):
            matches.append(record)
    if args.json:
        for record in matches:
            print(json.dumps(record, sort_keys=True, ensure_ascii=False))
    else:
        rows = [
            {
                "seq": r.get("seq"),
                "time": (r.get("time") or "")[:19].replace("T", " "),
                "consumer": r.get("consumer"),
                "method": r.get("method"),
                "dataset": r.get("dataset"),
                "decision": r.get("decision"),
                "reason": r.get("reason"),
                "rule": r.get("rule"),
                "column": r.get("column"),
                "rows": r.get("rows_returned"),
                "supp": r.get("rows_suppressed"),
                "epsilon": f"{r['epsilon_spent']:.4g}" if r.get("epsilon_spent") else None,
            }
            for r in matches
        ]
        # Every cell in full: a column is as wide as its widest value (rules are never cut).
        widths = {name: max([len(name)] + [len(_cell(row[name])) for row in rows]) for name in SHOW_COLUMNS}
        print("  ".join(f"{name:<{widths[name]}}" for name in SHOW_COLUMNS).rstrip())
        for row in rows:
            print("  ".join(f"{_cell(row[name]):<{widths[name]}}" for name in SHOW_COLUMNS).rstrip())
        print(f"{len(matches)} records")
    if not matches:
        for note in why_nothing_matched(args, seen, total):
            print(f"note: {note}", file=sys.stderr)
    return OK


def why_nothing_matched(args: argparse.Namespace, seen: dict[str, set], total: int) -> list[str]:
    """For each filter whose value no record has, the values that the log does hold."""
    if total == 0:
        return ["the log holds no records"]
    notes = []
    for name, plural in FILTER_FIELDS:
        value = getattr(args, name, None)
        if value is None:
            continue
        present = sorted(str(v) for v in seen[name] if v is not None)
        # Method names and reasons are matched without case, as the filters match them.
        folded = name in ("method", "reason")
        if not any((v.lower() == value.lower()) if folded else (v == value) for v in present):
            notes.append(
                f"no record has {name} {value!r}; {plural} in the log: {', '.join(present) or 'none'}"
            )
    if not notes:
        notes.append(f"each filter matches some of the {total} records, but no record matches them all")
    return notes


def _cell(value: Any) -> str:
    return "-" if value is None else str(value)


def cmd_export(args: argparse.Namespace) -> int:
    from dataops.audit.export import export_log

    directory = log_dir(args)
    result = export_log(
        directory,
        args.out,
        public_key(args, directory),
        fmt=args.format,
        from_seq=args.from_seq,
        to_seq=args.to_seq,
    )
    if args.to_seq is not None and result.to_seq != args.to_seq:
        print(
            f"note: extended the range to seq {result.to_seq}, the next signed checkpoint, so that its "
            "end is covered by a signature",
            file=sys.stderr,
        )
    print(
        f"exported records {result.from_seq}..{result.to_seq} to {result.path} "
        f"(checkpoint #{result.checkpoint['checkpoint']} and public key in {result.sidecar})"
    )
    return OK


def cmd_verify_export(args: argparse.Namespace) -> int:
    from dataops.audit.export import verify_export

    key = load_public_key(args.public_key) if args.public_key else None
    v = verify_export(args.file, key)
    if v.ok:
        cp = v.checkpoint or {}
        print(
            f"OK: {v.rows} records, seq {cp.get('size', 0) - v.rows + 1}..{cp.get('size')}, end signed by "
            f"checkpoint #{cp.get('checkpoint')} at {cp.get('time')}, public key id {v.key_id}"
        )
    else:
        print(f"TAMPERED: {v.problems[0]}")
    for note in v.notes:
        print(f"  note: {note}")
    return OK if v.ok else TAMPERED


def cmd_report(args: argparse.Namespace) -> int:
    from dataops.audit.reader import iter_records
    from dataops.audit.report import write_report
    from dataops.audit.verify import verify_log

    directory = log_dir(args)
    try:
        key = public_key(args, directory)
    except _UsageError as exc:
        print(f"note: {exc}; the report says the log was not verified", file=sys.stderr)
        verification = None
    else:
        verification = verify_log(directory, key)
    wanted = _filter(args)
    records = (r for _, r in iter_records(directory) if wanted.matches(r))
    out = write_report(args.out, records, verification, source=str(directory.resolve()), caps=_caps(args))
    state = "not verified" if verification is None else ("verified" if verification.ok else "DOES NOT VERIFY")
    print(f"wrote {out} (log {state})")
    return TAMPERED if verification is not None and not verification.ok else OK


def _caps(args: argparse.Namespace):
    """The budget caps in force (grants and datasets), when the configuration can be read."""
    from dataops.audit.report import Caps
    from dataops.errors import LoadError

    if not args.config.exists():
        return None
    try:
        from dataops.catalog import load_catalog
        from dataops.config import load_config
        from dataops.policy import load_policies
        from dataops.products import load_products

        config = load_config(args.config)
        catalog = load_catalog(config.paths.catalog, config.paths.sandbox)
        policies = load_policies(
            config.paths.policies, catalog, load_products(config.paths.products, catalog)
        )
    except (LoadError, ImportError) as exc:
        print(f"note: no budget caps in the report: {exc}", file=sys.stderr)
        return None
    grants = {
        (p.consumer, d): g.budget.epsilon for p in policies.consumers.values() for d, g in p.grants.items()
    }
    return Caps(grants, {d.id: d.budget.epsilon for d in catalog.datasets.values()})


def cmd_public_key(args: argparse.Namespace) -> int:
    from dataops.audit.signer import PUBLIC_KEY as SIGNER_PUBLIC_KEY
    from dataops.audit.signing import public_key_pem

    # From the signer's own directory when given: that is the key that really signs.
    key = (
        load_public_key(args.signer_dir / SIGNER_PUBLIC_KEY)
        if args.signer_dir
        else public_key(args, log_dir(args))
    )
    pem = public_key_pem(key)
    if args.out:
        args.out.write_bytes(pem)
        print(f"wrote {args.out} (key id {key_id(key)})")
    else:
        sys.stdout.write(pem.decode("ascii"))
        print(f"key id {key_id(key)}", file=sys.stderr)
    return OK
