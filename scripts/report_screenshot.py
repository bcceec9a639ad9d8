"""Render the audit report in a real headless browser and save a screenshot.

    python scripts/report_screenshot.py [--report FILE.html] [--tamper] [--out DIR]

Without --report it builds a sample log (realistic synthetic records, an internal
error, signed checkpoints; with --tamper one record deleted half-way), writes the
report with budget caps and renders it. The browser is Chromium from the system's
packages (Debian: `apt-get install -y chromium`); the script fails, and says so, when
none is found. It also checks that the browser loaded nothing and that the page's
charts are in the rendered DOM.
"""

from __future__ import annotations

import argparse
import datetime as dt
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "chrome")


def find_browser() -> str:
    for name in BROWSERS:
        path = shutil.which(name)
        if path:
            return path
    sys.exit("no Chromium found: install it (Debian: apt-get update && apt-get install -y chromium)")


def sample_report(directory: Path, tamper: bool) -> Path:
    from dataops.audit import AuditLog
    from dataops.audit.reader import iter_records
    from dataops.audit.report import Caps, write_report
    from dataops.audit.sample import sample_records
    from dataops.audit.signing import SIGNING_KEY, load_signing_key
    from dataops.audit.verify import verify_log

    log_dir = directory / "audit"
    log = AuditLog(log_dir / "audit.jsonl", checkpoint_every=100, checkpoint_seconds=None, fsync=False)
    start = dt.datetime(2026, 11, 30, 8, 0, tzinfo=dt.UTC)
    for i, record in enumerate(sample_records(1200, start=start, mean_gap_seconds=40)):
        if i in (300, 700, 701):
            record.update(decision="error", code="INTERNAL", reason="INTERNAL", rule=None)
        log.append(record)
    log.close()
    if tamper:
        path = log_dir / "audit.jsonl"
        lines = path.read_bytes().split(b"\n")
        del lines[800]
        path.write_bytes(b"\n".join(lines))
    key = load_signing_key(log_dir / SIGNING_KEY).public_key()
    caps = Caps(
        {
            ("city-bank", "enterprise_credit"): 60.0,
            ("river-bank", "enterprise_credit"): 40.0,
            ("harbor-insurance", "medical_claims"): 50.0,
        },
        {"enterprise_credit": 100.0, "medical_claims": 60.0},
    )
    out = directory / "report.html"
    write_report(
        out, (r for _, r in iter_records(log_dir)), verify_log(log_dir, key), source=str(log_dir), caps=caps
    )
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--report", type=Path, help="an existing report (default: build a sample one)")
    parser.add_argument("--tamper", action="store_true", help="delete one record of the sample log")
    parser.add_argument("--out", type=Path, default=Path("."), help="where report.png (and the sample) go")
    parser.add_argument("--height", type=int, default=5200)
    args = parser.parse_args()
    browser = find_browser()
    args.out.mkdir(parents=True, exist_ok=True)
    report = args.report or sample_report(Path(tempfile.mkdtemp(dir=args.out)), args.tamper)
    png = args.out / ("report-tampered.png" if args.tamper else "report.png")
    common = [
        browser,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--hide-scrollbars",
        "--no-first-run",
        "--disable-extensions",
        f"--window-size=1000,{args.height}",
    ]
    url = report.resolve().as_uri()
    dom = subprocess.run([*common, "--dump-dom", url], capture_output=True, text=True, timeout=120)
    if dom.returncode != 0:
        sys.exit(f"{browser} failed: {dom.stderr[-2000:]}")
    charts = [
        name
        for name in (
            "budget",
            "volume",
            "queries",
            "denials",
            "denials-by-consumer",
            "suppressions",
            "errors",
        )
        if f'data-chart="{name}"' in dom.stdout
    ]
    shot = subprocess.run(
        [*common, f"--screenshot={png.resolve()}", url], capture_output=True, text=True, timeout=120
    )
    if shot.returncode != 0 or not png.exists():
        sys.exit(f"{browser} made no screenshot: {shot.stderr[-2000:]}")
    print(f"{report}\n{png} ({png.stat().st_size:,} bytes); charts rendered: {', '.join(charts)}")
    return 0 if len(charts) == 7 else 1


if __name__ == "__main__":
    sys.exit(main())
