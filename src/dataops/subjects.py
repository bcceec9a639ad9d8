"""Consented evaluations of subject products, transport-free.

    identity → product (exists, offered to the consumer) → consent (signature, window,
    consumer, subject, product, purpose, revocation, one use counted) → layout lookup → outputs

Every check before the lookup reads only the request, the policy, the products and
the consent, never the data: without a valid consent the refusal is the same whether
or not the subject has rows. With one, a subject with no rows gets the outputs of an
empty row set (counts 0, sums 0, no maximum), which is again the same answer as for
an id that exists nowhere.

Each evaluation, allowed or refused, adds an entry to the RPC's audit record: the
product, the consent id (only once its signature verified), the artefact's digest,
a keyed hash of the subject id (HMAC-SHA256 under a server secret, never the id) and
a hash of the outputs.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import os
import secrets
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from dataops.authorize import consumer_policy, live_grant
from dataops.catalog import Catalog
from dataops.consent import Consent, ConsentRefused, ConsentStore, Issuer, check_terms, verify
from dataops.engines.subject import Evaluation, SubjectEngine, SubjectLayouts, SubjectPlan
from dataops.errors import (
    FieldViolation,
    InvalidQuery,
    LimitExceeded,
    RequestError,
    ServerStopping,
    UnknownDataset,
)
from dataops.outcome import Outcome
from dataops.policy import PolicyStore
from dataops.products.subject import SubjectProduct

MAX_SUBJECT_ID = 128
MAX_BATCH = 1000
MAX_WATCH_SUBJECTS = 100


@dataclass(frozen=True)
class Item:
    """One evaluation asked for: a product, a subject and the subject's consent artefact."""

    product_id: str
    subject_id: str
    consent: bytes


def load_or_create_secret(path: Path) -> bytes:
    """The server's key for hashing subject ids in the audit log (0600, made on first start)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        secret = path.read_bytes()
        if len(secret) != 32:
            raise OSError(f"{path}: expected a 32-byte key") from None
        return secret
    with os.fdopen(fd, "wb") as f:
        f.write(secrets.token_bytes(32))
        f.flush()
        os.fsync(f.fileno())
    return path.read_bytes()


def _signed_facts(consent: Consent) -> dict:
    """What the audit entry keeps of a consent whose signature verified (never the subject)."""
    return {
        "consent_id": consent.id,
        "issuer": consent.issuer,
        "fetch": consent.fetch.describe(),
        "valid_from": consent.not_before.isoformat(),
        "valid_until": consent.not_after.isoformat(),
    }


def _released(entry: dict, evaluation: Evaluation) -> tuple:
    """Mark a watch's audit entry allowed; what the watch then holds to tell a change from
    none: (data version, evaluation date, outputs)."""
    entry.update(
        decision="allowed", data_version=evaluation.data_version[:16], outputs_hash=evaluation.digest()
    )
    return (evaluation.data_version, evaluation.evaluation_date, evaluation.outputs)


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


class Evaluator:
    def __init__(
        self,
        catalog: Catalog,
        policies: PolicyStore,
        products: Mapping[str, SubjectProduct],
        issuers: Mapping[str, Issuer],
        store: ConsentStore,
        layouts: SubjectLayouts,
        secret: bytes,
        *,
        now: Callable[[], dt.datetime] = _now,
        poll_seconds: float = 1.0,
        max_watches: int = 2,
    ) -> None:
        self.catalog = catalog
        self.policies = policies
        self.products = products
        self.issuers = issuers
        self.store = store
        self.layouts = layouts
        self.engine = SubjectEngine(layouts)
        self.secret = secret
        self.now = now
        self.poll_seconds = poll_seconds
        # A Watch holds a server worker for as long as it lasts: cap them so that
        # streams can never take every worker from the unary calls.
        self._watch_slots = threading.BoundedSemaphore(max_watches)
        self._stopping = threading.Event()

    def stop_watches(self) -> None:
        """End every open watch at its next poll (the server is stopping)."""
        self._stopping.set()

    def close(self) -> None:
        self._stopping.set()
        self.layouts.close()  # a layout being built in a child: killed
        self.store.close()

    def subject_hash(self, subject: str) -> str:
        return hmac.new(self.secret, subject.encode(), hashlib.sha256).hexdigest()

    # --- one evaluation -------------------------------------------------------------

    def _product(self, consumer: str, product_id: str) -> SubjectProduct:
        policy = consumer_policy(self.policies.current, consumer)
        product = self.products.get(product_id)
        # Products on another zone's data, or not offered to this consumer, do not exist for it.
        if (
            product is None
            or product.dataset.zone != policy.zone
            or (product.consumers is not None and consumer not in product.consumers)
        ):
            shown = product_id if len(product_id) <= 64 else product_id[:64] + "..."
            raise UnknownDataset(
                f"no subject product {shown!r} in zone {policy.zone!r}", rule="product.unknown"
            )
        live_grant(policy, product.dataset, self.now().date())
        return product

    @staticmethod
    def _validate(item: Item, field: str) -> None:
        if not item.product_id:
            raise InvalidQuery(
                "name the product to evaluate",
                rule="request.product",
                field_violations=(FieldViolation(f"{field}product_id", "is required"),),
            )
        if not item.subject_id or len(item.subject_id) > MAX_SUBJECT_ID:
            raise InvalidQuery(
                f"the subject id must be 1 to {MAX_SUBJECT_ID} characters",
                rule="request.subject",
                field_violations=(FieldViolation(f"{field}subject_id", "is empty or too long"),),
            )

    def _check(
        self, consumer: str, item: Item, entry: dict, field: str = ""
    ) -> tuple[SubjectProduct, Consent]:
        """Every check that needs no data; fills `entry` as far as it gets."""
        self._validate(item, field)
        entry["subject_hash"] = self.subject_hash(item.subject_id)
        product = self._product(consumer, item.product_id)
        entry["product"] = product.id
        entry["consent_digest"] = hashlib.sha256(item.consent).hexdigest() if item.consent else None
        consent = verify(item.consent, self.issuers)
        # From here the consent's own fields are signed facts and may be audited.
        entry.update(_signed_facts(consent))
        check_terms(
            consent,
            consumer=consumer,
            subject=item.subject_id,
            product=product.id,
            purposes=product.purposes,
            now=self.now(),
        )
        return product, consent

    def _evaluate_item(self, consumer: str, item: Item, field: str = "") -> tuple[Evaluation, dict]:
        entry: dict = {"decision": "error"}
        try:
            product, consent = self._check(consumer, item, entry, field)
            entry["period"], entry["use"] = self.store.use(consent, self.now())
            evaluation = self._release(product, item.subject_id)
        except RequestError as exc:
            entry.update(
                decision="invalid" if exc.invalid else "denied",
                reason=exc.reason,
                rule=exc.rule,
            )
            exc.audit_entry = entry  # type: ignore[attr-defined]
            raise
        entry.update(
            decision="allowed", data_version=evaluation.data_version[:16], outputs_hash=evaluation.digest()
        )
        return evaluation, entry

    def _release(self, product: SubjectProduct, subject: str) -> Evaluation:
        """The engine's evaluation, once every check on the consent has passed."""
        plan = SubjectPlan(product, subject, self.now().date())
        return self.engine.release(plan, self.engine.estimate(plan))

    def evaluate(self, consumer: str, item: Item) -> Outcome:
        """One evaluation (`Outcome.result`: the `Evaluation`; `evaluations`: its audit entry)."""
        outcome = Outcome(mode="subject", query=f"subject:{item.product_id[:64]}")
        try:
            evaluation, entry = self._evaluate_item(consumer, item)
        except RequestError as exc:
            outcome.evaluations = [getattr(exc, "audit_entry", {"decision": "error"})]
            outcome.attach(exc)
            raise
        outcome.evaluations = [entry]
        outcome.dataset = self.products[evaluation.product].dataset.id
        outcome.rows_returned = 1
        outcome.result = evaluation
        return outcome

    def evaluate_batch(self, consumer: str, items: Sequence[Item]) -> Outcome:
        """Each item under its own consent; one item's refusal does not stop the others.

        `Outcome.result` holds, per item, its `Evaluation` or its `RequestError`.
        """
        outcome = Outcome(mode="subject", query="subject:batch")
        try:
            if not items or len(items) > MAX_BATCH:
                raise InvalidQuery(
                    f"a batch holds 1 to {MAX_BATCH} items, got {len(items)}",
                    rule="request.items",
                    field_violations=(FieldViolation("items", f"1 to {MAX_BATCH} items"),),
                )
            consumer_policy(self.policies.current, consumer)  # an unknown consumer is refused whole
        except RequestError as exc:
            outcome.attach(exc)
            raise
        entries: list[dict] = []
        results: list[Evaluation | RequestError] = []
        for i, item in enumerate(items):
            try:
                evaluation, entry = self._evaluate_item(consumer, item, f"items[{i}].")
                results.append(evaluation)
            except RequestError as exc:
                entry = getattr(exc, "audit_entry", {"decision": "error"})
                results.append(exc)
            entries.append({"index": i, **entry})
        outcome.evaluations = entries
        outcome.rows_returned = sum(isinstance(r, Evaluation) for r in results)
        outcome.result = results
        return outcome

    # --- watch ------------------------------------------------------------------------

    def watch(
        self, consumer: str, items: Sequence[Item], active: Callable[[], bool]
    ) -> Iterator[tuple[int, Evaluation | RequestError, Outcome]]:
        """Each subject's outputs now, then again whenever a new data version (or a new
        evaluation date) changes them, while its consent lasts.

        Each push is one use of the consent; when a period's uses are spent the change
        waits for the next period. A subject's watch ends, with the refusal, when its
        consent expires or is revoked; the stream ends when every subject's has.

        Each update comes with the `Outcome` its message's audit record is written from.
        """
        try:
            yield from self._watch(consumer, items, active)
        except RequestError as exc:
            Outcome(mode="subject", query="subject:watch").attach(exc)
            raise

    @staticmethod
    def _update(entry: dict) -> Outcome:
        return Outcome(mode="subject", query="subject:watch", evaluations=[entry])

    def _watch(
        self, consumer: str, items: Sequence[Item], active: Callable[[], bool]
    ) -> Iterator[tuple[int, Evaluation | RequestError, Outcome]]:
        if not items or len(items) > MAX_WATCH_SUBJECTS:
            raise InvalidQuery(
                f"a watch holds 1 to {MAX_WATCH_SUBJECTS} subjects, got {len(items)}",
                rule="request.items",
                field_violations=(FieldViolation("items", f"1 to {MAX_WATCH_SUBJECTS} items"),),
            )
        consumer_policy(self.policies.current, consumer)
        if not self._watch_slots.acquire(blocking=False):
            raise LimitExceeded("too many watches are open; retry later", rule="limits.watches")
        try:
            live: dict[int, tuple[SubjectProduct, Consent, tuple]] = {}
            for i, item in enumerate(items):
                entry: dict = {"index": i, "decision": "error"}
                try:
                    product, consent = self._check(consumer, item, entry, f"items[{i}].")
                    entry["period"], entry["use"] = self.store.use(consent, self.now())
                    evaluation = self._release(product, item.subject_id)
                except RequestError as exc:
                    entry.update(decision="denied", reason=exc.reason, rule=exc.rule)
                    yield i, exc, self._update(entry)
                    continue
                live[i] = (product, consent, _released(entry, evaluation))
                yield i, evaluation, self._update(entry)
            while live and active() and not self._stopping.wait(self.poll_seconds):
                if not active():
                    break
                for i in sorted(live):
                    product, consent, (version, day, outputs) = live[i]
                    entry = {
                        "index": i,
                        "decision": "error",
                        "subject_hash": self.subject_hash(items[i].subject_id),
                        "product": product.id,
                        "consent_digest": hashlib.sha256(items[i].consent).hexdigest(),
                        **_signed_facts(consent),
                    }
                    now = self.now()
                    try:
                        check_terms(
                            consent,
                            consumer=consumer,
                            subject=items[i].subject_id,
                            product=product.id,
                            purposes=product.purposes,
                            now=now,
                        )
                        if self.store.is_revoked(consent.id):
                            raise ConsentRefused("the consent has been revoked", rule="consent.revoked")
                    except RequestError as exc:
                        entry.update(decision="denied", reason=exc.reason, rule=exc.rule)
                        del live[i]
                        yield i, exc, self._update(entry)
                        continue
                    layout = self.layouts.current(product.dataset)
                    if (layout.fingerprint, now.date()) == (version, day):
                        continue
                    evaluation = layout.evaluate(product, items[i].subject_id, now.date())
                    if evaluation.outputs == outputs:
                        # Nothing new to tell: nothing released, no use counted.
                        live[i] = (product, consent, (layout.fingerprint, now.date(), outputs))
                        continue
                    try:
                        entry["period"], entry["use"] = self.store.use(consent, now)
                    except ConsentRefused as exc:
                        if exc.rule == "consent.uses":
                            continue  # this period's uses are spent: the change waits for the next
                        entry.update(decision="denied", reason=exc.reason, rule=exc.rule)
                        del live[i]
                        yield i, exc, self._update(entry)
                        continue
                    live[i] = (product, consent, _released(entry, evaluation))
                    yield i, evaluation, self._update(entry)
            if live and self._stopping.is_set():
                raise ServerStopping(
                    "the server is stopping; open the watch again on another replica or later",
                    rule="server.stopping",
                )
        finally:
            self._watch_slots.release()
