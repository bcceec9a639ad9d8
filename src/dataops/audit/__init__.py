"""The audit trail: one JSON line per request, an RFC 6962 Merkle tree over them, and
checkpoints signed by a separate signer process.

Writing: `AuditLog` (the server's only interface). Signing: `dataops.audit.signer`.
Reviewing: `verify_log`, `find_receipt`, `export_log`, `verify_export`, `write_report`,
and the `dataops audit` commands in `dataops.audit.commands`.
"""

from dataops.audit.canonical import canonical
from dataops.audit.chain import GENESIS, record_hash
from dataops.audit.log import AuditLog, AuditUnavailable, Receipt
from dataops.audit.signing import export_public_key, load_public_key
from dataops.audit.verify import Verification, find_receipt, verify_log

__all__ = [
    "GENESIS",
    "AuditLog",
    "AuditUnavailable",
    "Receipt",
    "Verification",
    "canonical",
    "export_public_key",
    "find_receipt",
    "load_public_key",
    "record_hash",
    "verify_log",
]
