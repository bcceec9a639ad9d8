"""The log's public key, as reviewers hold it (PEM, SubjectPublicKeyInfo).

The private key lives only with the signer (`dataops.audit.signer`), in its own
directory; nothing here reads it.
"""

from __future__ import annotations

from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from dataops.audit.note import key_id
from dataops.audit.signer import PUBLIC_KEY as SIGNER_PUBLIC_KEY

__all__ = ["PUBLIC_KEY", "export_public_key", "key_id", "load_public_key", "public_key_pem"]

PUBLIC_KEY = "signing.pub"  # in the audit directory: what the signer reported (informational)


def public_key_pem(public_key: Ed25519PublicKey) -> bytes:
    return public_key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def load_public_key(path: Path) -> Ed25519PublicKey:
    try:
        key = serialization.load_pem_public_key(Path(path).read_bytes())
    except ValueError:
        raise ValueError(f"{path}: not a PEM public key") from None
    if not isinstance(key, Ed25519PublicKey):
        raise ValueError(f"{path}: not an Ed25519 public key")
    return key


def export_public_key(signer_dir: Path, out: Path) -> str:
    """Copy the signer's public key (run as the signer's user) for reviewers; return its key id."""
    public = load_public_key(Path(signer_dir) / SIGNER_PUBLIC_KEY)
    Path(out).write_bytes(public_key_pem(public))
    return key_id(public)
