"""Verify the log with only the operator's public key, and find receipts in it.

`verify_log` checks, in one pass over every segment:

* the checkpoints: each is a C2SP checkpoint note signed by the given key; the log's
  own (checkpoints.jsonl) must grow in size; checkpoints held elsewhere (`--witness`:
  a file a client kept, a copy a reviewer made) count as much as the log's own;
* the records: each hashes to its `hash` (else it was edited), has the next `seq` (else
  one was deleted, inserted or moved) and names the previous record's hash in `prev`;
* the two together: at every checkpoint's size the Merkle root of the records so far
  is the signed root (else the records before were rewritten, whatever key the host
  holds), its ledger line is the hash of the spend recorded so far, and the log is at
  least as long as the largest checkpoint (else it was truncated or rolled back).

It reports the first bad record by segment file, line and seq, and stops there: what
follows a break in the chain cannot be trusted and would only repeat the same finding.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from dataops.audit.chain import GENESIS, line_hash_ok
from dataops.audit.log import _SPENDS, ACTIVE, CHECKPOINTS, ledger_digest, record_spend, segment_paths
from dataops.audit.merkle import CompactRange, leaf_hash
from dataops.audit.note import NoteError, key_id, parse_checkpoint

_HEX = frozenset("0123456789abcdef")
_HASH = re.compile("[0-9a-f]{64}")
_decode = json.JSONDecoder().decode


@dataclass(frozen=True)
class Place:
    file: str
    line: int
    seq: int | None = None
    checkpoint: int | None = None
    unit: str = "line"  # "row" in a Parquet export

    def __str__(self) -> str:
        where = f"{self.file} {self.unit} {self.line}"
        if self.seq is not None:
            where += f", seq {self.seq}"
        if self.checkpoint is not None:
            where += f", checkpoint #{self.checkpoint}"
        return where


@dataclass(frozen=True)
class Problem:
    place: Place
    kind: str  # edited | missing | inserted | chain | format | rewritten | truncated | signature | key | unsigned | ledger
    reason: str

    def __str__(self) -> str:
        return f"{self.place}: {self.reason}"


@dataclass
class Verification:
    directory: Path
    key_id: str
    records: int = 0
    head: tuple[int, str] | None = None
    checkpoints: list[dict[str, Any]] = field(default_factory=list)  # the trusted ones, in order
    problems: list[Problem] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    found: dict[int, tuple[str, Place]] = field(
        default_factory=dict
    )  # receipts asked for: seq -> hash, place
    root: str = ""  # hex Merkle root of the records that verified

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def signed_size(self) -> int:
        return max((c["size"] for c in self.checkpoints), default=0)

    def covering_checkpoint(self, seq: int) -> dict[str, Any] | None:
        return next((c for c in self.checkpoints if c["size"] >= seq), None)


def read_notes(path: Path) -> Iterator[tuple[int, str | None, bool]]:
    """(line, note or None if unreadable, complete) for each checkpoint in a file.

    A file is JSON Lines of {"note": …} (checkpoints.jsonl, or a client's saved
    checkpoints) or one bare note (what `Client(checkpoint_file=…)` writes).
    """
    data = Path(path).read_bytes()
    if not data.lstrip().startswith(b"{"):
        yield 1, data.decode("utf-8", "replace"), True
        return
    lines = data.split(b"\n")
    for lineno, raw in enumerate(lines, 1):
        if lineno == len(lines):
            if raw:
                yield lineno, None, False  # torn: no newline
            return
        try:
            note = json.loads(raw)["note"]
            yield lineno, note if isinstance(note, str) else None, True
        except (ValueError, KeyError, TypeError):
            yield lineno, None, True


def check_checkpoints(
    path: Path,
    public_key: Ed25519PublicKey,
    result: Verification,
    *,
    held: bool = False,
    origin: str | None = None,
) -> list[tuple[str, dict[str, Any]]]:
    """The checkpoints of `path` that verify, as (label, checkpoint); problems go to `result`.

    The log's own checkpoints must grow; a held file may be any selection.
    """
    kid = key_id(public_key)
    trusted: list[tuple[str, dict[str, Any]]] = []
    size = -1
    path = Path(path)
    for lineno, note, complete in read_notes(path):
        place = Place(path.name, lineno)
        if not complete:
            if not held:
                result.notes.append(
                    f"{place}: torn last checkpoint line (no newline) from an interrupted write; ignored"
                )
            break
        if note is None:
            result.problems.append(Problem(place, "format", "not a checkpoint line (bad JSON or no note)"))
            break
        number = len(trusted) + 1
        place = Place(path.name, lineno, checkpoint=number)
        try:
            cp = parse_checkpoint(note, public_key, origin=origin)
        except NoteError as exc:
            kind = (
                "signature"
                if "does not verify" in str(exc)
                else ("key" if "public key" in str(exc) else "format")
            )
            reason = (
                str(exc)
                if kind != "key"
                else (
                    f"not signed by the public key given (key id {kid}): wrong "
                    "key, or the checkpoint was forged"
                )
            )
            result.problems.append(Problem(place, kind, reason))
            break
        if not held and cp.size < size:
            result.problems.append(
                Problem(
                    place,
                    "chain",
                    f"size {cp.size} is below the previous checkpoint's "
                    f"{size}: checkpoints were reordered or rolled back",
                )
            )
            break
        origin = origin or cp.origin
        label = f"{'held ' if held else ''}checkpoint #{number} ({path.name} line {lineno})"
        trusted.append(
            (
                label,
                {
                    "checkpoint": number,
                    "size": cp.size,
                    "root": cp.root.hex(),
                    "time": cp.time,
                    "ledger": cp.ledger,
                    "origin": cp.origin,
                    "key_id": kid,
                    "note": cp.note,
                },
            )
        )
        size = cp.size
    return trusted


def verify_log(
    directory: Path, public_key: Ed25519PublicKey, *, held: Iterable[Path] = (), want: Iterable[int] = ()
) -> Verification:
    """Verify the audit log in `directory` with only `public_key`.

    `held`: checkpoint files kept outside the host (a client's, a reviewer's copy):
    the defence against a host that rewrote or truncated the log *and* its
    checkpoints. `want`: seqs whose hash and place to collect into `found`, so
    receipts are checked in the same pass.
    """
    directory = Path(directory)
    result = Verification(directory, key_id(public_key))
    segments = segment_paths(directory / ACTIVE)
    if not segments:
        raise FileNotFoundError(f"{directory}: no audit log ({ACTIVE} or rotated segments)")
    anchors: dict[int, list[tuple[str, dict[str, Any]]]] = {}
    own: list[tuple[str, dict[str, Any]]] = []
    if (directory / CHECKPOINTS).exists():
        own = check_checkpoints(directory / CHECKPOINTS, public_key, result)
        result.checkpoints = [cp for _, cp in own]
    origin = own[0][1]["origin"] if own else None
    for path in held:
        for label, cp in check_checkpoints(Path(path), public_key, result, held=True, origin=origin):
            anchors.setdefault(cp["size"], []).append((label, cp))
            origin = origin or cp["origin"]
    for label, cp in own:
        anchors.setdefault(cp["size"], []).append((label, cp))
    checkpoint_problem = bool(result.problems)

    want = set(want)
    expected, prev = 1, GENESIS
    tree = CompactRange()
    totals: dict[tuple[str, str], list[int]] = {}
    last: tuple[str, int] | None = None  # (file, line) of the last good record; a Place per line is slow
    problem: Problem | None = None
    for index, path in enumerate(segments):
        name, final = path.name, index == len(segments) - 1
        with path.open("rb") as f:
            for lineno, raw in enumerate(f, 1):
                if final and not raw.endswith(b"\n"):
                    result.notes.append(
                        f"{name} line {lineno}: torn last line ({len(raw)} bytes, no newline) — a write "
                        "cut short by a crash, never acknowledged; ignored (the server drops it on restart)"
                    )
                    break
                try:
                    record = _decode(raw.decode("utf-8"))
                except ValueError:  # UnicodeDecodeError is one too
                    record = None
                problem = _record_problem(raw, record, name, lineno, expected, prev, last)
                if problem is None:
                    line = raw.rstrip(b"\n")
                    tree.append(leaf_hash(line))
                    if _SPENDS.search(line):
                        spend = record_spend(record)
                        if spend:
                            total = totals.setdefault(spend[0], [0, 0])
                            total[0] += spend[1]
                            total[1] += spend[2]
                    if expected in anchors:
                        problem = _anchor_problem(
                            anchors[expected], tree, totals, Place(name, lineno, expected)
                        )
                if problem:
                    break
                if expected in want:
                    result.found[expected] = (record["hash"], Place(name, lineno, expected))
                prev = record["hash"]
                expected += 1
                last = (name, lineno)
        if problem:
            result.problems.append(problem)
            break
    result.records = expected - 1
    result.head = (result.records, prev) if result.records else None
    result.root = tree.root().hex()

    if problem is None:
        longest = max(anchors, default=0)
        if longest > result.records:
            label = anchors[longest][0][0]
            end = str(Place(*last, result.records)) if last else f"{segments[-1].name} (empty)"
            result.problems.append(
                Problem(
                    Place(last[0], last[1] + 1) if last else Place(segments[-1].name, 1),
                    "truncated",
                    f"the log ends at seq {result.records} ({end}) but {label} signed {longest} records: "
                    f"records {result.records + 1}..{longest} were removed (truncated or rolled back)",
                )
            )
        elif result.records and not anchors and not checkpoint_problem:
            result.problems.append(
                Problem(
                    Place(CHECKPOINTS, 1),
                    "unsigned",
                    "no signed checkpoint: nothing proves these records untampered",
                )
            )
        elif result.records > result.signed_size and result.checkpoints:
            result.notes.append(
                f"records {result.signed_size + 1}..{result.records} come after the last checkpoint kept in "
                f"{CHECKPOINTS}: the signer signed them (their receipts carry the checkpoint), but no copy "
                "is kept here yet; the server keeps one at least every second and at shutdown"
            )
    return result


def _anchor_problem(
    anchors: list[tuple[str, dict[str, Any]]],
    tree: CompactRange,
    totals: dict[tuple[str, str], list[int]],
    place: Place,
) -> Problem | None:
    root = tree.root().hex()
    for label, cp in anchors:
        if cp["root"] != root:
            return Problem(
                place,
                "rewritten",
                f"the Merkle root of records 1..{tree.size} differs from the root "
                f"signed by {label}: records up to here were rewritten, removed "
                "or inserted after it was signed",
            )
        if cp["ledger"] and cp["ledger"] != ledger_digest(totals):
            return Problem(
                place, "ledger", f"the spend recorded up to here does not hash to the ledger line of {label}"
            )
    return None


def _record_problem(
    raw: bytes, record: Any, file: str, line: int, expected: int, prev: str, last: tuple[str, int] | None
) -> Problem | None:
    """Why this line does not continue the chain at `expected` after `prev`, or None."""
    if record is None:
        return Problem(Place(file, line), "format", "not valid JSON: the line was damaged or edited by hand")
    if not isinstance(record, dict) or not _chained(record):
        return Problem(
            Place(file, line),
            "format",
            "not a chained audit record (no valid seq/prev/hash): written by an older dataops or by hand",
        )
    seq = record["seq"]
    ok = line_hash_ok(raw, record) and seq == expected and record["prev"] == prev
    if ok:
        return None  # the common case, kept cheap: a million records go through here
    place = Place(file, line, seq)
    before = f"seq {expected - 1} at {last[0]} line {last[1]}" if last else "the start of the log"
    if not line_hash_ok(raw, record):
        return Problem(
            place,
            "edited",
            "hash mismatch: the record's content does not hash to its `hash` field — the record was edited",
        )
    if seq > expected:
        missing = f"seq {expected}" if seq == expected + 1 else f"seqs {expected}..{seq - 1}"
        return Problem(
            place,
            "missing",
            f"expected seq {expected} after {before}, found seq {seq}: "
            f"{missing} deleted, or the records were reordered",
        )
    if seq < expected:
        return Problem(
            place,
            "inserted",
            f"seq {seq} after {before}: a record was inserted or duplicated, or the records were reordered",
        )
    if record["prev"] != prev:
        return Problem(
            place,
            "chain",
            f"prev is not the hash of {before}: that record was replaced "
            "(its hash recomputed) or this one was inserted",
        )
    return None


def _chained(record: dict[str, Any]) -> bool:
    seq, prev, digest = record.get("seq"), record.get("prev"), record.get("hash")
    return (
        type(seq) is int
        and seq > 0
        and isinstance(prev, str)
        and isinstance(digest, str)
        and _HASH.fullmatch(prev) is not None
        and _HASH.fullmatch(digest) is not None
    )


# --- receipts -------------------------------------------------------------------


@dataclass(frozen=True)
class ReceiptCheck:
    status: str  # verified | unsigned | mismatch | missing | tampered
    message: str
    verification: Verification

    @property
    def ok(self) -> bool:
        return self.status in ("verified", "unsigned")


def find_receipt(
    directory: Path, sequence: int, digest: str, public_key: Ed25519PublicKey, *, held: Iterable[Path] = ()
) -> ReceiptCheck:
    """Is the receipt (sequence, hash) a record of the verified log?

    `digest` may be a prefix of at least 12 hex digits (the CLI prints 12).
    """
    digest = digest.strip().lower()
    if len(digest) < 12 or not set(digest) <= _HEX:
        raise ValueError(f"receipt hash {digest!r}: expected at least 12 hex digits")
    v = verify_log(directory, public_key, held=held, want={sequence})
    got = v.found.get(sequence)
    if not v.ok:
        return ReceiptCheck(
            "tampered", f"the log does not verify ({v.problems[0]}): the receipt cannot be confirmed", v
        )
    if got is None:
        return ReceiptCheck("missing", f"no record seq {sequence}: the log has {v.records} records", v)
    actual, place = got
    if not actual.startswith(digest):
        return ReceiptCheck(
            "mismatch",
            f"record seq {sequence} ({place}) has hash {actual}, not {digest}: "
            "this receipt is not from this log",
            v,
        )
    cp = v.covering_checkpoint(sequence)
    if cp is None:
        return ReceiptCheck(
            "unsigned", f"found at {place}; the chain is intact but no signed checkpoint covers it yet", v
        )
    return ReceiptCheck(
        "verified",
        f"found at {place}, covered by checkpoint #{cp['checkpoint']} "
        f"(size {cp['size']}, signed {cp['time']})",
        v,
    )
