"""Consent artefacts: a data subject's signed permission for one consumer to evaluate products.

An artefact is the JSON envelope

    {"issuer": "<issuer id>", "payload": "<base64url of the payload bytes>",
     "signature": "<base64url Ed25519 signature over the payload bytes>"}

and the payload is canonical JSON (sorted keys, no spaces, UTF-8) of

    {"version": 1, "id": "...", "issuer": "...", "subject": "...", "consumer": "...",
     "products": ["..."], "purpose": "...", "not_before": "<UTC ISO>", "not_after": "<UTC ISO>",
     "fetch": {"type": "once"} | {"type": "periodic", "period": "day|week|month|year", "max_uses": N},
     "issued_at": "<UTC ISO>"}

The signature covers the exact payload bytes (not a re-encoding of parsed JSON) and
the payload must be canonical, so one consent has exactly one encoding. Issuers (the
data subject's consent service) are trusted by their public key in the operator's
`consents/issuers.toml`:

    [[issuers]]
    id = "city-consent-service"
    public_key = "<base64 of the raw 32-byte Ed25519 key>"

The server checks, in this order, and refuses with the rule that failed: the envelope
(consent.malformed), the issuer (consent.issuer), the signature (consent.signature),
the payload (consent.malformed), the window (consent.not_yet_valid, consent.expired),
the consumer, subject, product and purpose (consent.consumer, consent.subject,
consent.product, consent.purpose), revocation (consent.revoked) and the use count
(consent.uses). None of these looks at the data, so a refusal is the same whether or
not the subject has rows.

Uses and revocations live in `state/consents/consents.sqlite3` (WAL), or, when
`[ledger] url` names a PostgreSQL database, in that database beside the ledger, where
every server replica counts (`consent_location`). A use is counted in the same write
transaction that checks the limit and the revocation, so concurrent requests
(threads, processes or replicas) cannot overuse a consent and a "once" consent cannot
be replayed: on SQLite the transaction holds the file's only write lock, on
PostgreSQL it locks the count's row before reading it. In-process callers also take a
lock first, so threads queue on it instead of in the database's lock waits.

Durability without a second fsync per evaluation: the SQLite store runs synchronous=NORMAL
(a commit survives a killed process, not a power cut; a FULL commit costs ~6 ms on
the disks we measured, NORMAL ~0.1 ms). Every released evaluation's audit record,
fsynced before the answer leaves, names its consent and counting period, and at
start the server raises each count to what the audit log shows (`reconcile`). So a
use the store lost in a power cut is restored from the log before any request is
served, and a "once" consent stays single-use.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import hashlib
import json
import re
import threading
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from dataops._toml import read_toml
from dataops.config import StatePaths
from dataops.errors import LoadError, PolicyDenied
from dataops.ledger_store import is_postgres, open_store

VERSION = 1
# The terms a consent states, in the order the issuer's record of issued consents keeps
# them (the signed payload adds its version and issue time).
TERMS = ("id", "issuer", "subject", "consumer", "products", "purpose", "not_before", "not_after", "fetch")
PERIODS = ("day", "week", "month", "year")
MAX_ARTEFACT_BYTES = 8192
TRUST_FILE = "issuers.toml"
ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}")


class ConsentError(LoadError):
    """The trust file is wrong (names file and key)."""


class ConsentRefused(PolicyDenied):
    """A consent does not allow this evaluation; the rule names the check that failed."""

    reason = "CONSENT_INVALID"


def canonical(value: Any) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _utc(text: str) -> dt.datetime:
    value = dt.datetime.fromisoformat(text)
    if value.tzinfo is None:
        raise ValueError("no time zone")
    return value.astimezone(dt.UTC)


def iso(value: dt.datetime) -> str:
    return value.astimezone(dt.UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


@dataclass(frozen=True)
class Fetch:
    type: str  # "once" or "periodic"
    period: str | None = None
    max_uses: int = 1

    def period_key(self, now: dt.datetime) -> str:
        """The counting period `now` falls in ("once" has one period, forever)."""
        if self.type == "once":
            return "once"
        if self.period == "day":
            return now.date().isoformat()
        if self.period == "week":
            year, week, _ = now.isocalendar()
            return f"{year}-W{week:02d}"
        if self.period == "month":
            return f"{now.year}-{now.month:02d}"
        return str(now.year)

    def describe(self) -> str:
        return "once" if self.type == "once" else f"periodic:{self.period}:{self.max_uses}"


@dataclass(frozen=True)
class Consent:
    id: str
    issuer: str
    subject: str
    consumer: str
    products: tuple[str, ...]
    purpose: str
    not_before: dt.datetime
    not_after: dt.datetime
    fetch: Fetch
    issued_at: dt.datetime
    digest: str  # SHA-256 of the artefact bytes: identifies this exact artefact in the audit log


@dataclass(frozen=True)
class Issuer:
    id: str
    public_key: Ed25519PublicKey


def load_issuers(consents_dir: Path) -> Mapping[str, Issuer]:
    """The trusted issuers from `consents_dir/issuers.toml` (none if the file is absent)."""
    path = Path(consents_dir) / TRUST_FILE
    if not path.exists():
        return {}
    doc = read_toml(path, ConsentError)
    issuers: dict[str, Issuer] = {}
    for table in doc.tables("issuers"):
        issuer_id = table.string("id", pattern=ID_PATTERN)
        encoded = table.string("public_key")
        try:
            raw = base64.b64decode(encoded, validate=True)
            key = Ed25519PublicKey.from_public_bytes(raw)
        except (binascii.Error, ValueError):
            raise table.fail("public_key", "must be the base64 of a raw 32-byte Ed25519 public key") from None
        table.string("description", "")
        table.reject_unknown()
        if issuer_id in issuers:
            raise table.fail("id", f"issuer {issuer_id!r} is listed twice")
        issuers[issuer_id] = Issuer(issuer_id, key)
    doc.reject_unknown()
    return issuers


def sign(payload: Mapping[str, Any], issuer: str, key: Ed25519PrivateKey) -> bytes:
    """The artefact for `payload`, signed by `issuer`'s key (the consent service's job)."""
    body = canonical(dict(payload))
    envelope = {"issuer": issuer, "payload": _b64(body), "signature": _b64(key.sign(body))}
    return canonical(envelope)


def new_payload(
    *,
    issuer: str,
    subject: str,
    consumer: str,
    products: list[str],
    purpose: str,
    not_before: dt.datetime,
    not_after: dt.datetime,
    fetch: Fetch,
    consent_id: str | None = None,
    issued_at: dt.datetime | None = None,
) -> dict[str, Any]:
    fetch_doc: dict[str, Any] = {"type": fetch.type}
    if fetch.type == "periodic":
        fetch_doc.update(period=fetch.period, max_uses=fetch.max_uses)
    return {
        "version": VERSION,
        "id": consent_id or f"cst-{uuid.uuid4().hex}",
        "issuer": issuer,
        "subject": subject,
        "consumer": consumer,
        "products": sorted(products),
        "purpose": purpose,
        "not_before": iso(not_before),
        "not_after": iso(not_after),
        "fetch": fetch_doc,
        "issued_at": iso(issued_at or dt.datetime.now(dt.UTC)),
    }


def _malformed(what: str) -> ConsentRefused:
    return ConsentRefused(f"the consent is malformed: {what}", rule="consent.malformed")


def verify(artefact: bytes, issuers: Mapping[str, Issuer]) -> Consent:
    """Check the envelope, the issuer and the signature; return the parsed consent.

    Only then is the payload trusted enough to read: everything before the signature
    check is bounded and names no value the caller sent.
    """
    if not artefact:
        raise ConsentRefused("no consent was presented", rule="consent.missing")
    if len(artefact) > MAX_ARTEFACT_BYTES:
        raise _malformed(f"larger than {MAX_ARTEFACT_BYTES} bytes")
    try:
        envelope = json.loads(artefact)
        issuer_id, body, signature = (
            envelope["issuer"],
            _unb64(envelope["payload"]),
            _unb64(envelope["signature"]),
        )
        if not isinstance(issuer_id, str) or set(envelope) != {"issuer", "payload", "signature"}:
            raise ValueError
    except (ValueError, KeyError, TypeError, binascii.Error):
        raise _malformed("not a consent envelope") from None
    issuer = _trusted_issuer(issuers, issuer_id)
    _check_signature(issuer, signature, body)
    try:
        doc = json.loads(body)
        if canonical(doc) != body:
            raise ValueError("not canonical")
        return _parse(doc, issuer_id, hashlib.sha256(artefact).hexdigest())
    except (ValueError, KeyError, TypeError) as exc:
        raise _malformed(f"bad payload ({exc.__class__.__name__})") from None


def _trusted_issuer(issuers: Mapping[str, Issuer], issuer_id: str) -> Issuer:
    issuer = issuers.get(issuer_id)
    if issuer is None:
        raise ConsentRefused("the consent's issuer is not trusted by this platform", rule="consent.issuer")
    return issuer


def _check_signature(issuer: Issuer, signature: bytes, body: bytes) -> None:
    """The payload bytes are exactly what the issuer signed (a forgery fails here)."""
    try:
        issuer.public_key.verify(signature, body)
    except InvalidSignature:
        raise ConsentRefused("the consent's signature does not verify", rule="consent.signature") from None


def _text(doc: Mapping[str, Any], key: str) -> str:
    value = doc[key]
    if not isinstance(value, str) or not value or len(value) > 256:
        raise ValueError(key)
    return value


def _parse(doc: Mapping[str, Any], issuer: str, digest: str) -> Consent:
    if set(doc) != {"version", *TERMS, "issued_at"} or doc["version"] != VERSION or doc["issuer"] != issuer:
        raise ValueError("fields")
    consent_id = _text(doc, "id")
    if not ID_PATTERN.fullmatch(consent_id):
        raise ValueError("id")
    products = doc["products"]
    if not isinstance(products, list) or not products or not all(isinstance(p, str) and p for p in products):
        raise ValueError("products")
    fetch_doc = doc["fetch"]
    if fetch_doc == {"type": "once"}:
        fetch = Fetch("once")
    elif (
        isinstance(fetch_doc, dict)
        and set(fetch_doc) == {"type", "period", "max_uses"}
        and fetch_doc["type"] == "periodic"
        and fetch_doc["period"] in PERIODS
        and isinstance(fetch_doc["max_uses"], int)
        and not isinstance(fetch_doc["max_uses"], bool)
        and 1 <= fetch_doc["max_uses"] <= 1_000_000_000
    ):
        fetch = Fetch("periodic", fetch_doc["period"], fetch_doc["max_uses"])
    else:
        raise ValueError("fetch")
    not_before, not_after = _utc(_text(doc, "not_before")), _utc(_text(doc, "not_after"))
    if not_after <= not_before:
        raise ValueError("window")
    return Consent(
        consent_id,
        issuer,
        _text(doc, "subject"),
        _text(doc, "consumer"),
        tuple(products),
        _text(doc, "purpose"),
        not_before,
        not_after,
        fetch,
        _utc(_text(doc, "issued_at")),
        digest,
    )


def check_terms(
    consent: Consent,
    *,
    consumer: str,
    subject: str,
    product: str,
    purposes: tuple[str, ...],
    now: dt.datetime,
) -> None:
    """The consent covers this consumer, subject, product and purpose, now."""
    _check_window(consent, now)
    _check_parties(consent, consumer=consumer, subject=subject, product=product, purposes=purposes)


def _check_window(consent: Consent, now: dt.datetime) -> None:
    if now < consent.not_before:
        raise ConsentRefused("the consent is not valid yet", rule="consent.not_yet_valid")
    if now >= consent.not_after:
        raise ConsentRefused("the consent has expired", rule="consent.expired")


def _check_parties(
    consent: Consent, *, consumer: str, subject: str, product: str, purposes: tuple[str, ...]
) -> None:
    if consent.consumer != consumer:
        raise ConsentRefused("the consent was given to another consumer", rule="consent.consumer")
    if consent.subject != subject:
        raise ConsentRefused("the consent does not name this subject", rule="consent.subject")
    if product not in consent.products:
        raise ConsentRefused("the consent does not cover this product", rule="consent.product")
    if consent.purpose not in purposes:
        raise ConsentRefused("the consent's purpose is not a purpose of this product", rule="consent.purpose")


class ConsentStore:
    """Use counts and revocations, durable and atomic; see the module docstring.

    `where` is the SQLite file (`store_path`), or the ``postgresql://`` URL of the
    ledger's database (`consent_location`), which several server replicas share: a
    consent's uses are then counted across all of them. The SQL is written once for
    both (`dataops.ledger_store`). ``lock_uses=False`` leaves out the PostgreSQL row
    lock on the use count: it exists only for the test that shows two replicas then
    overuse a consent.
    """

    def __init__(self, where: Path | str, *, lock_uses: bool = True) -> None:
        if not is_postgres(where):
            where = Path(where)
            where.parent.mkdir(parents=True, exist_ok=True)
        # fsync=False on SQLite: the audit log backs every use (module docstring).
        self.store = open_store(where, lock_budgets=lock_uses, fsync=False)
        self.location = self.store.location
        self._use_lock = threading.Lock()
        try:
            self.store.create(_SCHEMA)
        except BaseException:
            self.store.close()
            raise

    def use(self, consent: Consent, now: dt.datetime) -> tuple[str, int]:
        """Count one use now, or refuse if revoked or over the limit; returns (period, uses so far)."""
        period = consent.fetch.period_key(now)
        # Threads of one process queue here rather than in the database's lock waits.
        with self._use_lock, self.store.write(None) as db:
            # The check and the increment are one write transaction. On SQLite it holds
            # the file's only write lock; on PostgreSQL the count's row is created if
            # absent and locked before it is read, so a replica reading it waits for any
            # other replica's use of the same consent and period to commit.
            db.execute(
                "INSERT INTO uses (consent_id, period, count) VALUES (?, ?, 0) "
                "ON CONFLICT (consent_id, period) DO NOTHING",
                (consent.id, period),
            )
            used = _read_uses(db, consent.id, period, self.store.for_update)
            if _revoked(db, consent.id):
                raise ConsentRefused("the consent has been revoked", rule="consent.revoked")
            if _used_up(used, consent.fetch):
                what = (
                    "was given for one use"
                    if consent.fetch.type == "once"
                    else f"allows {consent.fetch.max_uses} uses per {consent.fetch.period}"
                )
                raise ConsentRefused(f"the consent {what} and has been used up", rule="consent.uses")
            db.execute(
                "UPDATE uses SET count = count + 1 WHERE consent_id = ? AND period = ?",
                (consent.id, period),
            )
        return period, used + 1

    def reconcile(self, audited: Mapping[tuple[str, str], int]) -> int:
        """Raise each (consent, period) count to the uses the audit log shows; returns how many rose."""
        raised = 0
        with self._use_lock, self.store.write(None) as db:
            for (consent_id, period), count in audited.items():
                cursor = db.execute(
                    "INSERT INTO uses (consent_id, period, count) VALUES (?, ?, ?) "
                    "ON CONFLICT (consent_id, period) DO UPDATE SET count = excluded.count "
                    "WHERE uses.count < excluded.count",
                    (consent_id, period, count),
                )
                raised += cursor.rowcount
        return raised

    def is_revoked(self, consent_id: str) -> bool:
        return _revoked(self.store.connection(), consent_id)

    def uses_left(self, consent: Consent, now: dt.datetime) -> int:
        used = _read_uses(self.store.connection(), consent.id, consent.fetch.period_key(now), "")
        return consent.fetch.max_uses - used

    def revoke(self, consent_id: str, reason: str = "revoked by the subject") -> bool:
        """Revoke a consent (idempotent); True if it was not revoked before."""
        with self.store.write(None) as db:
            cursor = db.execute(
                "INSERT INTO revoked (consent_id, time, reason) VALUES (?, ?, ?) "
                "ON CONFLICT (consent_id) DO NOTHING",
                (consent_id, dt.datetime.now(dt.UTC).isoformat(timespec="microseconds"), reason),
            )
            return cursor.rowcount == 1

    def revocations(self) -> dict[str, str]:
        rows = self.store.connection().execute("SELECT consent_id, time FROM revoked").fetchall()
        return {consent_id: time for consent_id, time in rows}

    def uses(self) -> dict[str, dict[str, int]]:
        found: dict[str, dict[str, int]] = {}
        rows = self.store.connection().execute("SELECT consent_id, period, count FROM uses")
        for consent_id, period, count in rows.fetchall():
            found.setdefault(consent_id, {})[period] = count
        return found

    def close(self) -> None:
        self.store.close()


# The tables, in the SQLite file or beside the ledger's in PostgreSQL (whose names
# differ: dataops.ledger), created if absent; the names are the SQLite store's since
# it was first written, so an existing file needs no migration.
_SCHEMA = [
    "CREATE TABLE IF NOT EXISTS uses (consent_id TEXT NOT NULL, period TEXT NOT NULL, "
    "count INTEGER NOT NULL, PRIMARY KEY (consent_id, period))",
    "CREATE TABLE IF NOT EXISTS revoked (consent_id TEXT PRIMARY KEY, time TEXT NOT NULL, "
    "reason TEXT NOT NULL)",
]


def _read_uses(db: Any, consent_id: str, period: str, for_update: str) -> int:
    row = db.execute(
        f"SELECT count FROM uses WHERE consent_id = ? AND period = ?{for_update}", (consent_id, period)
    ).fetchone()
    return row[0] if row else 0


def _revoked(db: Any, consent_id: str) -> bool:
    return db.execute("SELECT 1 FROM revoked WHERE consent_id = ?", (consent_id,)).fetchone() is not None


def _used_up(used: int, fetch: Fetch) -> bool:
    """A "once" consent allows one use ever; a periodic one max_uses per period."""
    return used >= fetch.max_uses


def store_path(state_dir: Path) -> Path:
    return StatePaths(Path(state_dir)).consent_store


def consent_location(config: Any) -> Path | str:
    """Where a server's consent uses are counted: the ledger's PostgreSQL database when
    `[ledger] url` names one (shared by every replica), else this server's SQLite file."""
    return config.ledger.url or store_path(config.paths.state)
