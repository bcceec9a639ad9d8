"""Write docs/audit-test-vectors.json: records → canonical bytes → hashes, a small tree.

    python scripts/gen_audit_vectors.py          # rewrite the file
    python scripts/gen_audit_vectors.py --check  # exit 1 if the file is not what the code makes

Every value is produced by dataops.audit itself; tests/test_audit_vectors.py checks
the file against the code (Python) and recomputes it in plain Node.js.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from dataops.audit.canonical import canonical
from dataops.audit.chain import GENESIS
from dataops.audit.log import ledger_digest, record_spend
from dataops.audit.merkle import Tree, leaf_hash
from dataops.audit.note import sign_checkpoint, verifier_key
from dataops.audit.signing import public_key_pem

OUT = Path(__file__).resolve().parent.parent / "docs" / "audit-test-vectors.json"
ORIGIN = "dataops.example/audit"
# A fixed key, so the vectors are stable (Ed25519 signatures are deterministic). Never use it.
TEST_KEY = Ed25519PrivateKey.from_private_bytes(hashlib.sha256(b"dataops audit test-vector key").digest())

BODIES: list[dict[str, Any]] = [
    {
        "time": "2025-03-03T08:00:00.000000+00:00",
        "request_id": "0" * 32,
        "consumer": "city-bank",
        "method": "ListDatasets",
        "dataset": None,
        "decision": "allowed",
        "code": "OK",
        "epsilon_spent": 0.0,
        "delta_spent": 0.0,
        "reused": False,
        "latency_ms": 1.25,
        "rows_returned": None,
    },
    {
        "time": "2025-03-03T08:00:01.000000+00:00",
        "consumer": "city-bank",
        "method": "RunQuery",
        "dataset": "enterprise_credit",
        "mode": "dp",
        "decision": "allowed",
        "epsilon_spent": 0.1,
        "delta_spent": 1e-7,
        "rows_returned": 12,
        "latency_ms": 100.0,
        "query": '{"group_by":["district"]}',
    },
    {
        "time": "2025-03-03T08:00:02.000000+00:00",
        "consumer": "river-bank",
        "method": "RunQuery",
        "decision": "denied",
        "reason": "POLICY_DENIED",
        "rule": "identifier",
        "column": "enterprise_id",
        "epsilon_spent": 0.0,
        "delta_spent": 0.0,
        "latency_ms": 0.000015,
    },
    {
        "time": "2025-03-03T08:00:03.000000+00:00",
        "consumer": "harbor-insurance",
        "method": "RunQuery",
        "dataset": "medical_claims",
        "decision": "allowed",
        "epsilon_spent": 1.5e-5,
        "delta_spent": 0.0,
        "latency_ms": 1e21,
        "note": 'caf\u00e9 \u2028 line\u2029sep \u0001 "quoted" back\\slash \U0001f600 tab\t',
    },
    {
        "time": "2025-03-03T08:00:04.000000+00:00",
        "method": "Custom",
        "kind": "subject.evaluate",
        "\u00e9": 1,
        "\U0001f600": 2,
        "\ufffd": 3,
        "z": [1, 2.5, -0.0, None, True, {"b": [], "a": {}}],
        "big": 9007199254740991,
        "small": -1e-7,
        "e": 1e-6,
        "f": 123456789.125,
    },
    {
        "time": "2025-03-03T08:00:05.000000+00:00",
        "consumer": "city-bank",
        "method": "GetBudget",
        "decision": "allowed",
        "epsilon_spent": 0,
        "delta_spent": 0,
        "latency_ms": 0.5,
    },
    {
        "time": "2025-03-03T08:00:06.000000+00:00",
        "consumer": "city-bank",
        "method": "RunQuery",
        "dataset": "enterprise_credit",
        "decision": "allowed",
        "epsilon_spent": 0.2,
        "delta_spent": 0.0,
        "latency_ms": 3.0,
    },
]


def build() -> dict[str, Any]:
    records, tree, prev, totals = [], Tree(), GENESIS, {}
    for seq, body in enumerate(BODIES, 1):
        without_hash = {**body, "seq": seq, "prev": prev}
        record_hash = hashlib.sha256(canonical(without_hash)).hexdigest()
        record = {**without_hash, "hash": record_hash}
        line = canonical(record)
        tree.append(leaf_hash(line))
        spend = record_spend(record)
        if spend:
            t = totals.setdefault(spend[0], [0, 0])
            t[0] += spend[1]
            t[1] += spend[2]
        records.append(
            {
                "record": record,
                "canonical_without_hash": canonical(without_hash).decode("utf-8"),
                "record_hash": record_hash,
                "canonical": line.decode("utf-8"),
                "leaf_hash": leaf_hash(line).hex(),
            }
        )
        prev = record_hash
    n = len(records)
    checkpoint = sign_checkpoint(
        TEST_KEY, ORIGIN, n, tree.root(), "2025-03-03T08:00:07.000000+00:00", ledger_digest(totals)
    )
    grants: dict[str, dict[str, list[str]]] = {}
    for (consumer, dataset), (eps, delta) in totals.items():
        grants.setdefault(consumer, {})[dataset] = [str(eps), str(delta)]
    return {
        "description": "dataops audit log test vectors: see docs/audit.md. Each record's canonical form is "
        "RFC 8785 JSON (UTF-8); record_hash = SHA-256(canonical record without 'hash'); "
        "leaf_hash = SHA-256(0x00 || canonical record); node = SHA-256(0x01 || left || right) "
        "(RFC 6962). The checkpoint is a C2SP signed note by an Ed25519 test key.",
        "records": records,
        "tree": {
            "roots": {str(size): tree.root(size).hex() for size in range(0, n + 1)},
            "inclusion": [
                {"index": i, "size": size, "path": [h.hex() for h in tree.inclusion_proof(i, size)]}
                for size in range(1, n + 1)
                for i in range(size)
            ],
            "consistency": [
                {"first": m, "second": size, "proof": [h.hex() for h in tree.consistency_proof(m, size)]}
                for size in range(1, n + 1)
                for m in range(1, size + 1)
            ],
        },
        "ledger": {"totals": {"grants": grants}, "digest": ledger_digest(totals)},
        "checkpoint": {
            "note": checkpoint.note,
            "public_key_pem": public_key_pem(TEST_KEY.public_key()).decode("ascii"),
            "verifier_key": verifier_key(ORIGIN, TEST_KEY.public_key()),
            "signed_text": checkpoint.text,
            "signature_b64": checkpoint.note.rsplit(" ", 1)[1].strip(),
        },
    }


def render() -> str:
    return json.dumps(build(), indent=1, ensure_ascii=False) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true")
    args = parser.parse_args(argv)
    text = render()
    if args.check:
        return 0 if OUT.read_text(encoding="utf-8") == text else 1
    OUT.write_text(text, encoding="utf-8")
    print(OUT)
    return 0


if __name__ == "__main__":
    sys.exit(main())
