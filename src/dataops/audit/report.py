"""One self-contained HTML page for a compliance reviewer.

Inline CSS and SVG drawn here, no scripts, no fonts or images from anywhere, and a
Content-Security-Policy that forbids loading anything: the page opens offline and
cannot call home even if a record holds a URL. Every chart is followed by the table
of its numbers, so nothing depends on reading a picture.
"""

from __future__ import annotations

import datetime as dt
import html
import math
from collections import Counter, defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dataops.audit.reader import parse_time
from dataops.audit.verify import Verification

PALETTE = (
    "#4e79a7",
    "#f28e2b",
    "#e15759",
    "#76b7b2",
    "#59a14f",
    "#edc948",
    "#b07aa1",
    "#ff9da7",
    "#9c755f",
    "#bab0ac",
)
DECISION_COLORS = {"allowed": "#59a14f", "denied": "#e15759", "invalid": "#f28e2b", "error": "#7f7f7f"}
WIDTH, LEFT, RIGHT, TOP, BOTTOM = 880, 180, 30, 20, 40

CSS = """
body { font: 15px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; color: #222; margin: 2em auto;
       max-width: 960px; padding: 0 1em; }
h1 { font-size: 1.6em; margin-bottom: .2em; } h2 { font-size: 1.2em; margin-top: 2em; border-bottom: 1px solid #ddd; }
.meta, .note { color: #666; }
.verify { padding: .8em 1em; border-radius: 6px; margin: 1em 0; }
.verify.ok { background: #eaf6ea; border: 1px solid #59a14f; }
.verify.bad { background: #fdecec; border: 1px solid #e15759; }
.verify.unknown { background: #fff7e0; border: 1px solid #edc948; }
.verify h2 { border: 0; margin: 0 0 .3em 0; }
.cut { background: #fdecec; border-left: 4px solid #e15759; padding: .5em .8em; }
table { border-collapse: collapse; margin: .6em 0 1em; font-size: .9em; }
th, td { padding: .25em .7em; border-bottom: 1px solid #e4e4e4; text-align: left; }
td.n { text-align: right; font-variant-numeric: tabular-nums; }
code { font-size: .9em; word-break: break-all; }
svg { display: block; margin: .5em 0; }
svg text { font: 12px system-ui, sans-serif; fill: #333; }
svg .axis { stroke: #999; stroke-width: 1; } svg .grid { stroke: #eee; stroke-width: 1; }
ul.legend { list-style: none; padding: 0; margin: 0 0 1em; display: flex; flex-wrap: wrap; gap: .4em 1.2em; }
ul.legend li { font-size: .9em; } .swatch { display: inline-block; width: .9em; height: .9em; margin-right: .35em;
       vertical-align: -.1em; border-radius: 2px; }
"""


@dataclass(frozen=True)
class Bar:
    label: str
    parts: tuple[tuple[str, float, str], ...]  # (part label, value, colour)


@dataclass(frozen=True)
class Caps:
    """Budget caps to draw against the spend: per (consumer, dataset) grant and per dataset."""

    grants: dict[tuple[str, str], float]
    datasets: dict[str, float]


def write_report(
    out: Path,
    records: Iterable[dict[str, Any]],
    verification: Verification | None,
    *,
    title: str = "dataops audit report",
    source: str = "",
    caps: Caps | None = None,
) -> Path:
    Path(out).write_text(
        render_report(records, verification, title=title, source=source, caps=caps), encoding="utf-8"
    )
    return Path(out)


def render_report(
    records: Iterable[dict[str, Any]],
    verification: Verification | None,
    *,
    title: str = "dataops audit report",
    source: str = "",
    caps: Caps | None = None,
) -> str:
    records = [r for r in records if _time(r) is not None]
    cut = ""
    if verification is not None and not verification.ok:
        # Past the first break nothing is evidence: chart and count only what chains before it.
        good = verification.records
        dropped = sum(1 for r in records if not isinstance(r.get("seq"), int) or r["seq"] > good)
        records = [r for r in records if isinstance(r.get("seq"), int) and r["seq"] <= good]
        cut = (
            f'<p class="cut" id="cut" data-last-seq="{good}">Everything below covers only seq 1..{good:,}, '
            f"the records before the first break; {dropped:,} records after it are not charted or counted."
            "</p>"
        )
    generated = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    span = (
        f"{len(records)} records from {_fmt_time(_time(records[0]))} to {_fmt_time(_time(records[-1]))}"
        if records
        else "no records"
    )
    body = [
        f"<h1>{_e(title)}</h1>",
        f'<p class="meta">{_e(source)} · {span} · generated {generated}</p>',
        _verification_section(verification),
        cut,
        _budget_section(records, caps),
        _volume_section(records),
        _queries_section(records),
        _denials_section(records),
        _denials_by_consumer_section(records),
        _suppression_section(records),
        _errors_section(records),
    ]
    return (
        '<!doctype html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        # Nothing may be fetched: no scripts, images, fonts or frames, from anywhere.
        "<meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; style-src 'unsafe-inline'\">\n"
        f"<title>{_e(title)}</title>\n<style>{CSS}</style>\n</head>\n<body>\n"
        + "\n".join(body)
        + "\n</body>\n</html>\n"
    )


# --- sections -------------------------------------------------------------------


def _verification_section(v: Verification | None) -> str:
    if v is None:
        return (
            '<section class="verify unknown" id="verification"><h2>Verification: not run</h2>'
            "<p>No public key was available; run <code>dataops audit verify --public-key FILE</code>.</p>"
            "</section>"
        )
    state, heading = (
        ("ok", "Verification: OK") if v.ok else ("bad", "Verification: FAILED — the log was altered")
    )
    facts = [
        ("records", f"{v.records:,}"),
        ("signed checkpoints", f"{len(v.checkpoints):,}"),
        ("covered by a signature", f"up to seq {v.signed_size:,}"),
        ("public key id", v.key_id),
        ("head", f"seq {v.head[0]:,} · {v.head[1]}" if v.head else "empty log"),
    ]
    if v.checkpoints:
        last = v.checkpoints[-1]
        facts.append(("last checkpoint", f"#{last['checkpoint']} at {last['time']}"))
    rows = "".join(f"<tr><th>{_e(k)}</th><td><code>{_e(val)}</code></td></tr>" for k, val in facts)
    problems = "".join(f"<li><strong>{_e(p.place)}</strong>: {_e(p.reason)}</li>" for p in v.problems)
    notes = "".join(f"<li>{_e(n)}</li>" for n in v.notes)
    return (
        f'<section class="verify {state}" id="verification" data-ok="{str(v.ok).lower()}"><h2>{heading}</h2>'
        f"<table>{rows}</table>"
        + (
            f"<p>Problems (the first bad place; what follows it cannot be trusted):</p><ul>{problems}</ul>"
            if problems
            else ""
        )
        + (f'<ul class="note">{notes}</ul>' if notes else "")
        + "</section>"
    )


def _budget_section(records: list[dict[str, Any]], caps: Caps | None = None) -> str:
    series: dict[tuple[str, str], list[tuple[dt.datetime, float]]] = defaultdict(list)
    totals: dict[tuple[str, str], list[float]] = defaultdict(lambda: [0.0, 0.0, 0])
    for r in records:
        eps, delta = float(r.get("epsilon_spent") or 0), float(r.get("delta_spent") or 0)
        if eps <= 0 and delta <= 0:
            continue
        key = (r.get("consumer") or "?", r.get("dataset") or "?")
        t = totals[key]
        t[0] += eps
        t[1] += delta
        t[2] += 1
        when = _time(r)
        if when is not None:  # a record without a readable time is counted, not drawn
            series[key].append((when, t[0]))
    start = _time(records[0]) if records else None
    end = _time(records[-1]) if records else None
    lines = [(f"{c} · {d}", points) for (c, d), points in sorted(series.items())]
    grant_caps = caps.grants if caps else {}
    line_caps = {f"{c} · {d}": grant_caps[(c, d)] for (c, d) in series if (c, d) in grant_caps}
    chart = _line_chart("budget", "Cumulative epsilon spent", lines, start, end, line_caps)
    dataset_caps = caps.datasets if caps else {}

    def cap(value: float | None) -> str:
        return "-" if value is None else f"{value:.4g}"

    table = _table(
        (
            "consumer",
            "dataset",
            "epsilon spent",
            "grant cap",
            "dataset cap",
            "delta spent",
            "releases that spent",
        ),
        [
            (c, d, f"{e:.4g}", cap(grant_caps.get((c, d))), cap(dataset_caps.get(d)), f"{dl:.3g}", n)
            for (c, d), (e, dl, n) in sorted(totals.items())
        ],
    )
    note = (
        "Dashed lines: each grant's epsilon cap, from the policies in force."
        if caps
        else "No policies were read (run with <code>-c dataops.toml</code>), so no caps are drawn."
    )
    return (
        '<section id="budget"><h2>Privacy budget spent per consumer and dataset</h2>'
        '<p class="note">Cumulative ε from each record\'s <code>epsilon_spent</code> (reused releases spend '
        f"nothing). {note}</p>" + chart + table + "</section>"
    )


BUCKETS = (60, 300, 900, 3600, 6 * 3600, 86400, 7 * 86400, 30 * 86400)  # seconds


def _volume_section(records: list[dict[str, Any]]) -> str:
    """Requests per time bucket, stacked by decision: when the log was busy, and with what."""
    # A record without a readable time has no bucket; the log's verification reports it.
    timed = [(when, r) for r in records if (when := _time(r)) is not None]
    if not timed:
        return (
            '<section id="volume"><h2>Requests over time</h2>'
            + _empty("volume", "no requests")
            + "</section>"
        )
    start, end = timed[0][0], timed[-1][0]
    span = max((end - start).total_seconds(), 1.0)
    size = next((b for b in BUCKETS if span / b <= 48), BUCKETS[-1])
    origin = math.floor(start.timestamp() / size) * size
    buckets: dict[int, Counter] = defaultdict(Counter)
    for when, r in timed:
        buckets[int((when.timestamp() - origin) // size)][r.get("decision") or "?"] += 1
    count = max(buckets) + 1
    decisions = [d for d in DECISION_COLORS if any(c[d] for c in buckets.values())]
    height, plot_w = 280, WIDTH - LEFT - RIGHT
    plot_h = height - TOP - BOTTOM
    top_value = _nice_max(max(sum(c.values()) for c in buckets.values()))
    step = plot_w / count
    parts = [_svg_open("volume", "Requests over time by decision", height)]
    for tick in _ticks(top_value):
        y = TOP + plot_h * (1 - tick / top_value)
        parts.append(
            f'<line class="grid" x1="{LEFT}" y1="{y:.1f}" x2="{WIDTH - RIGHT}" y2="{y:.1f}"/>'
            f'<text x="{LEFT - 8}" y="{y + 4:.1f}" text-anchor="end">{_num(tick)}</text>'
        )
    rows = []
    for i in range(count):
        when = dt.datetime.fromtimestamp(origin + i * size, dt.UTC)
        label = when.strftime("%Y-%m-%d %H:%M")
        level = 0.0
        for d in decisions:
            n = buckets.get(i, Counter())[d]
            if not n:
                continue
            h = plot_h * n / top_value
            y = TOP + plot_h * (1 - (level + n) / top_value)
            parts.append(
                f'<rect x="{LEFT + i * step + 1:.1f}" y="{y:.1f}" width="{max(step - 2, 1):.1f}" '
                f'height="{h:.1f}" fill="{DECISION_COLORS[d]}" data-label="{label}" data-part="{d}" '
                f'data-value="{n}"><title>{label} — {d}: {n}</title></rect>'
            )
            level += n
        if i in buckets:
            rows.append((label, *(buckets[i][d] for d in decisions), sum(buckets[i].values())))
    for i in range(0, count, max(1, count // 6)):
        when = dt.datetime.fromtimestamp(origin + i * size, dt.UTC)
        text = when.strftime("%H:%M") if span < 86400 else when.strftime("%m-%d %H:%M")
        parts.append(f'<text x="{LEFT + i * step:.1f}" y="{height - BOTTOM + 16}">{text}</text>')
    parts.append(
        f'<line class="axis" x1="{LEFT}" y1="{TOP + plot_h}" x2="{WIDTH - RIGHT}" y2="{TOP + plot_h}"/>'
        f'<line class="axis" x1="{LEFT}" y1="{TOP}" x2="{LEFT}" y2="{TOP + plot_h}"/></svg>'
    )
    width = {
        60: "one minute",
        300: "5 minutes",
        900: "15 minutes",
        3600: "one hour",
        6 * 3600: "6 hours",
        86400: "one day",
        7 * 86400: "one week",
        30 * 86400: "30 days",
    }[size]
    return (
        '<section id="volume"><h2>Requests over time</h2>'
        f'<p class="note">Every audited request, in buckets of {width} (UTC), by decision.</p>'
        + "".join(parts)
        + _legend((d, DECISION_COLORS[d]) for d in decisions)
        + _table(("bucket start (UTC)", *decisions, "total"), rows)
        + "</section>"
    )


def _queries_section(records: list[dict[str, Any]]) -> str:
    counts: dict[str, Counter] = defaultdict(Counter)
    for r in records:
        if r.get("method") == "RunQuery":
            counts[r.get("dataset") or "(not parsed)"][r.get("decision") or "?"] += 1
    decisions = [d for d in DECISION_COLORS if any(c[d] for c in counts.values())]
    bars = [
        Bar(ds, tuple((d, c[d], DECISION_COLORS[d]) for d in decisions if c[d]))
        for ds, c in sorted(counts.items(), key=lambda kv: -sum(kv[1].values()))
    ]
    table = _table(
        ("dataset", *decisions, "total"),
        [(ds, *(c[d] for d in decisions), sum(c.values())) for ds, c in sorted(counts.items())],
    )
    return (
        '<section id="queries"><h2>Queries per dataset</h2><p class="note">RunQuery requests by decision.</p>'
        + _bar_chart("queries", "Queries per dataset", bars)
        + _legend((d, DECISION_COLORS[d]) for d in decisions)
        + table
        + "</section>"
    )


def _denials_section(records: list[dict[str, Any]]) -> str:
    counts: dict[str, Counter] = defaultdict(Counter)
    rules: dict[str, Counter] = defaultdict(Counter)
    for r in records:
        if r.get("decision") in ("denied", "invalid"):
            reason = r.get("reason") or r.get("code") or "?"
            counts[reason][r["decision"]] += 1
            rules[reason][r.get("rule") or "-"] += 1
    kinds = [d for d in ("denied", "invalid") if any(c[d] for c in counts.values())]
    bars = [
        Bar(reason, tuple((d, c[d], DECISION_COLORS[d]) for d in kinds if c[d]))
        for reason, c in sorted(counts.items(), key=lambda kv: -sum(kv[1].values()))
    ]
    table = _table(
        ("reason", "refusals", "most frequent rules"),
        [
            (reason, sum(c.values()), ", ".join(f"{rule} ({n})" for rule, n in rules[reason].most_common(3)))
            for reason, c in sorted(counts.items(), key=lambda kv: -sum(kv[1].values()))
        ],
    )
    return (
        '<section id="denials"><h2>Denials by reason</h2><p class="note">Refused requests (policy or output '
        "control decisions, and malformed requests) by ErrorInfo reason.</p>"
        + _bar_chart("denials", "Denials by reason", bars)
        + _legend((d, DECISION_COLORS[d]) for d in kinds)
        + table
        + "</section>"
    )


def _denials_by_consumer_section(records: list[dict[str, Any]]) -> str:
    counts: dict[str, Counter] = defaultdict(Counter)
    reasons: dict[str, Counter] = defaultdict(Counter)
    for r in records:
        if r.get("decision") in ("denied", "invalid"):
            consumer = r.get("consumer") or "(no identity)"
            counts[consumer][r["decision"]] += 1
            reasons[consumer][f"{r.get('reason') or r.get('code') or '?'} / {r.get('rule') or '-'}"] += 1
    kinds = [d for d in ("denied", "invalid") if any(c[d] for c in counts.values())]
    ordered = sorted(counts.items(), key=lambda kv: (-sum(kv[1].values()), kv[0]))
    bars = [
        Bar(consumer, tuple((d, c[d], DECISION_COLORS[d]) for d in kinds if c[d])) for consumer, c in ordered
    ]
    table = _table(
        ("consumer", *kinds, "most frequent reason / rule"),
        [
            (
                consumer,
                *(c[d] for d in kinds),
                ", ".join(f"{k} ({n})" for k, n in reasons[consumer].most_common(3)),
            )
            for consumer, c in ordered
        ],
    )
    return (
        '<section id="denials-by-consumer"><h2>Denials per consumer</h2><p class="note">Who was refused, and '
        "by which rule: repeated probing shows here.</p>"
        + _bar_chart("denials-by-consumer", "Denials per consumer", bars)
        + _legend((d, DECISION_COLORS[d]) for d in kinds)
        + table
        + "</section>"
    )


ERRORS_LISTED = 200


def _errors_section(records: list[dict[str, Any]]) -> str:
    errors = [r for r in records if r.get("decision") == "error"]
    by_method = Counter(r.get("method") or "?" for r in errors)
    bars = [Bar(m, (("errors", n, DECISION_COLORS["error"]),)) for m, n in by_method.most_common()]
    rows = [
        (
            r.get("seq", "-"),
            _fmt_time(_time(r)),
            r.get("consumer") or "-",
            r.get("method") or "-",
            r.get("dataset") or "-",
            r.get("code") or "-",
            r.get("reason") or "-",
        )
        for r in errors[-ERRORS_LISTED:]
    ]
    more = (
        f'<p class="note">The last {ERRORS_LISTED} of {len(errors):,} are listed.</p>'
        if len(errors) > ERRORS_LISTED
        else ""
    )
    return (
        '<section id="errors"><h2>Errors</h2><p class="note">Requests that failed inside the service (INTERNAL: '
        "a bug; the client got the receipt). Nothing was released for them.</p>"
        + _bar_chart("errors", "Errors per method", bars)
        + _table(("seq", "time", "consumer", "method", "dataset", "code", "reason"), rows)
        + more
        + "</section>"
    )


def _suppression_section(records: list[dict[str, Any]]) -> str:
    rows: Counter = Counter()
    queries: Counter = Counter()
    by_consumer: Counter = Counter()
    for r in records:
        n = r.get("rows_suppressed") or 0
        if n > 0:
            dataset = r.get("dataset") or "?"
            rows[dataset] += n
            queries[dataset] += 1
            by_consumer[(r.get("consumer") or "?", dataset)] += n
    bars = [Bar(ds, (("rows suppressed", n, PALETTE[0]),)) for ds, n in rows.most_common()]
    table = _table(
        ("consumer", "dataset", "rows suppressed"), [(c, d, n) for (c, d), n in sorted(by_consumer.items())]
    )
    summary = _table(
        ("dataset", "rows suppressed", "queries with suppression"),
        [(ds, n, queries[ds]) for ds, n in rows.most_common()],
    )
    return (
        '<section id="suppressions"><h2>Suppressions</h2><p class="note">Output rows removed by the output '
        "controls (minimum group size, dominance), from <code>rows_suppressed</code>.</p>"
        + _bar_chart("suppressions", "Rows suppressed per dataset", bars)
        + summary
        + table
        + "</section>"
    )


# --- charts ---------------------------------------------------------------------


def _bar_chart(name: str, label: str, bars: list[Bar]) -> str:
    if not bars:
        return _empty(name, label)
    row_h, gap = 26, 8
    height = TOP + len(bars) * (row_h + gap) + BOTTOM
    plot_w = WIDTH - LEFT - RIGHT
    top_value = _nice_max(max(sum(v for _, v, _ in b.parts) for b in bars))
    parts = [_svg_open(name, label, height)]
    for tick in _ticks(top_value):
        x = LEFT + plot_w * tick / top_value
        parts.append(
            f'<line class="grid" x1="{x:.1f}" y1="{TOP}" x2="{x:.1f}" y2="{height - BOTTOM}"/>'
            f'<text x="{x:.1f}" y="{height - BOTTOM + 16}" text-anchor="middle">{_num(tick)}</text>'
        )
    for i, bar in enumerate(bars):
        y = TOP + i * (row_h + gap)
        parts.append(
            f'<text x="{LEFT - 8}" y="{y + row_h / 2 + 4:.1f}" text-anchor="end">'
            f"{_e(_clip(bar.label))}</text>"
        )
        x = float(LEFT)
        for part, value, colour in bar.parts:
            w = plot_w * value / top_value
            parts.append(
                f'<rect x="{x:.1f}" y="{y}" width="{w:.1f}" height="{row_h}" fill="{colour}" '
                f'data-label="{_e(bar.label)}" data-part="{_e(part)}" data-value="{value!r}">'
                f"<title>{_e(bar.label)} — {_e(part)}: {_num(value)}</title></rect>"
            )
            x += w
        total = sum(v for _, v, _ in bar.parts)
        parts.append(f'<text x="{x + 6:.1f}" y="{y + row_h / 2 + 4:.1f}">{_num(total)}</text>')
    parts.append(f'<line class="axis" x1="{LEFT}" y1="{TOP}" x2="{LEFT}" y2="{height - BOTTOM}"/></svg>')
    return "".join(parts)


def _line_chart(
    name: str,
    label: str,
    series: list[tuple[str, list[tuple[dt.datetime, float]]]],
    start: dt.datetime | None,
    end: dt.datetime | None,
    caps: dict[str, float] | None = None,
) -> str:
    if not series or start is None or end is None:
        return _empty(name, "no privacy budget was spent")
    height = 320
    plot_w, plot_h = WIDTH - LEFT - RIGHT, height - TOP - BOTTOM
    t0, t1 = start.timestamp(), max(end.timestamp(), start.timestamp() + 1)
    caps = caps or {}
    top_value = _nice_max(max([points[-1][1] for _, points in series] + list(caps.values())))

    def xy(t: float, v: float) -> str:
        return f"{LEFT + plot_w * (t - t0) / (t1 - t0):.1f},{TOP + plot_h * (1 - v / top_value):.1f}"

    parts = [_svg_open(name, label, height)]
    for tick in _ticks(top_value):
        y = TOP + plot_h * (1 - tick / top_value)
        parts.append(
            f'<line class="grid" x1="{LEFT}" y1="{y:.1f}" x2="{WIDTH - RIGHT}" y2="{y:.1f}"/>'
            f'<text x="{LEFT - 8}" y="{y + 4:.1f}" text-anchor="end">{_num(tick)}</text>'
        )
    for i in range(5):
        t = t0 + (t1 - t0) * i / 4
        x = LEFT + plot_w * i / 4
        when = dt.datetime.fromtimestamp(t, dt.UTC)
        text = when.strftime("%H:%M:%S") if t1 - t0 < 86400 else when.strftime("%Y-%m-%d %H:%M")
        parts.append(f'<text x="{x:.1f}" y="{height - BOTTOM + 16}" text-anchor="middle">{text}</text>')
    legend = []
    for i, (title, points) in enumerate(series):
        colour = PALETTE[i % len(PALETTE)]
        # A step line: the spend stays flat until the next release.
        coords, level = [xy(t0, 0.0)], 0.0
        for when, value in points:
            coords += [xy(when.timestamp(), level), xy(when.timestamp(), value)]
            level = value
        coords.append(xy(t1, level))
        parts.append(
            f'<polyline fill="none" stroke="{colour}" stroke-width="2" points="{" ".join(coords)}" '
            f'data-series="{_e(title)}" data-releases="{len(points)}" data-total="{level!r}">'
            f"<title>{_e(title)}: ε {_num(level)}</title></polyline>"
        )
        if title in caps:  # the grant's cap, dashed, in the series' colour
            y = TOP + plot_h * (1 - caps[title] / top_value)
            parts.append(
                f'<line class="cap" x1="{LEFT}" y1="{y:.1f}" x2="{WIDTH - RIGHT}" y2="{y:.1f}" '
                f'stroke="{colour}" stroke-width="1.5" stroke-dasharray="6 4" data-series="{_e(title)}" '
                f'data-cap="{caps[title]!r}"><title>{_e(title)}: cap ε {_num(caps[title])}</title></line>'
            )
        legend.append(
            (f"{title} (ε {_num(level)}" + (f" of {_num(caps[title])})" if title in caps else ")"), colour)
        )
    parts.append(
        f'<line class="axis" x1="{LEFT}" y1="{TOP + plot_h}" x2="{WIDTH - RIGHT}" y2="{TOP + plot_h}"/>'
        f'<line class="axis" x1="{LEFT}" y1="{TOP}" x2="{LEFT}" y2="{TOP + plot_h}"/></svg>'
    )
    return "".join(parts) + _legend(legend)


def _svg_open(name: str, label: str, height: int) -> str:
    return (
        f'<svg data-chart="{name}" role="img" aria-label="{_e(label)}" width="{WIDTH}" height="{height}" '
        f'viewBox="0 0 {WIDTH} {height}"><title>{_e(label)}</title>'
    )


def _empty(name: str, label: str) -> str:
    return (
        f'<svg data-chart="{name}" data-empty="true" role="img" aria-label="{_e(label)}" width="{WIDTH}" '
        f'height="40" viewBox="0 0 {WIDTH} 40"><text x="{LEFT}" y="24">{_e(label)}: nothing to show</text></svg>'
    )


def _legend(items: Iterable[tuple[str, str]]) -> str:
    lis = "".join(f'<li><span class="swatch" style="background:{c}"></span>{_e(t)}</li>' for t, c in items)
    return f'<ul class="legend">{lis}</ul>' if lis else ""


def _table(header: tuple[str, ...], rows: Iterable[tuple[Any, ...]]) -> str:
    rows = list(rows)
    if not rows:
        return '<p class="note">None.</p>'
    head = "".join(f"<th>{_e(h)}</th>" for h in header)
    body = "".join(
        "<tr>"
        + "".join(
            f'<td class="n">{_e(c)}</td>' if isinstance(c, (int, float)) else f"<td>{_e(c)}</td>" for c in row
        )
        + "</tr>"
        for row in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _nice_max(value: float) -> float:
    """The smallest 1, 2, 2.5, 5 or 10 × 10^k at or above value: round axis ends."""
    if value <= 0:
        return 1.0
    magnitude = 10 ** math.floor(math.log10(value))
    return next(m * magnitude for m in (1, 2, 2.5, 5, 10) if m * magnitude >= value * (1 - 1e-9))


def _ticks(top: float) -> list[float]:
    return [top * i / 4 for i in range(5)]


def _num(value: float) -> str:
    return f"{value:,.0f}" if float(value).is_integer() and abs(value) >= 1 else f"{value:.3g}"


def _time(record: dict[str, Any]) -> dt.datetime | None:
    try:
        return parse_time(record["time"])
    except (KeyError, TypeError, ValueError):
        return None


def _fmt_time(when: dt.datetime | None) -> str:
    return when.astimezone(dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC") if when else "?"


def _clip(text: str, n: int = 26) -> str:
    return text if len(text) <= n else text[: n - 1] + "…"


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)
