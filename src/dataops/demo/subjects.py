"""The demo's consented subject scenarios (`dataops demo` plays them after the aggregate ones).

* city-bank runs a pre-loan review of an applicant enterprise under its consent, and is
  refused without one, the same way as for an enterprise that does not exist; the
  "once" consent cannot be used twice.
* harbor-insurance underwrites an applicant under the applicant's consent.
* river-bank monitors a small loan portfolio with Watch and receives an update when a
  new data version puts one borrower into arrears (the demo then restores the data).

The consent service is `dataops.consent_service`, playing the data subjects' side.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import polars as pl

from dataops.client import Client, DataopsClientError
from dataops.config import ServerConfig
from dataops.consent import Fetch

ABSENT_ENTERPRISE = "91990199NOSUCHONE7"


def _show(out: Callable[[str], None], result: Any) -> None:
    if isinstance(result, DataopsClientError):
        out(f"    REFUSED {result.code.name} {result.reason} (rule {result.rule!r}): {result.message}")
        return
    outputs = ", ".join(f"{k}={v}" for k, v in result.outputs.items())
    out(f"    {outputs}")
    out(
        f"    consent {result.consent_id}, data version {result.data_version}, receipt #{result.receipt.sequence}"
    )


def _step(out: Callable[[str], None], title: str, action: Callable[[], Any]) -> Any:
    out(f"\n  ▸ {title}")
    try:
        result = action()
    except DataopsClientError as exc:
        result = exc
    _show(out, result)
    return result


def _rewrite(path: Path, frame: pl.DataFrame) -> None:
    temporary = path.with_name(f".{path.name}.demo.tmp")
    frame.write_parquet(temporary)
    os.replace(temporary, path)  # readers see the old version or the new one, never half


def play_subjects(target: str, config: ServerConfig, out: Callable[[str], None]) -> dict[str, list[Any]]:
    from dataops.demo.session import consent_service

    service = consent_service(config)
    pki = config.tls.ca_cert.parent / "consumers"
    credit_path = config.paths.sandbox / "finance/enterprise_credit.parquet"
    credit = pl.read_parquet(credit_path)
    claims = pl.read_parquet(
        config.paths.sandbox / "insurance/medical_claims.parquet", columns=["person_id", "visit_type"]
    )
    results: dict[str, list[Any]] = {}

    out("\n══ city-bank: pre-loan review of one applicant enterprise, with its consent ══")
    applicant = credit.filter(pl.col("penalties") > 0).sort("enterprise_id")["enterprise_id"][0]
    consent = service.issue(
        subject=applicant,
        consumer="city-bank",
        products=["pre_loan_review"],
        purpose="pre-loan review",
        days=7,
    )
    out(f"  the applicant {applicant} signs a one-time consent for city-bank's pre-loan review")
    with Client.from_directory(target, pki / "city-bank", "city-bank") as client:
        results["city-bank"] = [
            _step(
                out,
                "Evaluate pre_loan_review under the consent",
                lambda: client.evaluate("pre_loan_review", applicant, consent),
            ),
            _step(
                out,
                "The same applicant without a consent",
                lambda: client.evaluate("pre_loan_review", applicant, b""),
            ),
            _step(
                out,
                "An enterprise that does not exist, without a consent (the same refusal)",
                lambda: client.evaluate("pre_loan_review", ABSENT_ENTERPRISE, b""),
            ),
            _step(
                out,
                "The one-time consent again (a replay)",
                lambda: client.evaluate("pre_loan_review", applicant, consent),
            ),
        ]

    out("\n══ harbor-insurance: underwriting one applicant, with the applicant's consent ══")
    person = (
        claims.filter(pl.col("visit_type") == "inpatient")
        .group_by("person_id")
        .len()
        .sort(["len", "person_id"], descending=[True, False])["person_id"][0]
    )
    consent = service.issue(
        subject=person, consumer="harbor-insurance", products=["underwriting"], purpose="underwriting", days=1
    )
    with Client.from_directory(target, pki / "harbor-insurance", "harbor-insurance") as client:
        results["harbor-insurance"] = [
            _step(
                out,
                f"Evaluate underwriting for applicant {person}",
                lambda: client.evaluate("underwriting", person, consent),
            ),
        ]

    out("\n══ river-bank: post-loan monitoring of a portfolio with Watch ══")
    calm = credit.filter((pl.col("arrears_months") == 0) & (pl.col("penalties") == 0)).sort("enterprise_id")
    portfolio = calm["enterprise_id"][:3].to_list()
    items = [
        (
            "credit_monitoring",
            e,
            service.issue(
                subject=e,
                consumer="river-bank",
                products=["credit_monitoring"],
                purpose="post-loan monitoring",
                days=365,
                fetch=Fetch("periodic", "month", 31),
            ),
        )
        for e in portfolio
    ]
    out(
        f"  three borrowers each sign a periodic consent (31 uses a month, a year long): {', '.join(portfolio)}"
    )
    updates: list[Any] = []
    with Client.from_directory(target, pki / "river-bank", "river-bank") as client:
        stream = client.watch(items, timeout=120)
        try:
            for _ in portfolio:
                index, update = next(stream)
                out(f"\n  ▸ watch: borrower {portfolio[index]} now")
                _show(out, update)
                updates.append((index, update))
            out(
                f"\n  ▸ a new data version arrives: borrower {portfolio[0]} is four months in utility arrears"
            )
            _rewrite(
                credit_path,
                credit.with_columns(
                    pl.when(pl.col("enterprise_id") == portfolio[0])
                    .then(4)
                    .otherwise(pl.col("arrears_months"))
                    .alias("arrears_months")
                ),
            )
            index, update = next(stream)
            out(f"  ▸ watch: borrower {portfolio[index]} changed")
            _show(out, update)
            updates.append((index, update))
        finally:
            stream.cancel()
            _rewrite(credit_path, credit)  # the demo's data as it was, for the next run
    results["river-bank"] = updates
    toml = config.paths.consents.parent / "dataops.toml"
    out(f"\nTry: dataops audit consents -c {toml}   (every use of every consent, checked)")
    out(f"     dataops consent list -c {toml}")
    return results
