"""The log's Ed25519 key and the signed checkpoints over the head of the chain.

A checkpoint says "this log (origin, key id) had `size` records and the last one hashed
to `head`, at `time`", and it chains to the checkpoint before it (`prev`). Because every
record's hash covers the previous record's hash, a signature over the head covers every
record up to it: a reviewer holding a checkpoint can detect any later change to those
records without trusting the host.

Checkpoints are JSON lines in `checkpoints.jsonl`, in the same canonical encoding as
the records, rather than C2SP signed notes: a C2SP checkpoint's root is a Merkle tree
hash with inclusion proofs, and a hash-chain head in that format would mislead tools
that expect one. The signed message is a fixed context string followed by the canonical
JSON of the checkpoint without `signature`, so a signature can never be replayed as a
signature over anything else.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import os
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from dataops._fs import fsync_dir
from dataops.audit.chain import canonical

log = logging.getLogger(__name__)

SIGNING_KEY = "signing.key"
PUBLIC_KEY = "signing.pub"
CHECKPOINTS = "checkpoints.jsonl"
CONTEXT = b"dataops-audit-checkpoint/v1\n"
CHECKPOINT_FIELDS = ("checkpoint", "origin", "key_id", "size", "head", "time", "prev", "signature")


def key_id(public_key: Ed25519PublicKey) -> str:
    """A short name for a public key: the first 8 bytes of SHA-256 over its raw form."""
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def public_key_pem(public_key: Ed25519PublicKey) -> bytes:
    return public_key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


def load_or_create_signing_key(path: Path) -> Ed25519PrivateKey:
    """The log's private key, made on first open (mode 0600) with its public half next to it."""
    if not path.exists():
        key = Ed25519PrivateKey.generate()
        pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, pem)
            os.fsync(fd)
        finally:
            os.close(fd)
        try:
            # link, not rename: if another process made the key meanwhile, keep theirs.
            os.link(tmp, path)
        except FileExistsError:
            pass
        finally:
            tmp.unlink()
        fsync_dir(path.parent)
    elif path.stat().st_mode & 0o077:
        log.warning("audit signing key %s is readable by others; chmod 600 it", path)
    key = load_signing_key(path)
    public = path.with_name(PUBLIC_KEY)
    if not public.exists():
        public.write_bytes(public_key_pem(key.public_key()))
    return key


def load_signing_key(path: Path) -> Ed25519PrivateKey:
    key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    if not isinstance(key, Ed25519PrivateKey):
        raise ValueError(f"{path}: not an Ed25519 private key")
    return key


def load_public_key(path: Path) -> Ed25519PublicKey:
    try:
        key = serialization.load_pem_public_key(Path(path).read_bytes())
    except ValueError:
        raise ValueError(f"{path}: not a PEM public key") from None
    if not isinstance(key, Ed25519PublicKey):
        raise ValueError(f"{path}: not an Ed25519 public key")
    return key


def export_public_key(audit_dir: Path, out: Path) -> str:
    """Write the log's public key (PEM) for reviewers; return its key id.

    Derived from the private key, not copied from `signing.pub`, so the exported key
    is the one that really signs.
    """
    public = load_signing_key(Path(audit_dir) / SIGNING_KEY).public_key()
    Path(out).write_bytes(public_key_pem(public))
    return key_id(public)


def sign_checkpoint(key: Ed25519PrivateKey, body: dict[str, Any]) -> dict[str, Any]:
    signature = key.sign(CONTEXT + canonical(body))
    return {**body, "signature": base64.b64encode(signature).decode("ascii")}


def signature_ok(public_key: Ed25519PublicKey, checkpoint: dict[str, Any]) -> bool:
    body = {k: v for k, v in checkpoint.items() if k != "signature"}
    try:
        public_key.verify(base64.b64decode(checkpoint["signature"], validate=True), CONTEXT + canonical(body))
    except (InvalidSignature, ValueError, TypeError, KeyError):
        return False
    return True


def checkpoint_hash(checkpoint: dict[str, Any]) -> str:
    """What the next checkpoint's `prev` names: SHA-256 over the whole signed checkpoint."""
    return hashlib.sha256(canonical(checkpoint)).hexdigest()

