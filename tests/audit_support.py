"""Helpers for the audit tests: a log with an in-process signer in its own directory."""

from __future__ import annotations

from pathlib import Path

from dataops.audit import AuditLog
from dataops.audit.signer import LocalSigner


def signer_for(directory: Path) -> LocalSigner:
    """The signer of the log in `directory`: a sibling directory, never inside the log's."""
    directory = Path(directory)
    return LocalSigner(directory.with_name(directory.name + "-signer"))


def open_log(directory: Path, **kwargs) -> AuditLog:
    directory = Path(directory)
    kwargs.setdefault("checkpoint_seconds", None)
    return AuditLog(
        directory / "audit.jsonl", signer=kwargs.pop("signer", None) or signer_for(directory), **kwargs
    )
