"""Consented subject products over the real server (loopback, mTLS).

A consumer gets one subject's declared outputs only under a valid consent artefact:
signed by a trusted issuer, in its window, for this consumer, subject, product and
purpose, not revoked, not used up. Every bad consent is refused with the same answer
whether or not the subject has rows. Each control is also switched off
(`control="off"`) and the same request then succeeds: the control is what stops it.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import json
import os
import shutil
import threading
import time
from pathlib import Path

import grpc
import polars as pl
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from conftest import REPO, audit_records, write_config
from dataops import consent as consent_module
from dataops.client import DataopsClientError, SubjectEvaluation
from dataops.consent import Fetch, new_payload, sign
from dataops.consent_service import ConsentService
from dataops.engines.subject import months_before
from dataops.subjects import Evaluator

ON_OFF = pytest.mark.parametrize("control", ["on", "off"])
NOBODY_ENTERPRISE = "91990199NOSUCHONE7"
NOBODY_PERSON = "P999999999"


@pytest.fixture
def config(tmp_path: Path, sandbox_dir: Path, pki):
    """A work directory with the repo's products, a private copy of the data and a trusted issuer."""
    work = tmp_path / "work"
    work.mkdir()
    shutil.copytree(REPO / "products", work / "products")
    sandbox = tmp_path / "sandbox"
    shutil.copytree(sandbox_dir, sandbox)  # tests here change the data; others share the original
    config = write_config(work, sandbox, pki)
    ConsentService(config.paths.state / "consent-service", config.paths.consents).init()
    return config


@pytest.fixture
def service(config) -> ConsentService:
    """The consent service as `dataops consent` plays it for this work directory."""
    return ConsentService(config.paths.state / "consent-service", config.paths.consents)


@pytest.fixture
def enterprises(config) -> pl.DataFrame:
    return pl.read_parquet(config.paths.sandbox / "finance/enterprise_credit.parquet")


@pytest.fixture
def claims(config) -> pl.DataFrame:
    return pl.read_parquet(config.paths.sandbox / "insurance/medical_claims.parquet")


def review_consent(service, subject, **kwargs) -> bytes:
    terms = dict(
        subject=subject, consumer="city-bank", products=["pre_loan_review"], purpose="pre-loan review"
    )
    terms.update(kwargs)
    return service.issue(**terms)


def band(value, edges, labels):
    return labels[sum(1 for e in edges if value >= e)]


def refusal(exc: DataopsClientError) -> tuple:
    """Everything a refusal tells the consumer, except its audit receipt (unique per request)."""
    metadata = {k: v for k, v in exc.metadata.items() if not k.startswith("receipt")}
    return exc.code, exc.reason, exc.message, metadata, exc.field_violations, exc.quota_violations


# --- evaluations ---------------------------------------------------------------------


def test_pre_loan_review_returns_the_declared_bands_and_grade(connect, service, enterprises):
    row = enterprises.filter(pl.col("penalties") >= 3).row(0, named=True)
    result = connect("city-bank").evaluate(
        "pre_loan_review", row["enterprise_id"], review_consent(service, row["enterprise_id"])
    )
    penalties = band(row["penalties"], [1, 3], ["none", "1-2", "3+"])
    arrears = band(row["arrears_months"], [1, 3, 6], ["none", "1-2", "3-5", "6+"])
    tax = band(row["tax_paid"], [10000, 100000, 1000000], ["<10k", "10k-100k", "100k-1M", "1M+"])
    points = (
        60
        + {"none": 15, "1-2": 0, "3+": -25}[penalties]
        + {"none": 15, "1-2": -5, "3-5": -20, "6+": -35}[arrears]
        + {"<10k": -10, "10k-100k": 0, "100k-1M": 10, "1M+": 15}[tax]
    )
    assert result.outputs == {
        "penalties_band": penalties,
        "arrears_months_band": arrears,
        "tax_band": tax,
        "grade_points": float(points),
        "grade": band(points, [40, 60, 80], list("DCBA")),
    }
    # Nothing raw: no identifier, no exact value of the enterprise's columns.
    assert row["enterprise_id"] not in json.dumps(result.outputs)
    assert result.receipt.sequence > 0 and result.consent_id.startswith("cst-")


def test_underwriting_counts_the_subjects_rows_in_windows_relative_to_today(connect, service, claims):
    today = dt.datetime.now(dt.UTC).date()
    person = claims.group_by("person_id").len().sort("len", descending=True)["person_id"][0]
    rows = claims.filter(pl.col("person_id") == person)
    consent = service.issue(
        subject=person, consumer="harbor-insurance", products=["underwriting"], purpose="underwriting"
    )
    result = connect("harbor-insurance").evaluate("underwriting", person, consent)

    def window(months):
        return rows.filter(
            (pl.col("visit_date") > months_before(today, months)) & (pl.col("visit_date") <= today)
        )

    in24, in12 = window(24), window(12)
    assert result.outputs["inpatient_stays_24m"] == in24.filter(pl.col("visit_type") == "inpatient").height
    assert result.outputs["claims_12m_band"] == band(
        in12["amount"].sum(), [1000, 10000, 50000], ["<1k", "1k-10k", "10k-50k", "50k+"]
    )
    assert result.outputs["chronic_diagnosis_24m"] == bool(
        in24["diagnosis_group"].is_in(["Neoplasms", "Circulatory", "Endocrine"]).any()
    )
    assert result.outputs["months_with_visits_24m"] == in24["visit_date"].dt.truncate("1mo").n_unique()


def test_a_subject_with_no_rows_gets_the_outputs_of_no_rows(connect, service):
    consent = service.issue(
        subject=NOBODY_PERSON, consumer="harbor-insurance", products=["underwriting"], purpose="underwriting"
    )
    result = connect("harbor-insurance").evaluate("underwriting", NOBODY_PERSON, consent)
    assert result.outputs == {
        "inpatient_stays_24m": 0,
        "claims_12m_band": "<1k",
        "chronic_diagnosis_24m": False,
        "months_with_visits_24m": 0,
    }
    review = connect("city-bank").evaluate(
        "pre_loan_review", NOBODY_ENTERPRISE, review_consent(service, NOBODY_ENTERPRISE)
    )
    # The maximum of no rows is no value, and an unknown band scores nothing.
    assert review.outputs["arrears_months_band"] is None
    assert review.outputs["grade_points"] == 60 + 15 - 10


# --- bad consents ----------------------------------------------------------------------


def _forged(service, subject):
    """A consent naming the trusted issuer, signed by a key that is not its key."""
    payload = new_payload(
        issuer="city-consent-service",
        subject=subject,
        consumer="city-bank",
        products=["pre_loan_review"],
        purpose="pre-loan review",
        not_before=dt.datetime.now(dt.UTC) - dt.timedelta(hours=1),
        not_after=dt.datetime.now(dt.UTC) + dt.timedelta(days=1),
        fetch=Fetch("once"),
    )
    return sign(payload, "city-consent-service", Ed25519PrivateKey.generate())


def _tampered(service, subject):
    """A genuine consent for another subject with the subject edited in the payload."""
    genuine = json.loads(review_consent(service, "91990199OTHERONE00"))
    body = consent_module._unb64(genuine["payload"]).replace(b"91990199OTHERONE00", subject.encode())
    genuine["payload"] = consent_module._b64(body)
    return json.dumps(genuine).encode()


def _untrusted(service, subject):
    other = ConsentService(service.directory / "elsewhere", service.directory / "untrusted")
    return other.issue(
        subject=subject,
        consumer="city-bank",
        products=["pre_loan_review"],
        purpose="pre-loan review",
        issuer="shady-consent-service",
        key=other.init("shady-consent-service", trust=False),
    )


def _expired(service, subject):
    now = dt.datetime.now(dt.UTC)
    return review_consent(
        service, subject, not_before=now - dt.timedelta(days=30), not_after=now - dt.timedelta(days=1)
    )


def _not_yet(service, subject):
    now = dt.datetime.now(dt.UTC)
    return review_consent(
        service, subject, not_before=now + dt.timedelta(days=1), not_after=now + dt.timedelta(days=30)
    )


BAD_CONSENTS = {
    "forged": (_forged, "consent.signature"),
    "tampered": (_tampered, "consent.signature"),
    "untrusted issuer": (_untrusted, "consent.issuer"),
    "expired": (_expired, "consent.expired"),
    "not yet valid": (_not_yet, "consent.not_yet_valid"),
    "another consumer": (
        lambda s, subject: review_consent(s, subject, consumer="river-bank"),
        "consent.consumer",
    ),
    "another product": (
        lambda s, subject: review_consent(
            s, subject, products=["credit_monitoring"], purpose="post-loan monitoring"
        ),
        "consent.product",
    ),
    "another purpose": (
        lambda s, subject: review_consent(s, subject, purpose="marketing"),
        "consent.purpose",
    ),
    "another subject": (lambda s, subject: review_consent(s, "91990199OTHERONE00"), "consent.subject"),
    "missing": (lambda s, subject: b"", "consent.missing"),
    "garbage": (lambda s, subject: b"{not json", "consent.malformed"),
}


@pytest.mark.parametrize("case", BAD_CONSENTS)
def test_a_bad_consent_is_refused_the_same_way_for_existing_and_absent_subjects(
    connect, service, enterprises, case
):
    make, rule = BAD_CONSENTS[case]
    city = connect("city-bank")
    answers = []
    for subject in (enterprises["enterprise_id"][0], NOBODY_ENTERPRISE):
        with pytest.raises(DataopsClientError) as refused:
            city.evaluate("pre_loan_review", subject, make(service, subject))
        answers.append(refusal(refused.value))
    assert answers[0] == answers[1]
    code, reason, _, metadata, _, _ = answers[0]
    assert (code, reason, metadata["rule"]) == (grpc.StatusCode.PERMISSION_DENIED, "CONSENT_INVALID", rule)


def test_a_revoked_consent_is_refused_the_same_way_for_existing_and_absent_subjects(
    connect, service, enterprises, config
):
    answers = []
    for subject in (enterprises["enterprise_id"][0], NOBODY_ENTERPRISE):
        artefact = review_consent(service, subject, fetch=Fetch("periodic", "day", 10))
        connect("city-bank").evaluate("pre_loan_review", subject, artefact)
        consent_module.ConsentStore(consent_module.store_path(config.paths.state)).revoke(
            service.issued()[-1]["id"]
        )
        with pytest.raises(DataopsClientError) as refused:
            connect("city-bank").evaluate("pre_loan_review", subject, artefact)
        answers.append(refusal(refused.value))
    assert answers[0] == answers[1] and answers[0][3]["rule"] == "consent.revoked"


@ON_OFF
def test_forged_and_untrusted_consents_pass_only_without_the_signature_and_issuer_checks(
    connect, service, enterprises, monkeypatch, control
):
    subject = enterprises["enterprise_id"][0]
    if control == "off":
        monkeypatch.setattr(consent_module, "_check_signature", lambda *a: None)
        monkeypatch.setattr(
            consent_module,
            "_trusted_issuer",
            lambda issuers, issuer_id: issuers.get(issuer_id) or next(iter(issuers.values())),
        )
    city = connect("city-bank")
    for make in (_forged, _untrusted):
        if control == "on":
            with pytest.raises(DataopsClientError):
                city.evaluate("pre_loan_review", subject, make(service, subject))
        else:
            assert city.evaluate("pre_loan_review", subject, make(service, subject)).outputs["grade"]


@ON_OFF
def test_an_expired_consent_passes_only_without_the_window_check(
    connect, service, enterprises, monkeypatch, control
):
    subject = enterprises["enterprise_id"][0]
    if control == "off":
        monkeypatch.setattr(consent_module, "_check_window", lambda *a: None)
        assert connect("city-bank").evaluate("pre_loan_review", subject, _expired(service, subject)).outputs
    else:
        with pytest.raises(DataopsClientError, match="expired"):
            connect("city-bank").evaluate("pre_loan_review", subject, _expired(service, subject))


@ON_OFF
def test_another_consumers_consent_passes_only_without_the_parties_check(
    connect, service, enterprises, monkeypatch, control
):
    subject = enterprises["enterprise_id"][0]
    artefact = review_consent(service, subject, consumer="river-bank")
    if control == "off":
        monkeypatch.setattr(consent_module, "_check_parties", lambda *a, **k: None)
        assert connect("city-bank").evaluate("pre_loan_review", subject, artefact).outputs
    else:
        with pytest.raises(DataopsClientError, match="another consumer"):
            connect("city-bank").evaluate("pre_loan_review", subject, artefact)


@ON_OFF
def test_a_once_consent_cannot_be_replayed_even_concurrently(
    connect, service, enterprises, monkeypatch, control
):
    subject = enterprises["enterprise_id"][1]
    artefact = review_consent(service, subject)
    if control == "off":
        monkeypatch.setattr(consent_module, "_used_up", lambda used, fetch: False)
    outcomes: list = []

    def attempt():
        client = connect("city-bank")
        try:
            outcomes.append(client.evaluate("pre_loan_review", subject, artefact))
        except DataopsClientError as exc:
            outcomes.append(exc)

    threads = [threading.Thread(target=attempt) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    allowed = [o for o in outcomes if isinstance(o, SubjectEvaluation)]
    if control == "on":
        assert len(allowed) == 1
        assert {o.metadata["rule"] for o in outcomes if not isinstance(o, SubjectEvaluation)} == {
            "consent.uses"
        }
    else:
        assert len(allowed) == 8  # the replay works once the use count is not checked


@ON_OFF
def test_a_revoked_consent_passes_only_without_the_revocation_check(
    connect, service, enterprises, config, monkeypatch, control
):
    subject = enterprises["enterprise_id"][2]
    artefact = review_consent(service, subject, fetch=Fetch("periodic", "day", 5))
    consent_module.ConsentStore(consent_module.store_path(config.paths.state)).revoke(
        service.issued()[-1]["id"]
    )
    if control == "off":
        monkeypatch.setattr(consent_module, "_revoked", lambda db, consent_id: False)
        assert connect("city-bank").evaluate("pre_loan_review", subject, artefact).outputs
    else:
        with pytest.raises(DataopsClientError, match="revoked"):
            connect("city-bank").evaluate("pre_loan_review", subject, artefact)


def test_a_periodic_consent_allows_max_uses_per_period(connect, service, enterprises):
    subject = enterprises["enterprise_id"][3]
    artefact = review_consent(service, subject, fetch=Fetch("periodic", "day", 3))
    city = connect("city-bank")
    for _ in range(3):
        city.evaluate("pre_loan_review", subject, artefact)
    with pytest.raises(DataopsClientError) as refused:
        city.evaluate("pre_loan_review", subject, artefact)
    assert refused.value.rule == "consent.uses" and "3 uses per day" in refused.value.message


def test_a_product_of_another_zone_does_not_exist_for_the_consumer(connect, service, enterprises):
    consent = service.issue(
        subject=NOBODY_PERSON, consumer="city-bank", products=["underwriting"], purpose="underwriting"
    )
    with pytest.raises(DataopsClientError) as refused:
        connect("city-bank").evaluate("underwriting", NOBODY_PERSON, consent)
    with pytest.raises(DataopsClientError) as absent:
        connect("city-bank").evaluate("no_such_product", NOBODY_PERSON, consent)
    assert refused.value.code == absent.value.code == grpc.StatusCode.NOT_FOUND
    assert refused.value.rule == absent.value.rule == "product.unknown"


# --- audit -------------------------------------------------------------------------------


@ON_OFF
def test_the_audit_keeps_a_keyed_hash_of_the_subject_never_the_id(
    connect, service, enterprises, config, monkeypatch, control
):
    if control == "off":
        monkeypatch.setattr(Evaluator, "subject_hash", lambda self, subject: subject)
    subject = enterprises["enterprise_id"][4]
    result = connect("city-bank").evaluate("pre_loan_review", subject, review_consent(service, subject))
    log = (config.paths.state / "audit" / "audit.jsonl").read_bytes()
    if control == "off":
        assert subject.encode() in log
        return
    assert subject.encode() not in log
    secret = (config.paths.state / "consents" / "subject-hmac.key").read_bytes()
    record = [r for r in audit_records(config) if r["method"] == "Evaluate"][-1]
    (entry,) = record["evaluations"]
    assert entry["subject_hash"] == hmac.new(secret, subject.encode(), hashlib.sha256).hexdigest()
    assert entry["consent_id"] == result.consent_id and entry["product"] == "pre_loan_review"
    assert entry["outputs_hash"] == result.outputs_hash and entry["decision"] == "allowed"
    assert record["seq"] == result.receipt.sequence


def test_a_refused_evaluation_is_audited_without_a_consent_id_unless_signed(
    connect, service, enterprises, config
):
    subject = enterprises["enterprise_id"][5]
    with pytest.raises(DataopsClientError):
        connect("city-bank").evaluate("pre_loan_review", subject, _forged(service, subject))
    with pytest.raises(DataopsClientError):
        connect("city-bank").evaluate("pre_loan_review", subject, _expired(service, subject))
    forged, expired = [r for r in audit_records(config) if r["method"] == "Evaluate"][-2:]
    assert (
        forged["evaluations"][0].get("consent_id") is None
        and forged["evaluations"][0]["rule"] == "consent.signature"
    )
    assert expired["evaluations"][0]["consent_id"] == service.issued()[-1]["id"]
    assert forged["decision"] == expired["decision"] == "denied"


# --- batch and watch ---------------------------------------------------------------------


def test_a_batch_evaluates_each_item_under_its_own_consent(connect, service, enterprises, config):
    ids = enterprises["enterprise_id"][:3].to_list()
    items = [
        ("pre_loan_review", ids[0], review_consent(service, ids[0])),
        ("pre_loan_review", ids[1], _expired(service, ids[1])),
        ("pre_loan_review", ids[2], review_consent(service, ids[2])),
    ]
    results = connect("city-bank").evaluate_batch(items)
    assert isinstance(results[0], SubjectEvaluation) and isinstance(results[2], SubjectEvaluation)
    assert isinstance(results[1], DataopsClientError) and results[1].rule == "consent.expired"
    record = [r for r in audit_records(config) if r["method"] == "EvaluateBatch"][-1]
    assert [e["decision"] for e in record["evaluations"]] == ["allowed", "denied", "allowed"]
    # The second batch replays the first item's "once" consent.
    again = connect("city-bank").evaluate_batch(items[:1])
    assert again[0].rule == "consent.uses"


def _rewrite(path: Path, frame: pl.DataFrame) -> None:
    temporary = path.with_suffix(".tmp")
    frame.write_parquet(temporary)
    os.replace(temporary, path)


def test_watch_pushes_a_new_evaluation_when_a_data_version_changes_it(connect, service, enterprises, config):
    calm = enterprises.filter((pl.col("arrears_months") == 0) & (pl.col("penalties") == 0))
    watched = calm["enterprise_id"][:2].to_list()
    items = [
        (
            "credit_monitoring",
            e,
            service.issue(
                subject=e,
                consumer="river-bank",
                products=["credit_monitoring"],
                purpose="post-loan monitoring",
                fetch=Fetch("periodic", "day", 10),
            ),
        )
        for e in watched
    ]
    stream = connect("river-bank").watch(items, timeout=60)
    first = [next(stream), next(stream)]
    assert sorted(i for i, _ in first) == [0, 1]
    assert all(e.outputs["arrears_months_band"] == "none" for _, e in first)

    # A new data version: the first borrower falls four months into arrears.
    path = config.paths.sandbox / "finance/enterprise_credit.parquet"
    changed = enterprises.with_columns(
        pl.when(pl.col("enterprise_id") == watched[0])
        .then(4)
        .otherwise(pl.col("arrears_months"))
        .alias("arrears_months")
    )
    _rewrite(path, changed)
    index, update = next(stream)
    assert index == 0 and update.outputs["arrears_months_band"] == "3-5"
    assert update.data_version != first[0][1].data_version

    # The subject revokes: the watch of that subject ends with the refusal.
    consent_module.ConsentStore(consent_module.store_path(config.paths.state)).revoke(update.consent_id)
    index, ended = next(stream)
    assert index == 0 and isinstance(ended, DataopsClientError) and ended.rule == "consent.revoked"
    stream.cancel()
    time.sleep(0.5)
    watch = [r for r in audit_records(config) if r["method"] == "Watch"]
    assert watch[0]["stream_event"] == "open"
    messages = [r for r in watch if r["stream_event"] == "message"]
    assert len(messages) == 4 and all(len(r["evaluations"]) == 1 for r in messages)
    assert [r["evaluations"][0]["decision"] for r in messages] == ["allowed", "allowed", "allowed", "denied"]

    from dataops.audit.consents import check, iter_entries

    assert check(list(iter_entries(config.paths.state / "audit")), {}) == []


def test_watch_with_a_bad_consent_ends_that_subject_at_once(connect, service, enterprises):
    subject = enterprises["enterprise_id"][0]
    stream = connect("river-bank").watch(
        [("credit_monitoring", subject, _expired(service, subject))], timeout=30
    )
    index, ended = next(stream)
    assert index == 0 and ended.rule in ("consent.expired", "consent.consumer")
    with pytest.raises(StopIteration):
        next(stream)


# --- the consent service and the reviewer's commands ------------------------------------


def test_consent_cli_issues_revokes_and_lists_and_the_audit_lists_every_use(
    server, connect, config, enterprises, tmp_path, capsys
):
    from dataops.cli import main

    toml = str(config.paths.consents.parent / "dataops.toml")
    subject = enterprises["enterprise_id"][6]
    out = tmp_path / "consent.json"
    assert (
        main(
            [
                "consent",
                "issue",
                "-c",
                toml,
                "--subject",
                subject,
                "--consumer",
                "city-bank",
                "--product",
                "pre_loan_review",
                "--purpose",
                "pre-loan review",
                "--periodic",
                "day",
                "--max-uses",
                "2",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    consent_id = json.loads(consent_module._unb64(json.loads(out.read_bytes())["payload"]))["id"]
    city = connect("city-bank")
    city.evaluate("pre_loan_review", subject, out.read_bytes())
    assert main(["consent", "revoke", "-c", toml, consent_id]) == 0
    with pytest.raises(DataopsClientError, match="revoked"):
        city.evaluate("pre_loan_review", subject, out.read_bytes())
    with pytest.raises(DataopsClientError):
        city.evaluate("pre_loan_review", NOBODY_ENTERPRISE, b"")  # no consent at all
    capsys.readouterr()
    assert main(["consent", "list", "-c", toml]) == 0
    listing = capsys.readouterr().out
    assert consent_id in listing and "revoked" in listing and "uses 1" in listing

    assert main(["audit", "consents", "-c", toml, "--consent", consent_id, "--json"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert [(e["decision"], e.get("rule")) for e in lines] == [
        ("allowed", None),
        ("denied", "consent.revoked"),
    ]
    assert main(["audit", "consents", "-c", toml, "--subject", subject]) == 0
    text = capsys.readouterr().out
    assert "2 entries shown" in text and "every released evaluation ran under a verified consent" in text


def test_the_audit_check_flags_a_release_without_a_valid_consent():
    from dataops.audit.consents import check

    good = {
        "seq": 1,
        "time": "2026-12-01T10:00:00+00:00",
        "decision": "allowed",
        "consent_id": "cst-1",
        "issuer": "i",
        "consent_digest": "d",
        "subject_hash": "s",
        "outputs_hash": "o",
        "valid_from": "2026-11-01T00:00:00+00:00",
        "valid_until": "2027-01-01T00:00:00+00:00",
        "fetch": "once",
        "period": "once",
    }
    assert check([good], {}) == []
    assert "used 2 times" in check([good, {**good, "seq": 2}], {})[0]
    assert "without consent_id" in check([{**good, "consent_id": None}], {})[0]
    assert "not valid" in check([{**good, "time": "2027-02-01T00:00:00+00:00"}], {})[0]
    assert "revoked" in check([good], {"cst-1": "2026-12-01T09:00:00Z"})[0]


@ON_OFF
def test_a_use_the_store_lost_is_restored_from_the_audit_log(
    config, pki, service, enterprises, monkeypatch, control
):
    """The consent store commits without fsync; the fsynced audit log is what makes a use durable."""
    from dataops.client import Client
    from dataops.consent import ConsentStore
    from dataops.server import build_server

    subject = enterprises["enterprise_id"][7]
    artefact = review_consent(service, subject)

    def evaluate_once_more():
        running = build_server(config).start()
        try:
            with Client.from_directory(
                f"localhost:{running.port}", pki.consumer_dir("city-bank"), "city-bank"
            ) as c:
                return c.evaluate("pre_loan_review", subject, artefact)
        finally:
            running.stop(grace=1.0)

    evaluate_once_more()
    for lost in (config.paths.state / "consents").glob("consents.sqlite3*"):
        lost.unlink()  # a power cut took the store's last commits
    if control == "off":
        monkeypatch.setattr(ConsentStore, "reconcile", lambda self, audited: 0)
        assert evaluate_once_more().outputs  # the "once" consent is replayed
    else:
        with pytest.raises(DataopsClientError) as refused:
            evaluate_once_more()
        assert refused.value.rule == "consent.uses"


def test_a_stopping_server_ends_open_watches_at_once_with_unavailable(config, pki, service, enterprises):
    from dataops.client import Client
    from dataops.server import build_server

    subject = enterprises["enterprise_id"][8]
    artefact = service.issue(
        subject=subject,
        consumer="river-bank",
        products=["credit_monitoring"],
        purpose="post-loan monitoring",
        fetch=Fetch("periodic", "day", 10),
    )
    running = build_server(config).start()
    client = Client.from_directory(f"localhost:{running.port}", pki.consumer_dir("river-bank"), "river-bank")
    try:
        stream = client.watch([("credit_monitoring", subject, artefact)], timeout=60)
        assert next(stream)[0] == 0
        started = time.monotonic()
        stopper = threading.Thread(target=running.stop, kwargs={"grace": 10.0})
        stopper.start()
        with pytest.raises(DataopsClientError) as ended:
            next(stream)
        stopper.join()
        assert time.monotonic() - started < 5.0  # not the whole grace period
        assert (ended.value.code, ended.value.reason) == (grpc.StatusCode.UNAVAILABLE, "SERVER_STOPPING")
    finally:
        client.close()
    closing = [r for r in audit_records(config) if r["method"] == "Watch"][-1]
    assert (closing["stream_event"], closing["code"]) == ("close", "UNAVAILABLE")
