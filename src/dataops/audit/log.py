"""The audit log: append-only JSON Lines, an RFC 6962 Merkle tree over them, and
checkpoints signed by a separate signer.

    STATE/audit/audit.jsonl          the active segment, one record per line (RFC 8785 JSON)
    STATE/audit/audit-000001.jsonl   older segments; the tree and the hash chain run on across them
    STATE/audit/checkpoints.jsonl    signed checkpoints, kept at least every second under load,
                                     before each rotation and at close
    STATE/audit/signing.pub          the signer's public key as it reported it (informational:
                                     reviewers verify with the operator's own copy)

The key is *not* here: the signer (`dataops.audit.signer`) holds it in its own
directory and signs only trees that extend the last one it signed.

Group commit. `append` writes the record's line at once (under a lock, so the chain
and the tree stay in order) and then waits until its line is durable and signed.
Whichever waiting thread finds no flush in progress leads the next one: it fsyncs
once for every line written so far, asks the signer for one checkpoint over them, and
wakes the others. So concurrent requests share one fsync and one signature, and each
response goes out after its batch is durable — with an inclusion proof against a
signed checkpoint that covers it (`Receipt`). If the fsync fails, every line of the
batch is cut off again and every request in it fails (fail closed, `AuditUnavailable`).

Each record line is a Merkle leaf: leaf hash = SHA-256(0x00 || line without "\\n").
Each record also keeps `seq`, `prev` (the previous record's `hash`) and `hash`
(SHA-256 of its canonical form without `hash`), so exports of a range can be checked
on their own (`dataops.audit.chain`).

Budget spend is bound to the log: the log sums `epsilon_spent`/`delta_spent` per
grant as it goes, each checkpoint's `ledger` line commits to those totals, and at
start the server refuses a ledger that has spent less than the log says
(`dataops.server.app.reconcile_ledger`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import threading
import time
from dataclasses import replace
from decimal import ROUND_CEILING, Decimal
from pathlib import Path
from typing import Any, Protocol

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from dataops._fs import fsync_dir
from dataops.audit.canonical import canonical
from dataops.audit.chain import GENESIS, line_hash_ok, record_hash
from dataops.audit.merkle import Tree, leaf_hash
from dataops.audit.note import Checkpoint, NoteError, key_id, parse_checkpoint
from dataops.values import Receipt  # re-exported: the one receipt type, shared with the client

log = logging.getLogger(__name__)

__all__ = [
    "ACTIVE",
    "CHECKPOINTS",
    "GENESIS",
    "AuditLog",
    "AuditUnavailable",
    "Receipt",
    "canonical",
    "ledger_digest",
    "record_hash",
    "segment_paths",
]

ACTIVE = "audit.jsonl"
CHECKPOINTS = "checkpoints.jsonl"
PUBLIC_KEY = "signing.pub"
# The ledger's integer units (dataops.ledger): epsilon in 1e-12, delta in 1e-18.
_EPSILON_PLACES, _DELTA_PLACES = 12, 18
# A line can only carry spend if one of these is not a plain 0 (JCS prints 0.0 as 0).
_SPENDS = re.compile(rb'"(?:epsilon|delta)_spent":(?!0[,}])')
_PLACEHOLDER = "\u2400" * 64  # "␀" never appears in a hex hash or an escaped JSON string


class AuditUnavailable(OSError):
    """The record could not be made durable and signed (or the log cannot be trusted);
    the request must fail. An OSError so `dataops serve` reports it as the I/O problem it is."""


class Signer(Protocol):
    origin: str
    public_key: Ed25519PublicKey

    def last_checkpoint(self) -> str | None: ...

    def sign(self, size: int, root: bytes, ledger: str, proof: list[bytes]) -> str: ...


def segment_paths(active: Path) -> list[Path]:
    """Every segment of the log in order: rotated ones by number, then the active one."""
    active = Path(active)
    stem, suffix = active.stem, active.suffix
    rotated = []
    for p in active.parent.glob(f"{stem}-*{suffix}"):
        number = p.name[len(stem) + 1 : -len(suffix)]
        if number.isdigit():
            rotated.append((int(number), p))
    return [p for _, p in sorted(rotated)] + ([active] if active.exists() else [])


def _units(value: Any, places: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
        return 0
    return int(Decimal(repr(float(value))).scaleb(places).to_integral_value(ROUND_CEILING))


def ledger_digest(totals: dict[tuple[str, str], list[int]]) -> str:
    """What a checkpoint's `ledger` line is: SHA-256 over the JCS of the per-grant spend.

    {"grants": {consumer: {dataset: [epsilon units (1e-12), delta units (1e-18)]}}}, the
    units as decimal strings (they exceed 2**53).
    """
    grants: dict[str, dict[str, list[str]]] = {}
    for (consumer, dataset), (eps, delta) in totals.items():
        grants.setdefault(consumer, {})[dataset] = [str(eps), str(delta)]
    return hashlib.sha256(canonical({"grants": grants})).hexdigest()


def record_spend(record: dict[str, Any]) -> tuple[tuple[str, str], int, int] | None:
    consumer, dataset = record.get("consumer"), record.get("dataset")
    eps, delta = (
        _units(record.get("epsilon_spent"), _EPSILON_PLACES),
        _units(record.get("delta_spent"), _DELTA_PLACES),
    )
    if (eps or delta) and isinstance(consumer, str) and isinstance(dataset, str):
        return (consumer, dataset), eps, delta
    return None


class AuditLog:
    def __init__(
        self,
        path: Path,
        *,
        signer: Signer,
        fsync: bool = True,  # False only for benchmarks and tests: a crash may lose records
        checkpoint_every: int = 1000,  # keep a checkpoint in checkpoints.jsonl every N records …
        checkpoint_seconds: float | None = 1.0,  # … and every this often when records were added
        segment_bytes: int = 64 * 2**20,
    ) -> None:
        self.path = Path(path)
        self.directory = self.path.parent
        self.directory.mkdir(parents=True, exist_ok=True)
        self.checkpoints_path = self.directory / CHECKPOINTS
        self.signer = signer
        self.origin = signer.origin
        self.public_key = signer.public_key
        self.key_id = key_id(self.public_key)
        self.fsync = fsync
        self.checkpoint_every = checkpoint_every
        self.checkpoint_seconds = checkpoint_seconds
        self.segment_bytes = segment_bytes
        self._cond = threading.Condition(threading.Lock())
        self._broken: str | None = None
        self.tree = Tree()
        self._totals: dict[tuple[str, str], list[int]] = {}
        self._pending_spend: list[
            tuple[int, tuple[str, str], int, int]
        ] = []  # (seq, grant, …) not yet signed
        self._digest_cache: str | None = None
        self._checkpoint: Checkpoint | None = None  # the newest signed
        self._kept: Checkpoint | None = None  # the newest in checkpoints.jsonl
        self._kept_at = time.monotonic()
        self._recover()
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
        self._segment_size = os.fstat(self._fd).st_size
        self._durable_size = self._segment_size  # bytes of the active segment that are fsynced
        self._durable = self._seq  # records fsynced
        self._signed = self._checkpoint.size if self._checkpoint else 0
        self._flushing = False
        self._waiters: list[tuple[int, threading.Event]] = []  # (seq, event) of appends waiting for a flush
        self._epoch = 0
        self._failure = ""
        fsync_dir(self.directory)
        (self.directory / PUBLIC_KEY).write_bytes(_pem(self.public_key))
        if self._seq > self._signed:
            self._flush_now()  # records a crash left unsigned (their lines were fsynced)

    # --- recovery -------------------------------------------------------------

    def _recover(self) -> None:
        """Rebuild the tree from the segments and check it against what was signed.

        The signer's last checkpoint is the anchor: it is newer than anything in
        checkpoints.jsonl, and whoever edits this directory cannot change it. A log
        shorter than it, or with another root at its size, was truncated or
        rewritten while the server was down: refuse to extend it.
        """
        _drop_torn_line(self.path)
        anchor = self._anchor()
        boundary = anchor.size if anchor else 0
        tail: list[bytes] = []
        at_anchor: bytes | None = None
        last: bytes | None = None
        for segment in segment_paths(self.path):
            with segment.open("rb") as f:
                for raw in f:
                    line = raw.rstrip(b"\n")
                    self.tree.append(leaf_hash(line))
                    if _SPENDS.search(line):
                        self._add_spend(json.loads(line))
                    n = len(self.tree)
                    if n == boundary:
                        at_anchor = line
                    elif n > boundary:
                        tail.append(line)
                    last = line
        size = len(self.tree)
        where = f"{self.directory}: "
        advice = "; refusing to extend a log that may have been altered — run `dataops audit verify`"
        if anchor is not None:
            if size < anchor.size:
                raise AuditUnavailable(
                    f"{where}the log ends at seq {size} but the signer signed {anchor.size} "
                    f"records ({anchor}): records were removed{advice}"
                )
            if self.tree.root(anchor.size) != anchor.root:
                raise AuditUnavailable(
                    f"{where}the first {anchor.size} records do not hash to the root the "
                    f"signer signed ({anchor}): they were rewritten{advice}"
                )
        if last is None:
            self._seq, self._prev = 0, GENESIS
        else:
            try:
                record = json.loads(last)
                self._seq, self._prev = int(record["seq"]), str(record["hash"])
            except (ValueError, KeyError, TypeError) as exc:
                raise AuditUnavailable(f"{where}the last record cannot be read ({exc!r}){advice}") from None
            if self._seq != size:
                raise AuditUnavailable(
                    f"{where}the last record is seq {self._seq} but the log has {size} lines{advice}"
                )
        prev = json.loads(at_anchor)["hash"] if at_anchor is not None else GENESIS
        problem = _tail_problem(tail, boundary, prev)
        if problem:
            raise AuditUnavailable(f"{where}{problem}{advice}")
        self._checkpoint = anchor

    def _anchor(self) -> Checkpoint | None:
        signed = self.signer.last_checkpoint()
        anchor = None
        if signed is not None:
            try:
                anchor = parse_checkpoint(signed, self.public_key, origin=self.origin)
            except NoteError as exc:
                raise AuditUnavailable(f"the signer's last checkpoint does not verify ({exc})") from None
        kept = self._read_kept()
        if kept is not None and (anchor is None or kept.size > anchor.size):
            raise AuditUnavailable(
                f"{self.checkpoints_path} holds a checkpoint of size {kept.size} but the signer's last is "
                f"{'none' if anchor is None else anchor.size}: this is not the signer (or the signer state) "
                "that signed this log; give the server its own signer, or start a new audit directory"
            )
        self._kept = kept
        return anchor

    def _read_kept(self) -> Checkpoint | None:
        if not self.checkpoints_path.exists():
            return None
        _drop_torn_line(self.checkpoints_path)
        lines = self.checkpoints_path.read_bytes().splitlines()
        if not lines:
            return None
        try:
            entry = json.loads(lines[-1])
            if isinstance(entry, dict) and "head" in entry and "note" not in entry:
                raise AuditUnavailable(
                    f"{self.checkpoints_path}: hash-chain checkpoints written by an older dataops, before the log "
                    "became a Merkle tree with an outside signer; verify and archive this audit directory with the "
                    "old version, then start a new one"
                )
            return parse_checkpoint(entry["note"], self.public_key, origin=self.origin)
        except (ValueError, KeyError, TypeError) as exc:
            raise AuditUnavailable(
                f"{self.checkpoints_path}: the last checkpoint is not one the signer "
                f"(key id {self.key_id}) signed for {self.origin!r} ({exc}); "
                "run `dataops audit verify`"
            ) from None

    # --- reading --------------------------------------------------------------

    @property
    def head(self) -> Receipt:
        return Receipt(self._seq, self._prev)

    @property
    def last_checkpoint(self) -> Checkpoint | None:
        return self._checkpoint

    def spend_totals(self) -> dict[tuple[str, str], tuple[int, int]]:
        """Per grant (consumer, dataset): (epsilon units 1e-12, delta units 1e-18) the durable log records."""
        with self._cond:
            return {k: (v[0], v[1]) for k, v in self._totals.items()}

    def consistency_proof(self, first: int, second: int) -> list[bytes]:
        with self._cond:
            if second > self._signed:
                raise ValueError(f"tree size {second} is beyond the last signed checkpoint ({self._signed})")
            return self.tree.consistency_proof(first, second)

    def with_consistency(self, receipt: Receipt, held: int) -> Receipt:
        """`receipt` with the consistency proof from the tree size the client holds (`held`,
        0: none) to the receipt's tree, either order, so a witnessing client needs no extra call.

        A client holding a bigger tree than this log has signed gets an empty path (no
        proof exists) and reports the rollback.
        """
        if not held or not receipt.checkpoint:
            return receipt
        try:
            path = tuple(self.consistency_proof(min(held, receipt.tree_size), max(held, receipt.tree_size)))
        except ValueError:
            path = ()
        return replace(receipt, consistency_from=held, consistency_path=path)

    # --- writing --------------------------------------------------------------

    def _add_spend(self, record: dict[str, Any], pending: bool = False) -> None:
        spend = record_spend(record)
        if spend is None:
            return
        key, eps, delta = spend
        total = self._totals.setdefault(key, [0, 0])
        total[0] += eps
        total[1] += delta
        self._digest_cache = None
        if pending:
            self._pending_spend.append((record["seq"], key, eps, delta))

    def _ledger(self) -> str:
        if self._digest_cache is None:
            self._digest_cache = ledger_digest(self._totals)
        return self._digest_cache

    def append(self, record: dict[str, Any]) -> Receipt:
        with self._cond:
            if self._fd < 0 or self._broken:
                raise AuditUnavailable(f"audit log unavailable: {self._broken or 'closed'}")
            body = {**record, "seq": self._seq + 1, "prev": self._prev}
            try:
                line, digest = _encode(body)
            except ValueError as exc:  # NaN, a set, an integer beyond 2**53: a bug in the caller
                raise AuditUnavailable(f"audit record has no canonical JSON form ({exc})") from exc
            try:
                _write_all(self._fd, line + b"\n")
            except OSError as exc:
                self._undo_write(exc)
                raise AuditUnavailable(f"audit record could not be written: {exc}") from exc
            self._seq += 1
            self._prev = digest
            self._segment_size += len(line) + 1
            self.tree.append(leaf_hash(line))
            self._add_spend(body, pending=True)
            mine, epoch = self._seq, self._epoch
            while self._signed < mine and self._epoch == epoch:
                if not self._flushing:
                    self._flush()
                    continue
                # One event per waiter, not notify_all: a flush wakes only its own batch and
                # the next leader, not every waiting thread.
                woken = threading.Event()
                self._waiters.append((mine, woken))
                self._cond.release()
                try:
                    woken.wait()
                finally:
                    self._cond.acquire()
            if self._epoch != epoch and self._signed < mine:
                raise AuditUnavailable(self._failure)
            cp = self._checkpoint
            assert cp is not None  # signed >= mine >= 1: some checkpoint covers this record
            return Receipt(
                mine,
                digest,
                mine - 1,
                cp.size,
                tuple(self.tree.inclusion_proof(mine - 1, cp.size)),
                cp.note,
                line,
            )

    def _undo_write(self, exc: OSError) -> None:
        """A failed or short write must not leave part of a line for the next one to follow."""
        try:
            if os.fstat(self._fd).st_size > self._segment_size:
                os.ftruncate(self._fd, self._segment_size)
        except OSError as again:
            self._broken = f"a failed write could not be undone ({again}); restart the server"
            log.error("audit log %s: %s", self.path, self._broken)

    def _flush(self) -> None:
        """Lead one group commit: fsync everything written, sign it, wake the waiters.

        Called and returns with the lock held; drops it for the fsync and the signer.
        """
        self._flushing = True
        target, size = self._seq, self._segment_size
        first = self._checkpoint.size if self._checkpoint else 0
        root, proof, ledger = (
            self.tree.root(target),
            self.tree.consistency_proof(first, target),
            self._ledger(),
        )
        fd, synced = self._fd, self._durable >= target
        self._cond.release()
        error: Exception | None = None
        checkpoint = None
        try:
            if self.fsync and not synced:
                os.fsync(fd)
            synced = True
            # Not re-verified here (an Ed25519 verify costs more than the signature): every
            # client and reviewer verifies it with the operator's key; we check it is our tree.
            checkpoint = parse_checkpoint(
                self.signer.sign(target, root, ledger, proof), None, origin=self.origin
            )
            if (checkpoint.size, checkpoint.root) != (target, root):
                raise NoteError("the signer signed another tree than the one asked for")
        except Exception as exc:  # whatever went wrong, this batch fails and the next one leads
            # Not only the expected OSError, SignerError and NoteError: were any other
            # exception to pass, _flushing would stay set and every append after it
            # would wait for a leader that never comes (seen: a signer whose state
            # directory was removed under it answered without a checkpoint).
            error = exc
        finally:
            self._cond.acquire()
        self._flushing = False
        if synced:
            self._durable = max(self._durable, target)
            self._durable_size = max(self._durable_size, size)
        if error is None:
            self._signed, self._checkpoint = target, checkpoint
            self._pending_spend = [p for p in self._pending_spend if p[0] > target]
            self._keep_if_due()
        else:
            self._fail(error, synced)
        # Wake this batch (everyone, after a failure) and one more waiter to lead the next.
        done = [w for w in self._waiters if error is not None or w[0] <= self._signed]
        rest = [w for w in self._waiters if not (error is not None or w[0] <= self._signed)]
        if rest:
            done.append(rest.pop(0))
        self._waiters = rest
        for _, woken in done:
            woken.set()
        self._cond.notify_all()  # _flush_now and close wait on the condition itself

    def _fail(self, error: Exception, synced: bool) -> None:
        self._epoch += 1
        if synced:  # durable, but no signature: the next batch signs them with its own
            self._failure = f"the audit signer could not sign the log ({error}); nothing was released"
            log.error("audit log %s: %s", self.path, self._failure)
            return
        self._failure = f"audit records could not be made durable ({error}); nothing was released"
        log.error("audit log %s: %s", self.path, self._failure)
        # Cut off every line since the last durable one; their requests all fail.
        try:
            os.ftruncate(self._fd, self._durable_size)
        except OSError as exc:
            self._broken = f"a failed fsync could not be undone ({exc}); restart the server"
            return
        self.tree.truncate(self._durable)
        for seq, key, eps, delta in self._pending_spend:
            if seq > self._durable:
                self._totals[key][0] -= eps
                self._totals[key][1] -= delta
        self._pending_spend = [p for p in self._pending_spend if p[0] <= self._durable]
        self._digest_cache = None
        self._seq = self._durable
        self._segment_size = self._durable_size
        self._prev = self._record_hash_at(self._durable)

    def _record_hash_at(self, seq: int) -> str:
        if seq == 0:
            return GENESIS
        for segment in reversed(segment_paths(self.path)):
            lines = segment.read_bytes().splitlines()
            for raw in reversed(lines):
                record = json.loads(raw)
                if record["seq"] == seq:
                    return record["hash"]
        raise AuditUnavailable(f"record seq {seq} not found after a failed write")

    def _flush_now(self) -> None:
        with self._cond:
            while self._flushing:
                self._cond.wait()
            if self._signed < self._seq:
                self._flush()
                if self._signed < self._seq:
                    raise AuditUnavailable(self._failure)

    def _keep_if_due(self, *, force: bool = False) -> None:
        """Keep the newest checkpoint in checkpoints.jsonl when due; rotate when due."""
        cp = self._checkpoint
        if cp is None or (self._kept is not None and self._kept.size >= cp.size):
            return
        kept = self._kept.size if self._kept else 0
        rotate = self._segment_size >= self.segment_bytes and self._seq == cp.size
        due = (
            force
            or rotate
            or cp.size - kept >= self.checkpoint_every
            or (
                self.checkpoint_seconds is not None
                and time.monotonic() - self._kept_at >= self.checkpoint_seconds
            )
        )
        if not due:
            return
        first = not self.checkpoints_path.exists()
        try:
            fd = os.open(self.checkpoints_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                _write_all(fd, canonical({"size": cp.size, "note": cp.note}) + b"\n")
                if self.fsync:
                    os.fsync(fd)
            finally:
                os.close(fd)
            if first and self.fsync:
                fsync_dir(self.directory)
        except OSError:
            # The signer holds it too, and every receipt carries it: retried next time.
            log.exception("audit log %s: could not keep checkpoint %s", self.path, cp)
            return
        self._kept, self._kept_at = cp, time.monotonic()
        if rotate:
            self._rotate()

    def checkpoint(self) -> Checkpoint | None:
        """Sign anything unsigned and keep the newest checkpoint now."""
        self._flush_now()
        with self._cond:
            self._keep_if_due(force=True)
            return self._checkpoint

    def _rotate(self) -> None:
        """Rename the active segment to the next number and start a new one."""
        numbers = [
            int(p.name[len(self.path.stem) + 1 : -len(self.path.suffix)])
            for p in segment_paths(self.path)[:-1]
        ]
        target = self.directory / f"{self.path.stem}-{max(numbers, default=0) + 1:06d}{self.path.suffix}"
        os.close(self._fd)
        self._fd = -1
        try:
            os.rename(self.path, target)
            fsync_dir(self.directory)
        except OSError:
            log.exception(
                "audit log %s: could not rotate to %s; continuing in the same file", self.path, target
            )
        try:
            self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
            self._segment_size = self._durable_size = os.fstat(self._fd).st_size
            fsync_dir(self.directory)  # a new file's name is durable only once its directory is synced
        except OSError as exc:
            self._broken = f"cannot open {self.path} after rotation ({exc})"
            log.error("audit log: %s", self._broken)

    def close(self) -> None:
        if self._fd < 0:
            return
        try:
            self.checkpoint()
        except AuditUnavailable:
            log.exception("audit log %s: could not sign at close", self.path)
        with self._cond:
            while self._flushing:
                self._cond.wait()
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1


def _encode(body: dict[str, Any]) -> tuple[bytes, str]:
    """The stored line (JCS of the record with its hash) and the hash (of the JCS without it).

    One canonicalisation, not two: the line with a placeholder hash, minus that member,
    is exactly the JCS of the record without `hash` (members are sorted, so the rest
    keeps its order).
    """
    template = canonical({**body, "hash": _PLACEHOLDER})
    member = f'"hash":"{_PLACEHOLDER}"'.encode()
    if template.count(member) == 1:
        without = (
            template.replace(b"," + member, b"", 1)
            if b"," + member in template
            else template.replace(member + b",", b"", 1)
        )
        digest = hashlib.sha256(without).hexdigest()
        return template.replace(_PLACEHOLDER.encode(), digest.encode(), 1), digest
    digest = record_hash(body)
    return canonical({**body, "hash": digest}), digest


def _write_all(fd: int, data: bytes) -> None:
    written = os.write(fd, data)
    if written != len(data):
        raise OSError(f"short write ({written} of {len(data)} bytes)")


def _pem(public_key: Ed25519PublicKey) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return public_key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _tail_problem(lines: list[bytes], size: int, prev: str) -> str | None:
    """Why the records after the signed size do not continue the chain, or None."""
    expected = size + 1
    for raw in lines:
        try:
            record = json.loads(raw)
            ok = record["seq"] == expected and record["prev"] == prev and line_hash_ok(raw, record)
        except (ValueError, KeyError, TypeError):
            ok = False
        if not ok:
            return f"record seq {expected} (after the {size} signed) does not continue the chain"
        expected, prev = expected + 1, record["hash"]
    return None


def _drop_torn_line(path: Path) -> None:
    if not path.exists():
        return
    with path.open("rb+") as f:
        data = f.read()
        end = data.rfind(b"\n") + 1
        if end < len(data):
            log.warning("%s: dropping a torn last line (%d bytes)", path, len(data) - end)
            f.truncate(end)
            os.fsync(f.fileno())
