"""Export a verified range of the log as CSV or Parquet that verifies on its own.

An export is always a contiguous range of whole records, `from_seq`..`to_seq`, and
`to_seq` is always the size of a signed checkpoint: its signed Merkle root covers
every record before it, so with the hashes of the perfect subtrees left of the range
(`left`, at most log2(n) of them) the range can be checked with nothing but the
export, the checkpoint and the public key. A range that ends between
checkpoints is extended to the next one (the caller is told); records after the last
checkpoint cannot be exported yet. Filtering is `dataops audit show`'s job: a filtered
set of records has gaps the chain cannot bridge.

Each row carries the readable columns and, in `record`, the exact stored line; the
verifier recomputes the chain from `record` and checks that every readable column
says what the record says, so editing either is detected.

Next to FILE goes `FILE.checkpoint.json` (the range, the covering checkpoint and the
public key); Parquet files also carry it in their schema metadata.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from dataops.audit.chain import GENESIS, line_hash_ok
from dataops.audit.merkle import CompactRange, ProofError, leaf_hash
from dataops.audit.note import NoteError, parse_checkpoint
from dataops.audit.reader import iter_lines
from dataops.audit.signing import key_id, public_key_pem
from dataops.audit.verify import Place, Problem, verify_log

FORMAT = "dataops-audit-export/2"  # /2: Merkle checkpoints (C2SP notes) and `left`
METADATA_KEY = b"dataops.audit.export"
INTS = ("seq", "rows_returned", "rows_suppressed")
FLOATS = ("epsilon_spent", "delta_spent", "latency_ms")
BOOLS = ("reused",)
TIMES = ("time",)  # a timestamp (UTC, microseconds) in Parquet; the record's ISO text in CSV
COLUMNS = (
    "seq",
    "time",
    "consumer",
    "method",
    "dataset",
    "mode",
    "purpose",
    "decision",
    "code",
    "reason",
    "rule",
    "column",
    "rows_returned",
    "rows_suppressed",
    "epsilon_spent",
    "delta_spent",
    "reused",
    "latency_ms",
    "policy_version",
    "query",
    "prev",
    "hash",
    "record",
)
_BATCH = 50_000


def sidecar_path(out: Path) -> Path:
    return out.with_name(out.name + ".checkpoint.json")


@dataclass(frozen=True)
class ExportResult:
    path: Path
    sidecar: Path
    from_seq: int
    to_seq: int
    requested_to_seq: int | None
    checkpoint: dict[str, Any]


def export_log(
    directory: Path,
    out: Path,
    public_key: Ed25519PublicKey,
    *,
    fmt: str = "csv",
    from_seq: int = 1,
    to_seq: int | None = None,
) -> ExportResult:
    """Verify the log, then write records from_seq..(checkpoint covering to_seq)."""
    if fmt not in ("csv", "parquet"):
        raise ValueError(f"export format {fmt!r}: expected csv or parquet")
    verification = verify_log(directory, public_key)
    if not verification.ok:
        raise ValueError(f"the log does not verify, refusing to export: {verification.problems[0]}")
    target = to_seq if to_seq is not None else verification.signed_size
    checkpoint = verification.covering_checkpoint(max(target, from_seq))
    if checkpoint is None:
        raise ValueError(
            f"no signed checkpoint covers seq {max(target, from_seq)} yet "
            f"(signed up to {verification.signed_size}); try again after the next checkpoint"
        )
    if from_seq < 1 or from_seq > checkpoint["size"]:
        raise ValueError(f"--from-seq {from_seq} is outside 1..{checkpoint['size']}")
    meta = {
        "format": FORMAT,
        "file": out.name,
        "from_seq": from_seq,
        "to_seq": checkpoint["size"],
        "checkpoint": checkpoint,
        "left": [h.hex() for h in _left_of(directory, from_seq)],
        "key_id": key_id(public_key),
        "public_key": public_key_pem(public_key).decode("ascii"),
    }
    rows = _rows(directory, from_seq, checkpoint["size"], typed=fmt == "parquet")
    if fmt == "csv":
        _write_csv(out, rows)
    else:
        _write_parquet(out, rows, meta)
    sidecar = sidecar_path(out)
    sidecar.write_text(json.dumps(meta, indent=2) + "\n")
    return ExportResult(out, sidecar, from_seq, checkpoint["size"], to_seq, checkpoint)


def _left_of(directory: Path, first: int) -> list[bytes]:
    """The perfect subtree hashes of records 1..first-1."""
    tree = CompactRange()
    if first > 1:
        for _, raw in iter_lines(directory):
            tree.append(leaf_hash(raw.rstrip(b"\n")))
            if tree.size == first - 1:
                break
    return tree.hashes()


def _rows(directory: Path, first: int, last: int, *, typed: bool = False) -> Iterator[dict[str, Any]]:
    for _, raw in iter_lines(directory):
        record = json.loads(raw)  # the log verified, so every line is a record
        if record["seq"] > last:
            break
        if record["seq"] >= first:
            yield {**readable(record, typed=typed), "record": raw.rstrip(b"\n").decode("utf-8")}


def readable(record: dict[str, Any], *, typed: bool = False) -> dict[str, Any]:
    """The readable columns of a record; `typed`: as in the Parquet schema (time a datetime)."""
    row = {}
    for name in COLUMNS[:-1]:
        value = record.get(name)
        if value is not None and name in FLOATS:
            value = float(value)
        if value is not None and typed and name in TIMES:
            value = _timestamp(value)
        row[name] = value
    return row


def _timestamp(text: Any) -> Any:
    """The record's ISO time as an aware UTC datetime (unparseable text stays None: it is in `record`)."""
    import datetime as dt

    try:
        value = dt.datetime.fromisoformat(text)
    except (TypeError, ValueError):
        return None
    return (value if value.tzinfo else value.replace(tzinfo=dt.UTC)).astimezone(dt.UTC)


def _cell(value: Any) -> str:
    """A CSV cell: strings as they are, nothing as empty, everything else as JSON."""
    if value is None:
        return ""
    return value if isinstance(value, str) else json.dumps(value)


def _write_csv(out: Path, rows: Iterator[dict[str, Any]]) -> None:
    with out.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(COLUMNS)
        for row in rows:
            writer.writerow([_cell(row[name]) for name in COLUMNS])


def _schema(meta: dict[str, Any]):
    import pyarrow as pa

    def kind(name: str):
        if name in INTS:
            return pa.int64()
        if name in FLOATS:
            return pa.float64()
        if name in TIMES:
            return pa.timestamp("us", tz="UTC")
        return pa.bool_() if name in BOOLS else pa.string()

    return pa.schema(
        [pa.field(name, kind(name)) for name in COLUMNS],
        metadata={METADATA_KEY: json.dumps(meta).encode("utf-8")},
    )


def _write_parquet(out: Path, rows: Iterator[dict[str, Any]], meta: dict[str, Any]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = _schema(meta)
    with pq.ParquetWriter(out, schema) as writer:
        batch: list[dict[str, Any]] = []
        for row in rows:
            batch.append(row)
            if len(batch) == _BATCH:
                writer.write_table(pa.Table.from_pylist(batch, schema=schema))
                batch = []
        if batch:
            writer.write_table(pa.Table.from_pylist(batch, schema=schema))


# --- verifying an export ----------------------------------------------------------


@dataclass
class ExportVerification:
    path: Path
    key_id: str
    rows: int = 0
    checkpoint: dict[str, Any] | None = None
    problems: list[Problem] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def read_export_meta(path: Path) -> dict[str, Any]:
    sidecar = sidecar_path(path)
    if sidecar.exists():
        return json.loads(sidecar.read_text())
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        metadata = pq.read_schema(path).metadata or {}
        if METADATA_KEY in metadata:
            return json.loads(metadata[METADATA_KEY])
    raise FileNotFoundError(f"{path}: no {sidecar.name} next to it (and no embedded checkpoint)")


def _export_rows(path: Path) -> Iterator[tuple[int, str, dict[str, Any]]]:
    """(line or row number, unit, row) with every value as written."""
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        number = 0
        for batch in pq.ParquetFile(path).iter_batches(batch_size=_BATCH):
            for row in batch.to_pylist():
                number += 1
                yield number, "row", row
        return
    with path.open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        if reader.fieldnames is None or tuple(reader.fieldnames) != COLUMNS:
            raise ValueError(f"{path}: not a dataops audit export (unexpected header)")
        for row in reader:
            yield reader.line_num, "line", row


def verify_export(path: Path, public_key: Ed25519PublicKey | None = None) -> ExportVerification:
    """Check an export on its own: its rows chain from `from_seq` to a signed checkpoint's head.

    Without `public_key` the key shipped in the export is used and a note says so: that
    only shows the export is self-consistent, not that it came from the log you trust.
    """
    path = Path(path)
    meta = read_export_meta(path)
    if (
        meta.get("format") != FORMAT
        or not isinstance(meta.get("checkpoint"), dict)
        or not isinstance(meta.get("from_seq"), int)
    ):
        raise ValueError(f"{path}: not a {FORMAT} checkpoint file")
    shipped = public_key is None
    if public_key is None:
        loaded = serialization.load_pem_public_key(meta["public_key"].encode("ascii"))
        if not isinstance(loaded, Ed25519PublicKey):
            raise ValueError(f"{path}: the shipped public key is not Ed25519")
        public_key = loaded
    kid = key_id(public_key)
    result = ExportVerification(path, kid, checkpoint=meta["checkpoint"])
    if shipped:
        result.notes.append(
            f"checked with the public key shipped in the export (key id {kid}): this shows the "
            "export is intact, not that it comes from your log — pass the key you hold"
        )
    checkpoint = meta["checkpoint"]
    where = Place(sidecar_path(path).name, 1, checkpoint=checkpoint.get("checkpoint"))
    if checkpoint.get("key_id") != kid:
        result.problems.append(
            Problem(
                where,
                "key",
                f"checkpoint signed by key id {checkpoint.get('key_id')}, "
                f"not by the public key given (key id {kid})",
            )
        )
        return result
    try:
        signed = parse_checkpoint(checkpoint.get("note", ""), public_key)
    except NoteError as exc:
        result.problems.append(Problem(where, "signature", f"the checkpoint does not verify: {exc}"))
        return result
    first, last = meta["from_seq"], signed.size
    try:
        tree = CompactRange.resume(first - 1, [bytes.fromhex(h) for h in meta.get("left", [])])
    except (ProofError, ValueError, TypeError) as exc:
        result.problems.append(Problem(where, "format", f"the hashes left of the range are unusable ({exc})"))
        return result
    expected, prev = first, GENESIS if first == 1 else None
    end = last_row = Place(path.name, 1)  # end: where a missing next row would be
    for number, unit, row in _export_rows(path):
        place = Place(path.name, number, _int_or_none(row.get("seq")), unit=unit)
        problem = _row_problem(row, place, expected, prev, unit == "row")
        if problem:
            result.problems.append(problem)
            return result
        prev = json.loads(row["record"])["hash"]
        tree.append(leaf_hash(row["record"].encode("utf-8")))
        expected += 1
        end, last_row = Place(path.name, number + 1, unit=unit), place
    result.rows = expected - first
    if expected - 1 != last:
        result.problems.append(
            Problem(
                end,
                "truncated",
                f"the export ends at seq {expected - 1}, but its checkpoint "
                f"#{checkpoint['checkpoint']} is at seq {last}: rows were removed or added",
            )
        )
    elif tree.root() != signed.root:
        result.problems.append(
            Problem(
                last_row,
                "rewritten",
                f"the rows do not hash to the Merkle root signed by checkpoint "
                f"#{checkpoint['checkpoint']}: the export was rewritten",
            )
        )
    return result


def _row_problem(
    row: dict[str, Any], place: Place, expected: int, prev: str | None, typed: bool
) -> Problem | None:
    text = row.get("record") or ""
    try:
        record = json.loads(text)
    except ValueError:
        return Problem(place, "format", "the record column is not valid JSON")
    if not isinstance(record, dict) or not line_hash_ok(text.encode("utf-8"), record):
        return Problem(
            place, "edited", "hash mismatch: the record column does not hash to its `hash` — edited"
        )
    if record.get("seq") != expected:
        return Problem(
            place,
            "missing" if (record.get("seq") or 0) > expected else "inserted",
            f"expected seq {expected}, found {record.get('seq')}: a row was deleted, added or moved",
        )
    if prev is not None and record.get("prev") != prev:
        return Problem(
            place, "chain", "prev is not the hash of the row before: a row was replaced or inserted"
        )
    want = readable(record, typed=typed)
    for name in COLUMNS[:-1]:
        shown, says = row.get(name), want[name]
        if (shown != says) if typed else (shown != _cell(says)):
            return Problem(
                place,
                "edited",
                f"column {name!r} says {shown!r} but the record says {says!r}: "
                "the readable column was edited",
            )
    return None


def _int_or_none(value: Any) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError):
        return None
