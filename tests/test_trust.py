"""Trust boundaries at the door: identity from the certificate, revocation that fails closed.

Each control is also switched off on the running server (parameter `control="off"`),
and the same attack is then shown to succeed: the pair proves the control is what
stops it.
"""

from __future__ import annotations

import datetime as dt
import os
import shutil
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from grpc_health.v1 import health_pb2, health_pb2_grpc

from conftest import Pki, audit_records, write_config
from dataops import certs
from dataops import policy as policy_module
from dataops.catalog import load_catalog
from dataops.certs import consumer_identity_from_auth_context, issue_consumer, revoke
from dataops.client import Client, DataopsClientError, count
from dataops.engines import dp as dp_engine
from dataops.policy import PolicyStore
from dataops.products import load_products
from dataops.server import app as app_module
from dataops.server import build_server, interceptors
from dataops.server.lanes import ScanLane
from dataops.server.ratelimit import Admission

ON_OFF = pytest.mark.parametrize("control", ["on", "off"])


# -- hostile certificates, signed by the platform CA itself ------------------------


def _hostile(pki: Pki, out: Path, common_names: list[str], san_uris: list[str] | None) -> tuple[Path, Path]:
    """A client certificate our CA really signed, with the subject and SAN an attacker asked for."""
    ca_key = serialization.load_pem_private_key((pki.directory / "ca.key").read_bytes(), password=None)
    ca_cert = x509.load_pem_x509_certificate((pki.directory / "ca.crt").read_bytes())
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn) for cn in common_names]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=1))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
    )
    if san_uris is not None:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(u) for u in san_uris]), critical=False
        )
    cert = builder.sign(ca_key, hashes.SHA256())
    out.mkdir(parents=True, exist_ok=True)
    key_path, cert_path = out / "hostile.key", out / "hostile.crt"
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return key_path, cert_path


HOSTILE = {
    # name: (common names, SAN URIs, the rule that refuses it)
    "nul-in-cn": (["city-bank\x00x"], ["dataops:consumer:city-bank"], "identity.common_name"),
    "two-cns": (["city-bank", "mallory"], ["dataops:consumer:city-bank"], "identity.common_name"),
    "no-san": (["city-bank"], None, "identity.san"),
    "san-names-another": (["city-bank"], ["dataops:consumer:river-bank"], "identity.san"),
    "two-consumer-sans": (
        ["city-bank"],
        ["dataops:consumer:city-bank", "dataops:consumer:river-bank"],
        "identity.san",
    ),
}


@ON_OFF
@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_a_certificate_naming_no_single_consumer_is_refused_and_audited(
    server, config, pki, tmp_path, monkeypatch, case, control
):
    """Attack: a CA-signed certificate whose grpc summary reads "city-bank" (first CN,
    cut at NUL) but which does not name city-bank alone, served as city-bank."""
    cns, sans, rule = HOSTILE[case]
    if control == "off":  # the old path: grpc's x509_common_name
        monkeypatch.setattr(interceptors, "certificate_identity", consumer_identity_from_auth_context)
    key, cert = _hostile(pki, tmp_path / "hostile", cns, sans)
    with Client(
        f"localhost:{server.port}", cert=cert, key=key, ca=pki.directory / "ca.crt", timeout=10
    ) as client:
        if control == "off":
            assert [d.id for d in client.list_datasets()] == ["enterprise_credit"]  # city-bank's view
            assert audit_records(config)[-1]["consumer"] == "city-bank"
            return
        with pytest.raises(DataopsClientError) as err:
            client.list_datasets()
    assert err.value.code is grpc.StatusCode.UNAUTHENTICATED
    assert err.value.rule == rule
    record = audit_records(config)[-1]
    assert (record["consumer"], record["decision"], record["rule"]) == (None, "denied", rule)


def test_a_certificate_issued_by_the_cli_names_its_consumer_in_cn_and_san(pki):
    cert = x509.load_pem_x509_certificate((pki.consumer_dir("city-bank") / "city-bank.crt").read_bytes())
    assert (
        certs.consumer_identity_from_certificate(cert.public_bytes(serialization.Encoding.PEM)) == "city-bank"
    )
    assert (
        certs.consumer_identity_from_certificate(cert.public_bytes(serialization.Encoding.DER)) == "city-bank"
    )


def test_a_certificates_identity_is_parsed_once_and_every_other_certificate_is_checked(
    pki, tmp_path, monkeypatch
):
    """The identity cache is keyed by the certificate's own bytes: a hostile certificate
    whose grpc summary reads like a cached one is parsed, and refused, on its own; a
    refusal is never remembered. (Revocation is checked per request, apart from this
    cache: test_identity's revoked certificate was used, so cached, before it was revoked.)"""
    _, hostile = _hostile(pki, tmp_path / "hostile", ["city-bank", "mallory"], ["dataops:consumer:city-bank"])
    certs._certificate_identity.cache_clear()
    parsed = []
    load = x509.load_pem_x509_certificate
    monkeypatch.setattr(certs.x509, "load_pem_x509_certificate", lambda pem: parsed.append(pem) or load(pem))
    pem = (pki.consumer_dir("city-bank") / "city-bank.crt").read_bytes()
    assert [certs.consumer_identity_from_certificate(pem) for _ in range(3)] == ["city-bank"] * 3
    assert len(parsed) == 1
    for _ in range(2):
        with pytest.raises(certs.IdentityError) as err:
            certs.consumer_identity_from_certificate(hostile.read_bytes())
        assert err.value.rule == "identity.common_name"
    assert len(parsed) == 3


# -- revocation fails closed ---------------------------------------------------------


@pytest.fixture
def own_pki(pki, tmp_path) -> Pki:
    """A copy of the session PKI: these tests write CRLs into it."""
    copy = tmp_path / "pki"
    shutil.copytree(pki.directory, copy)
    return Pki(copy, pki.outsider)


@pytest.fixture
def own_config(own_pki, sandbox_dir, tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    return write_config(work, sandbox_dir, own_pki)


def _client(server, files) -> Client:
    return Client(f"localhost:{server.port}", cert=files.cert, key=files.key, ca=files.ca_cert, timeout=10)


def _served(client: Client) -> str:
    try:
        client.list_datasets()
        return "served"
    except DataopsClientError as exc:
        assert exc.code is grpc.StatusCode.UNAUTHENTICATED, exc
        return exc.rule


@ON_OFF
def test_deleting_the_crl_refuses_everyone_instead_of_unrevoking(
    own_config, own_pki, tmp_path, monkeypatch, control
):
    """Attack: delete ca.crl, and a revoked certificate is served again."""
    if control == "off":
        monkeypatch.setattr(certs.RevocationList, "fail_closed", False)
    stolen = issue_consumer(own_pki.directory, "city-bank", out_dir=tmp_path / "stolen")
    regular = issue_consumer(own_pki.directory, "river-bank", out_dir=tmp_path / "regular")
    server = build_server(own_config).start()
    try:
        with _client(server, stolen) as thief, _client(server, regular) as bank:
            revoke(own_pki.directory, stolen.cert)
            assert _served(thief) == "certificate.revoked"
            (own_pki.directory / "ca.crl").unlink()
            if control == "off":
                assert _served(thief) == "served"
                return
            assert _served(thief) == "certificate.crl_unavailable"
            assert _served(bank) == "certificate.crl_unavailable"  # fail closed: everyone
            assert audit_records(own_config)[-1]["rule"] == "certificate.crl_unavailable"
            # The operator's next revocation restores a CRL with a rising number; what
            # was revoked before stays revoked although the new CRL forgot it.
            spare = issue_consumer(own_pki.directory, "harbor-insurance", out_dir=tmp_path / "spare")
            revoke(own_pki.directory, spare.cert)
            assert _served(bank) == "served"
            assert _served(thief) == "certificate.revoked"
    finally:
        server.stop(1.0)


@ON_OFF
def test_an_older_validly_signed_crl_does_not_unrevoke(own_config, own_pki, tmp_path, monkeypatch, control):
    """Attack: put back yesterday's CRL (signed by the CA, from before a revocation)."""
    if control == "off":
        monkeypatch.setattr(certs.RevocationList, "fail_closed", False)
    first = issue_consumer(own_pki.directory, "city-bank", out_dir=tmp_path / "first")
    second = issue_consumer(own_pki.directory, "city-bank", out_dir=tmp_path / "second")
    regular = issue_consumer(own_pki.directory, "river-bank", out_dir=tmp_path / "regular")
    crl = own_pki.directory / "ca.crl"
    server = build_server(own_config).start()
    try:
        with _client(server, second) as thief, _client(server, regular) as bank:
            revoke(own_pki.directory, first.cert)
            old = crl.read_bytes()
            assert _served(thief) == "served"  # the server has now seen the first CRL
            revoke(own_pki.directory, second.cert)
            assert _served(thief) == "certificate.revoked"
            crl.write_bytes(old)  # validly signed, but older
            if control == "off":
                assert _served(thief) == "served"
                return
            assert _served(thief) == "certificate.revoked"
            assert _served(bank) == "served"  # the rest keep working on the remembered set
    finally:
        server.stop(1.0)
    # The remembered set survives a restart: the old CRL is still refused.
    server = build_server(own_config).start()
    try:
        with _client(server, second) as thief, _client(server, regular) as bank:
            assert _served(thief) == "certificate.revoked"
            assert _served(bank) == "served"
            crl.unlink()
            assert _served(bank) == "certificate.crl_unavailable"
    finally:
        server.stop(1.0)
    state = own_config.paths.state / certs.REVOCATION_STATE
    serials = {x509.load_pem_x509_certificate(f.cert.read_bytes()).serial_number for f in (first, second)}
    assert serials <= set(__import__("json").loads(state.read_text())["serials"])


def test_each_crl_the_cli_writes_has_a_rising_number(own_pki, tmp_path):
    numbers = []
    for i in range(3):
        spare = issue_consumer(own_pki.directory, "city-bank", out_dir=tmp_path / f"spare{i}")
        path = revoke(own_pki.directory, spare.cert)
        numbers.append(certs._crl_number(x509.load_pem_x509_crl(path.read_bytes())))
    assert numbers == sorted(set(numbers)) and numbers[0] > 0


# -- policies known by content, validated per consumer file ---------------------------


def _wait_for(predicate, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


@ON_OFF
def test_an_edit_keeping_size_mtime_and_inode_is_loaded(server, connect, config, monkeypatch, control):
    """Attack (on the operator): revoke a consumer with an edit that keeps the file's
    size, mtime and inode; a store watching stat() never sees it, the consumer is served."""
    if control == "off":  # the old fingerprint: what stat() says
        monkeypatch.setattr(
            policy_module,
            "content_digest",
            lambda path, raw: repr((path.stat().st_size, path.stat().st_mtime_ns, path.stat().st_ino)),
        )
        server.policies.poll()  # now fingerprinted by stat()
    client = connect("river-bank")
    assert client.list_datasets()
    path = config.paths.policies / "river-bank.toml"
    before = path.stat()
    text = path.read_text()
    edited = text.replace("revoked = false", "revoked = true ")  # same length
    assert len(edited) == len(text) and edited != text
    with open(path, "r+") as f:  # in place: same inode
        f.write(edited)
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    after = path.stat()
    assert (after.st_ino, after.st_size, after.st_mtime_ns) == (
        before.st_ino,
        before.st_size,
        before.st_mtime_ns,
    )
    applied = _wait_for(lambda: server.policies.current.get("river-bank").revoked, timeout=1.5)
    if control == "off":
        assert not applied
        assert client.list_datasets()  # still served
        return
    with pytest.raises(DataopsClientError) as err:
        client.list_datasets()
    assert err.value.rule == "consumer.revoked"


@ON_OFF
def test_a_narrowing_edit_applies_while_another_consumers_file_is_invalid(
    server, connect, config, monkeypatch, control
):
    """Attack (on the operator): break any unrelated policy file, and revoking a
    consumer or narrowing its grant is ignored until the unrelated file is fixed."""
    if control == "off":
        monkeypatch.setattr(PolicyStore, "per_file", False)
    city, river, harbor = connect("city-bank"), connect("river-bank"), connect("harbor-insurance")
    broken = config.paths.policies / "harbor-insurance.toml"
    broken.write_text(broken.read_text().replace("tables = [", "tables = 1 #["))
    river_path = config.paths.policies / "river-bank.toml"
    river_path.write_text(river_path.read_text().replace("revoked = false", "revoked = true"))
    city_path = config.paths.policies / "city-bank.toml"
    city_path.write_text(city_path.read_text().replace("expires = 2027-12-31", "expires = 2020-01-01"))
    _wait_for(lambda: server.policies.last_error is not None)
    time.sleep(0.5)  # several polls
    if control == "off":
        assert river.list_datasets()  # revoked in its file, still served
        assert (
            city.query("enterprise_credit", aggregates=[count()]).frame.height == 1
        )  # expired, still served
        assert harbor.list_datasets()  # its invalid file's previous version keeps serving
        return
    outcomes = {}
    for name, call in (
        ("river", river.list_datasets),
        ("harbor", harbor.list_datasets),
        ("city", lambda: city.query("enterprise_credit", aggregates=[count()])),
    ):
        with pytest.raises(DataopsClientError) as err:
            call()
        outcomes[name] = err.value.rule
    assert outcomes == {
        "river": "consumer.revoked",
        "harbor": "consumer.policy_invalid",
        "city": "grant.expires",
    }
    assert audit_records(config)[-2]["rule"] == "consumer.policy_invalid"


# -- admission: every request audited, one consumer cannot starve the others ---------


def _health(server, pki) -> int:
    d = pki.consumer_dir("river-bank")
    credentials = grpc.ssl_channel_credentials(
        (d / "ca.crt").read_bytes(), (d / "river-bank.key").read_bytes(), (d / "river-bank.crt").read_bytes()
    )
    with grpc.secure_channel(
        f"localhost:{server.port}", credentials, options=[("grpc.enable_http_proxy", 0)]
    ) as channel:
        return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=2).status


@pytest.fixture
def blocked_credit_releases(monkeypatch):
    """DP releases on enterprise_credit block until the event is set: slow queries."""
    release = dp_engine.DPQuery.release
    gate = threading.Event()
    gate.blocked = 0  # releases waiting at the gate now
    lock = threading.Lock()

    def slow_release(self, calibration):
        if self._compiled.dataset.id == "enterprise_credit":
            with lock:
                gate.blocked += 1
            gate.wait(30)
        return release(self, calibration)

    monkeypatch.setattr(dp_engine.DPQuery, "release", slow_release)
    yield gate
    gate.set()


@ON_OFF
def test_a_flood_of_slow_queries_from_one_consumer_is_shed_audited_and_starves_no_one(
    tmp_path, sandbox_dir, pki, blocked_credit_releases, monkeypatch, control
):
    """Attack: one consumer fires many slow queries at once; every engine thread is
    theirs, and another consumer's query waits out its deadline."""
    work = tmp_path / "work"
    work.mkdir()
    config = write_config(work, sandbox_dir, pki, max_in_flight_per_consumer=2)  # [server] workers = 4
    if control == "off":
        monkeypatch.setattr(Admission, "enter", lambda self, consumer: None)
        monkeypatch.setattr(Admission, "leave", lambda self, consumer: None)
        # DP queries are counted per consumer by the scan lane (its slots stay: the flood
        # then holds them all and the other consumer's query waits behind it).
        monkeypatch.setattr(ScanLane, "join", lambda self, consumer: None)
        monkeypatch.setattr(ScanLane, "part", lambda self, consumer: None)
    server = build_server(config).start()
    flood = 10
    try:
        city = Client.from_directory(f"localhost:{server.port}", pki.consumer_dir("city-bank"), "city-bank")
        harbor = Client.from_directory(
            f"localhost:{server.port}", pki.consumer_dir("harbor-insurance"), "harbor-insurance"
        )

        def slow(i: int):
            try:
                return city.query(
                    "enterprise_credit",
                    aggregates=[count()],
                    group_by=["district"],
                    mode="dp",
                    epsilon=0.01 + i * 1e-4,
                    timeout=6.0,
                )  # distinct questions: no reuse
            except DataopsClientError as exc:
                return exc

        with ThreadPoolExecutor(flood) as pool:
            futures = [pool.submit(slow, i) for i in range(flood)]
            # The flood has arrived: with the caps, 2 block in the engine and 8 are
            # refused; without, all 4 engine threads are blocked.
            if control == "on":
                assert _wait_for(
                    lambda: blocked_credit_releases.blocked == 2 and sum(f.done() for f in futures) == 8
                )
            else:
                assert _wait_for(lambda: blocked_credit_releases.blocked == 4)
            try:
                answer = harbor.query(
                    "medical_claims",
                    aggregates=[count()],
                    group_by=["sex"],
                    mode="dp",
                    epsilon=0.1,
                    timeout=2.0 if control == "off" else 10.0,
                )
            except DataopsClientError as exc:
                answer = exc
            status = _health(server, pki)
            outcomes = [f.result(timeout=30) for f in futures]
        # Release the blocked engine threads only once the server has given up on them too.
        _wait_for(lambda: sum(r["consumer"] == "city-bank" for r in audit_records(config)) >= flood)
        blocked_credit_releases.set()
        city.close()
        harbor.close()
    finally:
        server.stop(1.0)
    if control == "off":
        assert isinstance(answer, DataopsClientError) and answer.code is grpc.StatusCode.DEADLINE_EXCEEDED
        return
    assert not isinstance(answer, DataopsClientError)  # served while the flood waits
    assert status == health_pb2.HealthCheckResponse.SERVING
    shed = [o for o in outcomes if isinstance(o, DataopsClientError) and o.rule == "limits.concurrency"]
    assert len(shed) == flood - 2
    assert all(o.code is grpc.StatusCode.RESOURCE_EXHAUSTED for o in shed)
    assert shed[0].quota_violations[0][0] == "consumer:city-bank"
    # The two admitted ones ran out their deadline in the blocked engine.
    assert [o.code for o in outcomes if o not in shed] == [grpc.StatusCode.DEADLINE_EXCEEDED] * 2
    # Exactly one audit record per request, the shed ones included.
    records = [r for r in audit_records(config) if r["consumer"] == "city-bank"]
    assert len(records) == flood
    assert (
        sorted(r["rule"] for r in records if r["code"] == "RESOURCE_EXHAUSTED") == ["limits.concurrency"] * 8
    )
    assert [r["code"] for r in records].count("DEADLINE_EXCEEDED") == 2, records


@ON_OFF
def test_no_request_is_shed_by_grpc_without_an_audit_record(tmp_path, sandbox_dir, pki, monkeypatch, control):
    """Attack (on the reviewer): overload the server so gRPC's own concurrency cap turns
    requests away before any interceptor runs; they leave no trace in the audit log."""
    work = tmp_path / "work"
    work.mkdir()
    config = write_config(work, sandbox_dir, pki, max_in_flight=4, max_in_flight_per_consumer=4)
    if control == "off":  # gRPC's cap back, as main had it (workers * 64), here scaled to the test
        real_server = grpc.server
        monkeypatch.setattr(
            app_module.grpc,
            "server",
            lambda *a, **kw: real_server(*a, **{**kw, "maximum_concurrent_rpcs": 4}),
        )
    gate = threading.Event()
    held = threading.Semaphore(0)
    datasets = app_module.Sandbox.datasets

    def slow_datasets(self, consumer):
        held.release()
        gate.wait(10)
        return datasets(self, consumer)

    monkeypatch.setattr(app_module.Sandbox, "datasets", slow_datasets)
    server = build_server(config).start()
    flood = 24
    try:
        # witness=False: a witnessing client may fetch a consistency proof when answers
        # cross (an audited call of its own), which these exact record counts leave out.
        city = Client.from_directory(
            f"localhost:{server.port}", pki.consumer_dir("city-bank"), "city-bank", witness=False
        )

        def ask(_):
            try:
                return city.list_datasets()
            except DataopsClientError as exc:
                return exc

        with ThreadPoolExecutor(flood) as pool:
            futures = [pool.submit(ask, i) for i in range(flood)]
            # Four are served (and held); the other twenty are turned away, by us or by gRPC.
            assert all(held.acquire(timeout=10) for _ in range(4))
            assert _wait_for(lambda: sum(f.done() for f in futures) == flood - 4, timeout=10)
            gate.set()
            outcomes = [f.result(timeout=30) for f in futures]
        city.close()
    finally:
        gate.set()
        server.stop(1.0)
    refused = [o for o in outcomes if isinstance(o, DataopsClientError)]
    assert refused and all(o.code is grpc.StatusCode.RESOURCE_EXHAUSTED for o in refused)
    records = audit_records(config)
    if control == "off":
        assert len(records) < flood  # shed by gRPC: no record, no rule
        assert any(o.rule is None for o in refused)
        return
    assert len(records) == flood
    assert all(o.rule == "limits.concurrency" for o in refused)


@ON_OFF
def test_a_request_that_expires_waiting_for_a_thread_is_still_audited(
    tmp_path, sandbox_dir, pki, monkeypatch, control
):
    """Attack (on the reviewer): keep every request thread busy, so other requests wait
    in gRPC's queue until their deadline passes; gRPC drops them and no record is left."""
    work = tmp_path / "work"
    work.mkdir()
    config = write_config(work, sandbox_dir, pki, max_in_flight=2, max_in_flight_per_consumer=2)
    monkeypatch.setattr(app_module, "admission_threads", lambda config: 2)  # exactly the admitted ones
    if control == "off":  # gRPC's plain pool: nobody notices what it drops
        monkeypatch.setattr(interceptors.RequestPool, "submit", ThreadPoolExecutor.submit)
    gate = threading.Event()
    held = threading.Semaphore(0)
    datasets = app_module.Sandbox.datasets

    def slow_datasets(self, consumer):
        held.release()
        gate.wait(10)
        return datasets(self, consumer)

    monkeypatch.setattr(app_module.Sandbox, "datasets", slow_datasets)
    server = build_server(config).start()
    try:
        # witness=False: exact record counts (see test_no_request_is_shed_by_grpc_without_an_audit_record).
        city = Client.from_directory(
            f"localhost:{server.port}", pki.consumer_dir("city-bank"), "city-bank", witness=False
        )
        river = Client.from_directory(
            f"localhost:{server.port}",
            pki.consumer_dir("river-bank"),
            "river-bank",
            timeout=0.5,
            witness=False,
        )
        with ThreadPoolExecutor(2) as pool:
            busy = [pool.submit(city.list_datasets) for _ in range(2)]
            assert held.acquire(timeout=10) and held.acquire(timeout=10)  # both request threads held
            with pytest.raises(DataopsClientError) as err:
                river.list_datasets()
            assert err.value.code is grpc.StatusCode.DEADLINE_EXCEEDED
            status = _health(server, pki)  # health has its own threads
            gate.set()
            assert all(f.result(timeout=10) for f in busy)
        _wait_for(lambda: len(audit_records(config)) >= 3, timeout=3)
        city.close()
        river.close()
    finally:
        gate.set()
        server.stop(1.0)
    assert status == health_pb2.HealthCheckResponse.SERVING
    records = audit_records(config)
    if control == "off":
        assert [r["consumer"] for r in records] == [
            "city-bank",
            "city-bank",
        ]  # river-bank's request: no trace
        return
    assert len(records) == 3
    [dropped] = [r for r in records if r["consumer"] == "river-bank"]
    assert (dropped["code"], dropped["rule"]) == ("DEADLINE_EXCEEDED", "deadline.queued")


NARROWING = [
    ("revoked = false", "revoked = true"),
    ("expires = 2027-12-31", "expires = 2026-01-01"),
    ('modes = ["aggregate", "dp"]', 'modes = ["dp"]'),
    ('"count", "count_units", "sum", "mean", "quantile"]', '"count", "sum"]'),
    ("epsilon = 5.0", "epsilon = 1.0"),
    ('industry = ["dimension", "filter"]', 'industry = ["dimension"]'),
    ('tax_paid = ["measure"]\n', ""),
]
WIDENING = [
    ("expires = 2027-12-31", "expires = 2029-01-01"),
    (
        'tables = ["enterprises_by_district_industry_size"]',
        'tables = ["enterprises_by_district_industry_size", "enterprises_by_district_size"]',
    ),
    ("epsilon = 5.0", "epsilon = 6.0"),
    ('tax_paid = ["measure"]', 'tax_paid = ["measure", "filter"]'),
    ('purpose = "pre-loan review"', 'purpose = "marketing"'),
]


@pytest.mark.parametrize(
    "old,new,immediate", [(*e, True) for e in NARROWING] + [(*e, False) for e in WIDENING]
)
def test_narrowing_edits_apply_at_once_and_others_only_once_settled(tmp_path, old, new, immediate):
    repo = Path(__file__).resolve().parent.parent
    for name in ("catalog", "policies", "products"):
        shutil.copytree(repo / name, tmp_path / name)
    catalog = load_catalog(tmp_path / "catalog", tmp_path / "sandbox")
    now = [0.0]
    store = PolicyStore(
        tmp_path / "policies",
        catalog,
        settle_seconds=2.0,
        clock=lambda: now[0],
        products=load_products(tmp_path / "products", catalog),
    )
    path = tmp_path / "policies" / "city-bank.toml"
    text = path.read_text()
    assert old in text
    path.write_text(text.replace(old, new, 1))
    assert store.poll() is immediate
    if not immediate:
        now[0] = 1.0
        assert store.poll() is False  # not yet settled
        assert store.poll(settled=True) is True  # the operator's SIGHUP: complete, apply now
    assert store.current.get("city-bank").source == path
    assert store.last_error is None


def test_a_damaged_revocation_memory_stops_the_server_from_starting(own_config, own_pki, tmp_path):
    spare = issue_consumer(own_pki.directory, "city-bank", out_dir=tmp_path / "spare")
    revoke(own_pki.directory, spare.cert)
    build_server(own_config).stop(0)  # accepts the CRL and remembers it
    state = own_config.paths.state / certs.REVOCATION_STATE
    assert state.exists()
    state.write_text("{")  # a truncated memory could have forgotten revocations
    with pytest.raises(certs.CertificateError, match=str(state)):
        build_server(own_config)


def test_removing_a_grant_applies_at_once_and_adding_it_back_waits(tmp_path):
    repo = Path(__file__).resolve().parent.parent
    for name in ("catalog", "policies", "products"):
        shutil.copytree(repo / name, tmp_path / name)
    catalog = load_catalog(tmp_path / "catalog", tmp_path / "sandbox")
    now = [0.0]
    store = PolicyStore(
        tmp_path / "policies",
        catalog,
        settle_seconds=2.0,
        clock=lambda: now[0],
        products=load_products(tmp_path / "products", catalog),
    )
    path = tmp_path / "policies" / "city-bank.toml"
    whole = path.read_text()
    path.write_text(whole[: whole.index("[[grants]]")])
    assert store.poll() is True
    assert dict(store.current.get("city-bank").grants) == {} and store.last_error is None
    path.write_text(whole)
    assert store.poll() is False
    now[0] = 2.0
    assert store.poll() is True
    assert set(store.current.get("city-bank").grants) == {"enterprise_credit"}
