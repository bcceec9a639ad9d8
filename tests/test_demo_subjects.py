"""The demo's subject scenarios get the answers they claim."""

from __future__ import annotations

from dataops.client import DataopsClientError, SubjectEvaluation
from dataops.demo import session
from dataops.demo.subjects import play_subjects


def test_the_subject_scenarios(tmp_path):
    from dataops.server import build_server

    config = session.prepare(tmp_path / "demo", claims=60_000, enterprises=20_000, out=lambda _: None)
    before = (config.paths.sandbox / "finance/enterprise_credit.parquet").read_bytes()
    server = build_server(config).start()
    lines: list[str] = []
    try:
        results = play_subjects(f"localhost:{server.port}", config, lines.append)
    finally:
        server.stop(1.0)
    review, without, absent, replay = results["city-bank"]
    assert isinstance(review, SubjectEvaluation) and review.outputs["grade"] in "ABCD"
    assert isinstance(without, DataopsClientError) and without.reason == "CONSENT_INVALID"
    # Without a consent, an existing and an absent enterprise get the same refusal.
    assert (without.code, without.reason, without.message, without.rule) == (
        absent.code,
        absent.reason,
        absent.message,
        absent.rule,
    )
    assert isinstance(replay, DataopsClientError) and replay.rule == "consent.uses"
    (underwriting,) = results["harbor-insurance"]
    assert underwriting.outputs["inpatient_stays_24m"] >= 0
    watch = results["river-bank"]
    assert [i for i, _ in watch] == [0, 1, 2, 0]
    assert watch[0][1].outputs["arrears_months_band"] == "none"
    assert watch[3][1].outputs["arrears_months_band"] == "3-5"
    assert watch[3][1].data_version != watch[0][1].data_version
    # The demo restores its data for the next run.
    assert (config.paths.sandbox / "finance/enterprise_credit.parquet").read_bytes() == before


def test_the_demo_plays_the_subject_scenarios(tmp_path):
    lines: list[str] = []
    assert session.run_demo(tmp_path / "demo", claims=60_000, enterprises=20_000, out=lines.append) == 0
    text = "\n".join(lines)
    assert "pre-loan review of one applicant enterprise" in text
    assert "REFUSED PERMISSION_DENIED CONSENT_INVALID (rule 'consent.missing')" in text
    assert "watch: borrower" in text and "changed" in text


def test_after_the_demo_every_consent_use_checks_out(tmp_path, capsys):
    from dataops.cli import main

    work = tmp_path / "demo"
    assert session.run_demo(work, claims=60_000, enterprises=20_000, out=lambda _: None) == 0
    capsys.readouterr()
    assert main(["audit", "consents", "-c", str(work / "dataops.toml")]) == 0
    text = capsys.readouterr().out
    assert "6 evaluations released under 5 consents, 3 refused" in text
    assert "PROBLEM" not in text
