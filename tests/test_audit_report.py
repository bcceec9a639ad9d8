"""The reviewer's HTML report: self-contained, with charts that carry the data."""

from __future__ import annotations

from collections import Counter, defaultdict
from html.parser import HTMLParser

import pytest

from dataops.audit.sample import sample_records
from test_audit_verify import make_log, read_lines, run_audit, write_lines


class Page(HTMLParser):
    """The elements of interest: every tag with its attributes, and the charts' marks."""

    def __init__(self) -> None:
        super().__init__()
        self.tags: Counter = Counter()
        self.charts: dict[str, list[tuple[str, dict]]] = defaultdict(list)
        self.sections: dict[str, dict] = {}
        self._chart: str | None = None
        self.text: list[str] = []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.tags[tag] += 1
        if tag == "svg":
            self._chart = attrs.get("data-chart")
            self.charts[self._chart]  # noqa: B018 - register even when empty
        elif self._chart and tag in ("rect", "polyline"):
            self.charts[self._chart].append((tag, attrs))
        if tag == "section":
            self.sections[attrs.get("id")] = attrs

    def handle_endtag(self, tag):
        if tag == "svg":
            self._chart = None

    def handle_data(self, data):
        self.text.append(data)


def report(tmp_path, capsys, *extra) -> tuple[int, str, Page]:
    out = tmp_path / "report.html"
    code, _, _ = run_audit(capsys, "report", "--log-dir", str(tmp_path / "audit"), "--out", str(out), *extra)
    html = out.read_text()
    page = Page()
    page.feed(html)
    return code, html, page


def test_the_report_is_one_offline_page_with_charts_of_the_log(tmp_path, capsys):
    log = make_log(tmp_path / "audit", n=400, every=100)
    records = list(sample_records(400))
    code, html, page = report(tmp_path, capsys)
    assert code == 0
    # Nothing to fetch: no scripts, stylesheets, images or frames, and no URLs at all.
    assert "http://" not in html and "https://" not in html
    assert not any(page.tags[t] for t in ("script", "link", "img", "iframe", "object", "embed"))
    assert "default-src 'none'" in html
    assert page.sections["verification"]["data-ok"] == "true" and log.key_id in html

    spenders = {(r["consumer"], r["dataset"]) for r in records if r["epsilon_spent"] > 0}
    lines = [a for tag, a in page.charts["budget"] if tag == "polyline"]
    assert {a["data-series"] for a in lines} == {f"{c} · {d}" for c, d in spenders}
    for a in lines:
        consumer, dataset = a["data-series"].split(" · ")
        spent = sum(
            r["epsilon_spent"] for r in records if (r["consumer"], r["dataset"]) == (consumer, dataset)
        )
        assert float(a["data-total"]) == pytest.approx(spent)
        assert len(a["points"].split()) == 2 * int(a["data-releases"]) + 2

    queries = Counter(r["dataset"] for r in records if r["method"] == "RunQuery")
    shown: Counter = Counter()
    for _, a in page.charts["queries"]:
        shown[a["data-label"]] += int(float(a["data-value"]))
    assert shown == queries

    denials = Counter(r["reason"] for r in records if r["decision"] in ("denied", "invalid"))
    shown = Counter()
    for _, a in page.charts["denials"]:
        shown[a["data-label"]] += int(float(a["data-value"]))
    assert shown == denials

    suppressed = Counter()
    for r in records:
        if r["rows_suppressed"]:
            suppressed[r["dataset"]] += r["rows_suppressed"]
    assert {
        a["data-label"]: int(float(a["data-value"])) for _, a in page.charts["suppressions"]
    } == suppressed


def test_the_report_leads_with_a_failed_verification(tmp_path, capsys):
    make_log(tmp_path / "audit", n=30, every=10)
    path = tmp_path / "audit" / "audit.jsonl"
    lines = read_lines(path)
    write_lines(path, lines[:4] + lines[5:])
    code, html, page = report(tmp_path, capsys)
    assert code == 1
    assert page.sections["verification"]["data-ok"] == "false"
    assert "audit.jsonl line 5, seq 6" in html
    assert html.index('id="verification"') < html.index('id="budget"')


def test_a_report_of_a_quiet_log_says_there_is_nothing_to_chart(tmp_path, capsys):
    from audit_support import open_log

    log = open_log(tmp_path / "audit")
    log.append(
        {
            "time": "2025-03-03T08:00:00+00:00",
            "consumer": "city-bank",
            "method": "ListDatasets",
            "decision": "allowed",
        }
    )
    log.close()
    code, html, page = report(tmp_path, capsys)
    assert code == 0 and "nothing to show" in html and page.charts["budget"] == []
