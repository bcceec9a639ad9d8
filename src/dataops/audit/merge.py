"""One reviewer's view over the audit logs of several server replicas.

Replicas behind one address share a PostgreSQL ledger but each writes its own audit
log: its own hash chain, Merkle tree and signed checkpoints (a log with one writer
needs no coordination and keeps its proofs). `merge_logs` verifies every log on its
own, exactly as `dataops audit verify` would, and only then interleaves their records
by time, each tagged with its replica (the origin its checkpoints name). The merged
view proves nothing by itself: each record's proof stays in its replica's log.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from dataops.audit.log import record_spend
from dataops.audit.reader import iter_records
from dataops.audit.verify import Verification, verify_log


@dataclass
class Merged:
    verifications: list[tuple[str, Verification]]  # (replica, its verification), in the order given
    records: list[tuple[str, dict[str, Any]]] = field(default_factory=list)  # (replica, record), by time
    spend: dict[tuple[str, str], tuple[int, int]] = field(default_factory=dict)  # over all replicas, units

    @property
    def ok(self) -> bool:
        return all(v.ok for _, v in self.verifications)


def replica_name(verification: Verification) -> str:
    """The log's origin (from its first checkpoint), else its directory's name."""
    if verification.checkpoints:
        return str(verification.checkpoints[0]["origin"])
    return verification.directory.name


def merge_logs(directories: Sequence[Path], public_keys: Sequence[Ed25519PublicKey]) -> Merged:
    """Verify each log with its key; if all verify, their records interleaved by time.

    Two logs with the same origin are refused (ValueError): their checkpoints could be
    mistaken for one another by a witness, so every replica needs its own
    ``[audit] origin``.
    """
    if len(directories) != len(public_keys):
        raise ValueError("one public key per log")
    verifications = [verify_log(Path(d), key) for d, key in zip(directories, public_keys)]
    names = [replica_name(v) for v in verifications]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ValueError(
            f"several logs name themselves {', '.join(twice)}: give each replica its own [audit] origin"
        )
    merged = Merged(list(zip(names, verifications)))
    if not merged.ok:
        return merged
    spend: dict[tuple[str, str], list[int]] = {}
    for name, v in merged.verifications:
        for _, record in iter_records(v.directory):
            merged.records.append((name, record))
            found = record_spend(record)
            if found is not None:
                total = spend.setdefault(found[0], [0, 0])
                total[0] += found[1]
                total[1] += found[2]
    # Time first; within one instant, by replica then seq (each log's own order).
    merged.records.sort(key=lambda item: (str(item[1].get("time", "")), item[0], item[1].get("seq", 0)))
    merged.spend = {k: (v[0], v[1]) for k, v in sorted(spend.items())}
    return merged
