"""`dataops demo` plays its whole script against the real server and exits 0."""

from __future__ import annotations

import pytest

from dataops.client import DataopsClientError
from dataops.demo import session
from dataops.demo.generate import DISTRICTS


def test_the_demo_runs_end_to_end(tmp_path):
    lines: list[str] = []
    code = session.run_demo(tmp_path / "demo", claims=100_000, enterprises=20_000, out=lines.append)
    text = "\n".join(lines)
    assert code == 0, text
    assert "server stopped cleanly" in text
    assert "refused at the TLS handshake" in text
    assert "REFUSED PERMISSION_DENIED POLICY_DENIED (rule 'identifier'" in text
    assert "REFUSED NOT_FOUND UNKNOWN_DATASET" in text
    suppressed = [line for line in lines if " suppressed;" in line and " 0 suppressed" not in line]
    assert suppressed, "some step must show suppressed groups"
    # A second run reuses data and certificates and starts a fresh audit trail.
    lines.clear()
    assert session.run_demo(tmp_path / "demo", claims=100_000, enterprises=20_000, out=lines.append) == 0
    assert not any("generated" in line for line in lines)


def test_the_script_gets_the_answers_it_claims(tmp_path):
    from dataops.server import build_server

    # The demo's default claims: over much less data the five-dimensional claims table
    # is too detailed and is withheld whole (its finest cells mostly fail the rules).
    config = session.prepare(tmp_path / "demo", claims=1_000_000, enterprises=20_000, out=lambda _: None)
    server = build_server(config).start()
    try:
        assert server.tables.wait_ready(timeout=600)
        results = session.play(f"localhost:{server.port}", config.tls.ca_cert.parent, lambda _: None)
    finally:
        server.stop(1.0)
    city = results["city-bank"]
    assert [d.id for d in city[0]] == ["enterprise_credit"]
    assert city[1].frame.height > 0 and city[2].rows_suppressed > 0
    assert city[1].frame.height + city[1].rows_suppressed == 4  # the size bands' public key set
    assert isinstance(city[3], DataopsClientError) and city[3].rule == "identifier"
    assert isinstance(city[4], DataopsClientError) and city[4].reason == "UNKNOWN_DATASET"
    assert [t.id for t in city[5].tables] == ["enterprises_by_district_industry_size"]
    assert isinstance(city[6], DataopsClientError) and (city[6].rule, city[6].column) == (
        "table.coverage",
        "year_founded",
    )
    assert isinstance(results["river-bank"][1], DataopsClientError)
    harbor = results["harbor-insurance"]
    assert harbor[0].frame.height > 0 and harbor[1].rows_suppressed > 0
    assert harbor[2].frame.height > 0 and set(harbor[2].frame["district"]) <= set(DISTRICTS)
    assert isinstance(harbor[3], DataopsClientError) and harbor[3].column == "hospital_level"


def test_the_demo_shows_dp_answers_an_estimate_reuse_and_an_exhausted_budget(tmp_path):
    lines: list[str] = []
    assert session.run_demo(tmp_path / "demo", claims=100_000, enterprises=20_000, out=lines.append) == 0
    text = "\n".join(lines)
    assert "nothing spent now" in text  # the estimate
    assert "spent epsilon 1 (remaining 4)" in text
    assert "reused an earlier release: nothing spent" in text
    assert "REFUSED RESOURCE_EXHAUSTED BUDGET_EXHAUSTED" in text


@pytest.mark.slow
def test_the_demo_at_its_default_size(tmp_path):
    """1M claim rows and 200k enterprises, as `dataops demo` runs by default."""
    lines: list[str] = []
    assert session.run_demo(tmp_path / "demo", out=lines.append) == 0
    text = "\n".join(lines)
    assert "generated 200,000 enterprises and 1,000,000 claim rows" in text
    assert "reused an earlier release: nothing spent" in text


def test_after_the_demo_the_audit_log_verifies(tmp_path, capsys):
    from dataops.cli import main

    work = tmp_path / "demo"
    assert session.run_demo(work, claims=100_000, enterprises=20_000, out=lambda _: None) == 0
    assert main(["audit", "verify", "-c", str(work / "dataops.toml")]) == 0
    assert capsys.readouterr().out.startswith("OK")
    # One byte changed in any record, and it no longer does.
    log = work / "state" / "audit" / "audit.jsonl"
    data = bytearray(log.read_bytes())
    data[data.index(b'"city-bank"') + 1] ^= 0x01
    log.write_bytes(bytes(data))
    assert main(["audit", "verify", "-c", str(work / "dataops.toml")]) == 1
    assert "audit.jsonl line" in capsys.readouterr().out
