"""Receipts on the wire, and the ledger's reconciliation against the log.

`fill_receipt` puts a `Receipt` into a `dataops.v1.Receipt`: where the record is,
the record itself, its inclusion proof, the signed checkpoint, and — when the client
said which checkpoint it holds (request metadata `dataops-witness-size`, added by
`AuditLog.with_consistency`) — the consistency proof from that one, so a witnessing
client needs no extra call.

`reconcile_ledger` runs at start: a ledger that has spent less on any grant than the
(verified) audit log records was reset or restored behind the log, and serving it
would make spent budget spendable again.
"""

from __future__ import annotations

import base64
from typing import Any

from dataops.audit.log import AuditLog
from dataops.audit.witness import WITNESS_HEADER
from dataops.values import Receipt

__all__ = [
    "WITNESS_HEADER",
    "LedgerBehindLog",
    "fill_receipt",
    "receipt_metadata",
    "reconcile_ledger",
    "witness_size",
]

# A refusal's proof travels in ErrorInfo metadata, i.e. in gRPC trailers (16 KiB in all):
# a record longer than this goes without its proof (the sequence and hash still go).
_MAX_RECORD_IN_METADATA = 4096


class LedgerBehindLog(OSError):
    """The ledger has spent less than the audit log says: refuse to serve it."""


def witness_size(metadata: Any) -> int:
    """The tree size of the checkpoint the client holds, from its request metadata (0: none)."""
    for key, value in metadata or ():
        if key == WITNESS_HEADER:
            try:
                return max(0, int(value))
            except (TypeError, ValueError):
                return 0
    return 0


def fill_receipt(message: Any, receipt: Receipt) -> None:
    """Copy `receipt` (with its consistency proof, `AuditLog.with_consistency`) into a
    `dataops.v1.Receipt` message."""
    message.sequence = receipt.sequence
    message.hash = receipt.hash
    if not receipt.checkpoint:
        return
    message.leaf_index = receipt.leaf_index
    message.tree_size = receipt.tree_size
    message.inclusion_path[:] = list(receipt.inclusion_path)
    message.checkpoint = receipt.checkpoint
    message.record = receipt.record
    if receipt.consistency_from:
        message.consistency_from = receipt.consistency_from
        message.consistency_path[:] = list(receipt.consistency_path)


def receipt_metadata(receipt: Receipt) -> dict[str, str]:
    """The proof of a refusal's record, as ErrorInfo metadata strings (base64 hashes, comma-separated)."""
    if not receipt.checkpoint or len(receipt.record) > _MAX_RECORD_IN_METADATA:
        return {}
    b64 = lambda hashes: ",".join(base64.b64encode(h).decode() for h in hashes)  # noqa: E731
    metadata = {
        "receipt_tree_size": str(receipt.tree_size),
        "receipt_inclusion_path": b64(receipt.inclusion_path),
        "receipt_checkpoint": receipt.checkpoint,
        "receipt_record": receipt.record.decode("utf-8"),
    }
    if receipt.consistency_from:
        metadata["receipt_consistency_from"] = str(receipt.consistency_from)
        metadata["receipt_consistency_path"] = b64(receipt.consistency_path)
    return metadata


def reconcile_ledger(ledger: Any, audit: AuditLog) -> None:
    """Raise LedgerBehindLog if any grant's ledger spend is below what the log records.

    The ledger may be ahead (a debit whose audit append then failed stays spent: fail
    closed), never behind: every spend the log records was debited first.
    """
    behind = []
    for (consumer, dataset), (eps, delta) in sorted(audit.spend_totals().items()):
        have_eps, have_delta = ledger.spent_units(consumer, dataset)
        if have_eps < eps or have_delta < delta:
            behind.append(
                f"{consumer}/{dataset} (ledger epsilon {have_eps / 1e12:g}, delta {have_delta / 1e18:g}; "
                f"the audit log records epsilon {eps / 1e12:g}, delta {delta / 1e18:g})"
            )
    if behind:
        raise LedgerBehindLog(
            f"{ledger.location}: the budget ledger is behind the audit log for {len(behind)} grant(s): "
            f"{'; '.join(behind[:5])}. It was reset, edited or restored from an older copy while the server "
            "was down; serving it would make spent privacy budget spendable again. Restore the ledger that "
            "goes with this log (the log's checkpoints commit to its totals); refusing to start"
        )
