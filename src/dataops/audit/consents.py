"""`dataops audit consents`: every use of a consent, and proof that none ran without a valid one.

Each subject evaluation leaves an entry in its RPC's audit record (`dataops.subjects`):
the product, the consent id and issuer (once the signature verified), the artefact's
digest, its fetch terms and validity window, the counting period and use number, a
keyed hash of the subject id and a hash of the outputs. This command lists those
entries and checks every released one (decision "allowed"):

* it names a verified consent (id, issuer, digest) and carries a subject and outputs hash;
* the record's time lies in the consent's validity window;
* the consent had not been revoked before (revocations from the server's consent store);
* per consent and period, releases do not exceed the fetch terms ("once": one, ever).

It exits 0 when every check holds and 1 when one does not (like `audit verify`). It
reads the log without verifying the chain: run `dataops audit verify` for that.
"""

from __future__ import annotations

import argparse
import collections
import datetime as dt
import hashlib
import hmac
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

EVALUATION_METHODS = ("Evaluate", "EvaluateBatch", "Watch")


def _limit(fetch: str | None) -> int | None:
    if fetch == "once":
        return 1
    if fetch and fetch.startswith("periodic:"):
        return int(fetch.rsplit(":", 1)[1])
    return None


def iter_entries(directory: Path) -> Iterator[dict[str, Any]]:
    from dataops.audit.reader import iter_records

    for _, record in iter_records(directory):
        for entry in record.get("evaluations") or ():
            yield {
                "seq": record.get("seq"),
                "time": record.get("time"),
                "consumer": record.get("consumer"),
                "method": record.get("method"),
                **entry,
            }


def audited_uses(directory: Path) -> dict[tuple[str, str], int]:
    """Released evaluations per (consent, period), as the audit log records them."""
    uses: collections.Counter = collections.Counter()
    for e in iter_entries(directory):
        if e.get("decision") == "allowed" and e.get("consent_id") and e.get("period"):
            uses[(e["consent_id"], e["period"])] += 1
    return dict(uses)


def check(entries: list[dict[str, Any]], revocations: dict[str, str]) -> list[str]:
    """What is wrong with the released evaluations (empty: nothing)."""
    problems = []
    uses: collections.Counter = collections.Counter()
    for e in entries:
        if e.get("decision") != "allowed":
            continue
        where = f"record {e['seq']}"
        missing = [
            k
            for k in (
                "consent_id",
                "issuer",
                "consent_digest",
                "subject_hash",
                "outputs_hash",
                "valid_from",
                "valid_until",
                "fetch",
                "period",
            )
            if not e.get(k)
        ]
        if missing:
            problems.append(f"{where}: a release without {', '.join(missing)}")
            continue
        when = dt.datetime.fromisoformat(e["time"])
        if (
            not dt.datetime.fromisoformat(e["valid_from"])
            <= when
            < dt.datetime.fromisoformat(e["valid_until"])
        ):
            problems.append(f"{where}: consent {e['consent_id']} was not valid at {e['time']}")
        revoked = revocations.get(e["consent_id"])
        if revoked and dt.datetime.fromisoformat(revoked.replace("Z", "+00:00")) <= when:
            problems.append(f"{where}: consent {e['consent_id']} was revoked at {revoked}")
        uses[(e["consent_id"], e["period"])] += 1
        limit = _limit(e["fetch"])
        if limit is not None and uses[(e["consent_id"], e["period"])] > limit:
            problems.append(
                f"{where}: consent {e['consent_id']} ({e['fetch']}) used "
                f"{uses[(e['consent_id'], e['period'])]} times in period {e['period']}"
            )
    return problems


def cmd_consents(args: argparse.Namespace) -> int:
    from dataops.audit.commands import log_dir
    from dataops.config import StatePaths
    from dataops.consent import ConsentStore, consent_location, store_path
    from dataops.ledger_store import is_postgres

    directory = log_dir(args)
    state = directory.parent
    entries = list(iter_entries(directory))
    # With the configuration, where the server counts (PostgreSQL, shared by replicas);
    # with --log-dir alone, the SQLite store of that state directory, if there is one.
    if args.log_dir is None:
        from dataops.config import load_config

        store: Path | str = consent_location(load_config(args.config))
    else:
        store = store_path(state)
    revocations = {}
    if is_postgres(store) or Path(store).exists():
        consents = ConsentStore(store)
        try:
            revocations = consents.revocations()
        finally:
            consents.close()
    problems = check(entries, revocations)

    shown = entries
    if args.consent:
        shown = [e for e in shown if e.get("consent_id") == args.consent]
    if args.subject:
        key = StatePaths(state).subject_secret.read_bytes()
        wanted = hmac.new(key, args.subject.encode(), hashlib.sha256).hexdigest()
        shown = [e for e in shown if e.get("subject_hash") == wanted]
    if args.json:
        for e in shown:
            print(json.dumps(e, sort_keys=True))
    else:
        print(
            f"{'seq':>6}  {'time':19}  {'consumer':16}  {'method':13}  {'product':18}  {'consent':36}  "
            f"{'decision':8}  {'rule':22}  {'use':12}  subject#      outputs#"
        )
        for e in shown:
            use = f"{e.get('period', '-')}#{e.get('use', '-')}" if e.get("period") else "-"
            print(
                f"{e['seq']!s:>6}  {(e.get('time') or '')[:19].replace('T', ' '):19}  {e.get('consumer') or '-':16}  "
                f"{e.get('method') or '-':13}  {e.get('product') or '-':18}  {e.get('consent_id') or '-':36}  "
                f"{e.get('decision'):8}  {e.get('rule') or '-':22}  {use:12}  "
                f"{(e.get('subject_hash') or '-')[:12]:12}  {(e.get('outputs_hash') or '-')[:12]}"
            )
        released = [e for e in entries if e.get("decision") == "allowed"]
        print(
            f"{len(shown)} entries shown; {len(released)} evaluations released under "
            f"{len({e.get('consent_id') for e in released})} consents, "
            f"{len(entries) - len(released)} refused"
        )
    for problem in problems:
        print(f"PROBLEM {problem}")
    if not problems:
        print(
            "every released evaluation ran under a verified consent, in its window, unrevoked and within its uses"
        )
    return 1 if problems else 0
