"""Verify the log with only the public key, and find receipts in it.

`verify_log` checks, in one pass over every segment:

* the checkpoints: each is signed by the given key, numbered 1, 2, … and chained to
  the one before (a deleted or forged checkpoint breaks it); only the valid prefix is
  trusted;
* the records: each hashes to its `hash` (else it was edited), has the next `seq` (else
  one was deleted, inserted or moved) and names the previous record's hash in `prev`;
* the two together: at every checkpoint's size the record's hash is the signed head
  (else the records before were rewritten), and the log is at least as long as the
  largest checkpoint (else it was truncated).

It reports the first bad record by segment file, line and seq, and stops there: what
follows a break in the chain cannot be trusted and would only repeat the same finding.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from dataops.audit.chain import GENESIS, line_hash_ok
from dataops.audit.log import ACTIVE, segment_paths
from dataops.audit.signing import CHECKPOINTS, CHECKPOINT_FIELDS, checkpoint_hash, key_id, signature_ok

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
    kind: str  # edited | missing | inserted | chain | format | rewritten | truncated | signature | key | unsigned
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
    found: dict[int, tuple[str, Place]] = field(default_factory=dict)  # receipts asked for: seq -> hash, place

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def signed_size(self) -> int:
        return max((c["size"] for c in self.checkpoints), default=0)

    def covering_checkpoint(self, seq: int) -> dict[str, Any] | None:
        return next((c for c in self.checkpoints if c["size"] >= seq), None)


def read_checkpoint_lines(path: Path) -> Iterator[tuple[int, bytes]]:
    with Path(path).open("rb") as f:
        yield from enumerate(f, 1)


def _parse_checkpoint(raw: bytes) -> dict[str, Any] | None:
    try:
        cp = json.loads(raw)
    except ValueError:
        return None
    if not isinstance(cp, dict) or set(cp) != set(CHECKPOINT_FIELDS):
        return None
    ints = all(isinstance(cp[k], int) and not isinstance(cp[k], bool) for k in ("checkpoint", "size"))
    strings = all(isinstance(cp[k], str) for k in ("origin", "key_id", "head", "time", "prev", "signature"))
    return cp if ints and strings else None


def check_checkpoints(path: Path, public_key: Ed25519PublicKey, result: Verification, *,
                      held: bool = False) -> list[tuple[str, dict[str, Any]]]:
    """The checkpoints of `path` that verify, as (label, checkpoint); problems go to `result`.

    The log's own file must also chain (number and `prev`); a reviewer's held file may
    be any selection of checkpoints, so only signatures are checked there.
    """
    kid = key_id(public_key)
    trusted: list[tuple[str, dict[str, Any]]] = []
    number, prev, size = 1, GENESIS, 0
    lines = list(read_checkpoint_lines(path))
    for lineno, raw in lines:
        place = Place(path.name, lineno)
        if not raw.endswith(b"\n") and lineno == len(lines) and not held:
            result.notes.append(f"{place}: torn last checkpoint line ({len(raw)} bytes, no newline) from an "
                                "interrupted write; ignored")
            break
        cp = _parse_checkpoint(raw)
        if cp is None:
            result.problems.append(Problem(place, "format", "not a checkpoint line (bad JSON or fields)"))
            break
        place = Place(path.name, lineno, checkpoint=cp["checkpoint"])
        label = f"{'held ' if held else ''}checkpoint #{cp['checkpoint']} ({path.name} line {lineno})"
        problem = None
        if cp["key_id"] != kid:
            problem = Problem(place, "key", f"signed by key id {cp['key_id']}, not by the public key given "
                                            f"(key id {kid}): wrong key, or the checkpoint was forged")
        elif not signature_ok(public_key, cp):
            problem = Problem(place, "signature", f"the signature does not verify with key id {kid}: "
                                                  "the checkpoint was edited or forged")
        elif not held and (cp["checkpoint"] != number or cp["prev"] != prev):
            problem = Problem(place, "chain", f"does not follow checkpoint #{number - 1} (expected number "
                                              f"{number} and its hash as prev): a checkpoint was deleted, "
                                              "inserted or reordered")
        elif not held and cp["size"] <= size:
            problem = Problem(place, "chain", f"size {cp['size']} is not beyond the previous checkpoint's {size}")
        if problem:
            result.problems.append(problem)
            break  # later checkpoints chain to an untrusted one
        trusted.append((label, cp))
        number, prev, size = number + 1, checkpoint_hash(cp), cp["size"]
    return trusted


def verify_log(directory: Path, public_key: Ed25519PublicKey, *, held: Iterable[Path] = (),
               want: Iterable[int] = ()) -> Verification:
    """Verify the audit log in `directory` with only `public_key`.

    `held`: checkpoint files the reviewer kept from earlier (the only defence against a
    host that rewrote both the log and its checkpoints). `want`: seqs whose hash and
    place to collect into `found`, so receipts are checked in the same pass.
    """
    directory = Path(directory)
    result = Verification(directory, key_id(public_key))
    segments = segment_paths(directory / ACTIVE)
    if not segments:
        raise FileNotFoundError(f"{directory}: no audit log ({ACTIVE} or rotated segments)")
    anchors: dict[int, list[tuple[str, dict[str, Any]]]] = {}
    if (directory / CHECKPOINTS).exists():
        own = check_checkpoints(directory / CHECKPOINTS, public_key, result)
        result.checkpoints = [cp for _, cp in own]
    else:
        own = []
    for path in held:
        for label, cp in check_checkpoints(Path(path), public_key, result, held=True):
            anchors.setdefault(cp["size"], []).append((label, cp))
    for label, cp in own:
        anchors.setdefault(cp["size"], []).append((label, cp))
    checkpoint_problem = bool(result.problems)

    want = set(want)
    expected, prev = 1, GENESIS
    last: tuple[str, int] | None = None  # (file, line) of the last good record; a Place per line is slow
    problem: Problem | None = None
    for index, path in enumerate(segments):
        name, final = path.name, index == len(segments) - 1
        with path.open("rb") as f:
            for lineno, raw in enumerate(f, 1):
                if final and not raw.endswith(b"\n"):
                    result.notes.append(
                        f"{name} line {lineno}: torn last line ({len(raw)} bytes, no newline) — a write "
                        "cut short by a crash, never acknowledged; ignored (the server drops it on restart)")
                    break
                try:
                    record = _decode(raw.decode("utf-8"))
                except ValueError:  # UnicodeDecodeError is one too
                    record = None
                problem = _record_problem(raw, record, name, lineno, expected, prev, last, anchors)
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

    if problem is None:
        longest = max(anchors, default=0)
        if longest > result.records:
            label = anchors[longest][0][0]
            end = str(Place(*last, result.records)) if last else f"{segments[-1].name} (empty)"
            result.problems.append(Problem(
                Place(last[0], last[1] + 1) if last else Place(segments[-1].name, 1),
                "truncated",
                f"the log ends at seq {result.records} ({end}) but {label} signed {longest} records: "
                f"records {result.records + 1}..{longest} were removed"))
        elif result.records and not anchors and not checkpoint_problem:
            result.problems.append(Problem(Place(CHECKPOINTS, 1), "unsigned",
                                           "no signed checkpoint: nothing proves these records untampered"))
        elif result.records > result.signed_size and result.checkpoints:
            result.notes.append(
                f"records {result.signed_size + 1}..{result.records} come after the last signed checkpoint: "
                "their chain is intact but no signature covers them yet (the server signs every "
                "checkpoint_every records, every checkpoint_seconds and at shutdown)")
    return result


def _record_problem(raw: bytes, record: Any, file: str, line: int, expected: int, prev: str,
                    last: tuple[str, int] | None, anchors: dict[int, list[tuple[str, dict[str, Any]]]],
                    ) -> Problem | None:
    """Why this line does not continue the chain at `expected` after `prev`, or None."""
    if record is None:
        return Problem(Place(file, line), "format", "not valid JSON: the line was damaged or edited by hand")
    if not isinstance(record, dict) or not _chained(record):
        return Problem(Place(file, line), "format", "not a chained audit record (no valid seq/prev/hash): "
                                                    "written by an older dataops or by hand")
    seq = record["seq"]
    ok = line_hash_ok(raw, record) and seq == expected and record["prev"] == prev
    if ok and all(cp["head"] == record["hash"] for _, cp in anchors.get(seq, ())):
        return None  # the common case, kept cheap: a million records go through here
    place = Place(file, line, seq)
    before = f"seq {expected - 1} at {last[0]} line {last[1]}" if last else "the start of the log"
    if not line_hash_ok(raw, record):
        return Problem(place, "edited", "hash mismatch: the record's content does not hash to its `hash` "
                                        "field — the record was edited")
    if seq > expected:
        missing = f"seq {expected}" if seq == expected + 1 else f"seqs {expected}..{seq - 1}"
        return Problem(place, "missing", f"expected seq {expected} after {before}, found seq {seq}: "
                                         f"{missing} deleted, or the records were reordered")
    if seq < expected:
        return Problem(place, "inserted", f"seq {seq} after {before}: a record was inserted or duplicated, "
                                          "or the records were reordered")
    if record["prev"] != prev:
        return Problem(place, "chain", f"prev is not the hash of {before}: that record was replaced "
                                       "(its hash recomputed) or this one was inserted")
    for label, cp in anchors.get(seq, ()):
        if cp["head"] != record["hash"]:
            return Problem(place, "rewritten", f"hash differs from the head signed by {label}: the records "
                                               "up to here were rewritten after it was signed")
    return None


def _chained(record: dict[str, Any]) -> bool:
    seq, prev, digest = record.get("seq"), record.get("prev"), record.get("hash")
    return (type(seq) is int and seq > 0 and isinstance(prev, str) and isinstance(digest, str)
            and _HASH.fullmatch(prev) is not None and _HASH.fullmatch(digest) is not None)


# --- receipts -------------------------------------------------------------------


@dataclass(frozen=True)
class ReceiptCheck:
    status: str  # verified | unsigned | mismatch | missing | tampered
    message: str
    verification: Verification

    @property
    def ok(self) -> bool:
        return self.status in ("verified", "unsigned")


def find_receipt(directory: Path, sequence: int, digest: str, public_key: Ed25519PublicKey, *,
                 held: Iterable[Path] = ()) -> ReceiptCheck:
    """Is the receipt (sequence, hash) a record of the verified log?

    `digest` may be a prefix of at least 12 hex digits (the CLI prints 12).
    """
    digest = digest.strip().lower()
    if len(digest) < 12 or not set(digest) <= _HEX:
        raise ValueError(f"receipt hash {digest!r}: expected at least 12 hex digits")
    v = verify_log(directory, public_key, held=held, want={sequence})
    got = v.found.get(sequence)
    if not v.ok:
        return ReceiptCheck("tampered", f"the log does not verify ({v.problems[0]}): the receipt cannot be "
                                        "confirmed", v)
    if got is None:
        return ReceiptCheck("missing", f"no record seq {sequence}: the log has {v.records} records", v)
    actual, place = got
    if not actual.startswith(digest):
        return ReceiptCheck("mismatch", f"record seq {sequence} ({place}) has hash {actual}, not {digest}: "
                                        "this receipt is not from this log", v)
    cp = v.covering_checkpoint(sequence)
    if cp is None:
        return ReceiptCheck("unsigned", f"found at {place}; the chain is intact but no signed checkpoint "
                                        "covers it yet", v)
    return ReceiptCheck("verified", f"found at {place}, covered by checkpoint #{cp['checkpoint']} "
                                    f"(size {cp['size']}, signed {cp['time']})", v)
