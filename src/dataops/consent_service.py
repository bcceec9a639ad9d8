"""A stand-in consent service for the demo and tests: `dataops consent init|issue|revoke|list`.

In production the data subject's consent service (an Account-Aggregator-style
consent manager) holds its own signing key and the platform only trusts its public
key. Here one command line plays it:

    dataops consent init [--issuer ID]            make the service's Ed25519 key and trust it
                                                  (appends to CONSENTS/issuers.toml)
    dataops consent issue --subject S --consumer C --product P --purpose X
                          [--days 30] [--periodic month --max-uses 4] [--out FILE]
    dataops consent revoke CONSENT_ID             the subject withdraws: the server refuses it from now
    dataops consent list [--json]                 what was issued, its uses and revocations

The service's key and its register of issued consents live in STATE/consent-service/
(a real service would keep them elsewhere: the register names subjects in clear).
"""

from __future__ import annotations

import argparse
import base64
import datetime as dt
import json
import os
import sys
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from dataops.consent import (
    PERIODS,
    TERMS,
    TRUST_FILE,
    ConsentError,
    ConsentStore,
    Fetch,
    consent_location,
    iso,
    load_issuers,
    new_payload,
    sign,
)

DEFAULT_ISSUER = "city-consent-service"


class ConsentService:
    def __init__(self, directory: Path, consents_dir: Path) -> None:
        self.directory = Path(directory)
        self.consents_dir = Path(consents_dir)

    def key_path(self, issuer: str) -> Path:
        return self.directory / f"{issuer}.key"

    def init(self, issuer: str = DEFAULT_ISSUER, *, trust: bool = True) -> Ed25519PrivateKey:
        """The issuer's key (made once, 0600); with `trust`, its public key goes into issuers.toml."""
        self.directory.mkdir(parents=True, exist_ok=True)
        path = self.key_path(issuer)
        if path.exists():
            loaded = serialization.load_pem_private_key(path.read_bytes(), password=None)
            if not isinstance(loaded, Ed25519PrivateKey):
                raise ConsentError(f"{path}: not an Ed25519 private key")
            key = loaded
        else:
            key = Ed25519PrivateKey.generate()
            pem = key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(pem)
        if trust and issuer not in load_issuers(self.consents_dir):
            raw = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
            self.consents_dir.mkdir(parents=True, exist_ok=True)
            with (self.consents_dir / TRUST_FILE).open("a") as f:
                f.write(
                    f'\n[[issuers]]\nid = "{issuer}"\npublic_key = "{base64.b64encode(raw).decode()}"\n'
                    f'description = "written by dataops consent init"\n'
                )
        return key

    def issue(
        self,
        *,
        subject: str,
        consumer: str,
        products: list[str],
        purpose: str,
        issuer: str = DEFAULT_ISSUER,
        not_before: dt.datetime | None = None,
        not_after: dt.datetime | None = None,
        days: float = 30.0,
        fetch: Fetch = Fetch("once"),
        consent_id: str | None = None,
        key: Ed25519PrivateKey | None = None,
    ) -> bytes:
        """A signed artefact; recorded in the service's register."""
        if key is None:
            if not self.key_path(issuer).exists():
                raise ValueError(
                    f"no key for issuer {issuer!r} in {self.directory}: run `dataops consent init` first"
                )
            key = self.init(issuer, trust=False)
        now = dt.datetime.now(dt.UTC).replace(microsecond=0)
        not_before = not_before or now - dt.timedelta(minutes=5)
        not_after = not_after or now + dt.timedelta(days=days)
        payload = new_payload(
            issuer=issuer,
            subject=subject,
            consumer=consumer,
            products=products,
            purpose=purpose,
            not_before=not_before,
            not_after=not_after,
            fetch=fetch,
            consent_id=consent_id,
        )
        artefact = sign(payload, issuer, key)
        self.directory.mkdir(parents=True, exist_ok=True)
        with (self.directory / "issued.jsonl").open("a") as f:
            f.write(json.dumps({k: payload[k] for k in TERMS}) + "\n")
        return artefact

    def issued(self) -> list[dict[str, Any]]:
        path = self.directory / "issued.jsonl"
        return [json.loads(line) for line in path.read_text().splitlines() if line] if path.exists() else []


def _service(args: argparse.Namespace):
    from dataops.config import load_config

    config = load_config(args.config)
    return config, ConsentService(config.state_paths.consent_service, config.paths.consents)


def cmd_init(args: argparse.Namespace) -> int:
    config, service = _service(args)
    service.init(args.issuer)
    print(
        f"issuer {args.issuer!r}: key in {service.key_path(args.issuer)}, trusted in "
        f"{config.paths.consents / TRUST_FILE} (restart the server to pick it up)"
    )
    return 0


def cmd_issue(args: argparse.Namespace) -> int:
    _, service = _service(args)
    if (args.periodic is None) != (args.max_uses is None):
        raise ValueError("--periodic and --max-uses go together")
    fetch = Fetch("periodic", args.periodic, args.max_uses) if args.periodic else Fetch("once")
    artefact = service.issue(
        subject=args.subject,
        consumer=args.consumer,
        products=args.product,
        purpose=args.purpose,
        issuer=args.issuer,
        days=args.days,
        fetch=fetch,
    )
    consent_id = service.issued()[-1]["id"]
    if args.out:
        args.out.write_bytes(artefact)
        print(f"consent {consent_id} written to {args.out}")
    else:
        sys.stdout.write(artefact.decode() + "\n")
    return 0


def cmd_revoke(args: argparse.Namespace) -> int:
    from dataops.config import load_config

    config = load_config(args.config)
    store = ConsentStore(consent_location(config))
    try:
        fresh = store.revoke(args.consent_id, args.reason)
    finally:
        store.close()
    print(f"consent {args.consent_id} {'revoked' if fresh else 'was already revoked'}")
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    config, service = _service(args)
    store = ConsentStore(consent_location(config))
    try:
        revoked, uses = store.revocations(), store.uses()
    finally:
        store.close()
    rows = []
    for item in service.issued():
        fetch = item["fetch"]
        rows.append(
            {
                **item,
                "revoked": revoked.get(item["id"]),
                "uses": uses.get(item["id"], {}),
                "fetch": "once" if fetch["type"] == "once" else f"{fetch['max_uses']} per {fetch['period']}",
            }
        )
    if args.json:
        for row in rows:
            print(json.dumps(row))
        return 0
    for row in rows:
        state = (
            f"revoked {row['revoked']}"
            if row["revoked"]
            else ("expired" if row["not_after"] <= iso(dt.datetime.now(dt.UTC)) else "valid")
        )
        used = sum(row["uses"].values())
        print(
            f"{row['id']}  {row['consumer']:18} {','.join(row['products']):22} {row['fetch']:14} "
            f"uses {used:<4} until {row['not_after']}  {state}"
        )
    if not rows:
        print("no consents issued")
    return 0


def add_consent_parser(sub: Any) -> None:
    consent = sub.add_parser(
        "consent",
        help="play the consent service: issue, revoke and list consents",
        description=__doc__.splitlines()[0],
    )
    commands = consent.add_subparsers(dest="consent_command", required=True)

    def command(name: str, func: Any, help: str) -> argparse.ArgumentParser:
        p = commands.add_parser(name, help=help, description=help)
        p.set_defaults(func=func)
        p.add_argument("--config", "-c", type=Path, default=Path("dataops.toml"), help="dataops.toml")
        return p

    p = command("init", cmd_init, "make the consent service's signing key and trust it")
    p.add_argument("--issuer", default=DEFAULT_ISSUER)
    p = command("issue", cmd_issue, "issue a signed consent artefact")
    p.add_argument("--subject", required=True, help="the data subject's id (enterprise or person)")
    p.add_argument("--consumer", required=True)
    p.add_argument("--product", required=True, action="append", help="repeatable")
    p.add_argument("--purpose", required=True)
    p.add_argument("--days", type=float, default=30.0, help="valid from now for this many days (default 30)")
    p.add_argument("--periodic", choices=PERIODS, help="periodic fetch: the counting period")
    p.add_argument("--max-uses", type=int, help="periodic fetch: evaluations allowed per period")
    p.add_argument("--issuer", default=DEFAULT_ISSUER)
    p.add_argument("--out", type=Path, help="write the artefact here (default: stdout)")
    p = command("revoke", cmd_revoke, "revoke a consent; the server refuses it from now on")
    p.add_argument("consent_id")
    p.add_argument("--reason", default="revoked by the subject")
    p = command("list", cmd_list, "list issued consents with their uses and revocations")
    p.add_argument("--json", action="store_true")
