"""Read records back for people: across segments, filtered by who, what, when and why.

Reading does not verify; `dataops audit verify` does. Lines that are not records
(a torn last line, a damaged line) are skipped here and reported there.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dataops.audit.log import ACTIVE, segment_paths
from dataops.audit.verify import Place


def iter_lines(directory: Path) -> Iterator[tuple[Place, bytes]]:
    """Every complete line of every segment, in chain order."""
    for path in segment_paths(Path(directory) / ACTIVE):
        with path.open("rb") as f:
            for lineno, raw in enumerate(f, 1):
                if raw.endswith(b"\n"):
                    yield Place(path.name, lineno), raw


def iter_records(directory: Path) -> Iterator[tuple[Place, dict[str, Any]]]:
    for place, raw in iter_lines(directory):
        try:
            record = json.loads(raw)
        except ValueError:
            continue
        if isinstance(record, dict):
            yield Place(place.file, place.line, record.get("seq")), record


def parse_time(text: str) -> dt.datetime:
    """An ISO date or date-time; without a zone it is UTC (the log's zone)."""
    try:
        value = dt.datetime.fromisoformat(text)
    except ValueError:
        raise ValueError(
            f"{text!r} is not an ISO date or date-time (e.g. 2025-03-01 or 2025-03-01T09:30:00Z)"
        ) from None
    return value if value.tzinfo else value.replace(tzinfo=dt.UTC)


@dataclass(frozen=True)
class RecordFilter:
    consumer: str | None = None
    dataset: str | None = None
    since: dt.datetime | None = None  # inclusive
    until: dt.datetime | None = None  # exclusive
    decision: str | None = None
    reason: str | None = None
    method: str | None = None

    def matches(self, record: dict[str, Any]) -> bool:
        for name in ("consumer", "dataset", "decision"):
            wanted = getattr(self, name)
            if wanted is not None and record.get(name) != wanted:
                return False
        # RPC names and reasons are CamelCase / UPPER_CASE: `--method runquery` means RunQuery.
        for name in ("method", "reason"):
            wanted = getattr(self, name)
            if wanted is not None and (record.get(name) or "").lower() != wanted.lower():
                return False
        if self.since or self.until:
            try:
                when = parse_time(record["time"])
            except (KeyError, TypeError, ValueError):
                return False
            if (self.since and when < self.since) or (self.until and when >= self.until):
                return False
        return True
