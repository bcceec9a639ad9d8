"""A client-side witness of the audit log: every consumer checks every receipt.

`Witness.observe(receipt)` checks that

* the checkpoint in the receipt is signed by the operator's key (when the client
  has it — pass it: without it a forged checkpoint is only caught by consistency);
* the record in the receipt is this response's record (its `seq` and `hash`) and the
  inclusion proof leads from its leaf to the checkpoint's root;
* the checkpoint is consistent with the newest one this witness has seen: the same
  root at the same size, or an RFC 6962 consistency proof between the two (carried in
  the receipt, or fetched) — so a log that was rolled back, truncated or rewritten
  since is caught by the first consumer who talks to it.

It keeps the newest checkpoint in memory and, with `path`, in a file (the bare
signed note), which `dataops audit verify --witness FILE` takes.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Callable
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from dataops.audit.merkle import ProofError, leaf_hash, verify_consistency, verify_inclusion
from dataops.audit.note import Checkpoint, NoteError, parse_checkpoint
from dataops.values import Receipt

__all__ = ["WITNESS_HEADER", "Witness", "WitnessError"]

WITNESS_HEADER = "dataops-witness-size"


class WitnessError(Exception):
    """The server's audit log failed a check a client can make on its own
    (`dataops.client` raises it as `AuditVerificationError`, DATA_LOSS)."""


class Witness:
    def __init__(self, public_key: Ed25519PublicKey | None = None, path: str | Path | None = None) -> None:
        self.public_key = public_key
        self.path = Path(path) if path is not None else None
        self._lock = threading.Lock()
        self.checkpoint: Checkpoint | None = None
        # Trees already proven consistent with the one held (size -> root): answers that
        # cross in flight usually share a batch's checkpoint, and need no second proof.
        self._seen: dict[int, bytes] = {}
        if self.path is not None and self.path.exists():
            try:
                self.checkpoint = parse_checkpoint(self.path.read_text(), public_key)
            except (NoteError, UnicodeDecodeError) as exc:
                raise WitnessError(f"{self.path}: not a checkpoint signed by the audit key ({exc})") from None

    @property
    def size(self) -> int:
        return self.checkpoint.size if self.checkpoint else 0

    def metadata(self) -> list[tuple[str, str]]:
        """Request metadata telling the server which tree we hold, so it sends the proof."""
        return [(WITNESS_HEADER, str(self.size))] if self.checkpoint else []

    def observe(
        self, receipt: Receipt, fetch_proof: Callable[[int, int], list[bytes]] | None = None
    ) -> Checkpoint:
        """Check a receipt (as the client read it from a response or a refusal); raise
        WitnessError naming the failure."""
        if not receipt.checkpoint:
            raise WitnessError(
                f"receipt #{receipt.sequence} carries no signed checkpoint: this server "
                "does not prove its audit log"
            )
        try:
            cp = parse_checkpoint(receipt.checkpoint, self.public_key)
        except NoteError as exc:
            raise WitnessError(
                f"receipt #{receipt.sequence}: its checkpoint does not verify ({exc})"
            ) from None
        try:
            record = json.loads(receipt.record)
            same = record.get("seq") == receipt.sequence and record.get("hash") == receipt.hash
        except (ValueError, AttributeError):
            same = False
        if not same or receipt.leaf_index != receipt.sequence - 1 or receipt.tree_size != cp.size:
            raise WitnessError(
                f"receipt #{receipt.sequence}: its record, index or tree size do not match the receipt"
            )
        try:
            verify_inclusion(
                receipt.leaf_index, cp.size, leaf_hash(receipt.record), list(receipt.inclusion_path), cp.root
            )
        except ProofError as exc:
            raise WitnessError(f"receipt #{receipt.sequence} is not in the signed log ({exc})") from None
        with self._lock:
            held = self.checkpoint
            if held is not None and not self._known(cp):
                if not self._check_consistent(held, cp, receipt, fetch_proof):
                    return cp  # no proof to be had now: checked next time, not adopted
            self._seen[cp.size] = cp.root
            if len(self._seen) > 256:
                self._seen.pop(min(self._seen))
            if held is None or cp.size > held.size:
                self._adopt(cp)
        return cp

    def _known(self, cp: Checkpoint) -> bool:
        root = self._seen.get(cp.size)
        if root is None:
            return False
        if root != cp.root:
            raise WitnessError(
                f"two different signed roots for tree size {cp.size}: the audit log was "
                "rewritten (a fork); keep both checkpoints as evidence and tell the operator"
            )
        return True

    def _check_consistent(
        self,
        held: Checkpoint,
        cp: Checkpoint,
        receipt: Receipt,
        fetch_proof: Callable[[int, int], list[bytes]] | None,
    ) -> bool:
        """Raise WitnessError if `cp` contradicts `held`; False if no proof could be fetched."""
        if held.origin != cp.origin:
            raise WitnessError(f"checkpoint of log {cp.origin!r}, but this client witnesses {held.origin!r}")
        older, newer = (held, cp) if held.size <= cp.size else (cp, held)
        if older.size == newer.size or older.size == 0:
            proof: list[bytes] = []
        elif receipt.consistency_from == held.size:
            proof = list(receipt.consistency_path)
        elif fetch_proof is not None:
            try:
                proof = fetch_proof(older.size, newer.size)
            except Exception:  # refused under load, say: the answer stands, the check waits
                return False
        else:
            return False
        try:
            verify_consistency(older.size, newer.size, older.root, newer.root, proof)
        except ProofError as exc:
            where = f" (kept in {self.path})" if self.path else ""
            raise WitnessError(
                f"the audit log is not consistent with the checkpoint this client holds{where}: size "
                f"{held.size}, root {held.root.hex()[:16]}…, received size {cp.size}: {exc}. The log was rolled "
                "back, truncated or rewritten; keep the checkpoint as evidence and tell the operator"
            ) from None
        return True

    def _adopt(self, cp: Checkpoint) -> None:
        self.checkpoint = cp
        if self.path is not None:
            tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
            tmp.write_text(cp.note)
            os.replace(tmp, self.path)
