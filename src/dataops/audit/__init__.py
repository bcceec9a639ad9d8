"""The audit trail: one hash-chained JSON line per request."""

from dataops.audit.log import GENESIS, AuditLog, AuditUnavailable, Receipt, canonical, record_hash

__all__ = ["GENESIS", "AuditLog", "AuditUnavailable", "Receipt", "canonical", "record_hash"]
