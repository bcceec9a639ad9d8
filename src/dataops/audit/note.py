"""Signed checkpoints in the C2SP formats (tlog-checkpoint over a signed-note).

A checkpoint is a note whose text is

    <origin>\\n
    <tree size, decimal>\\n
    <root hash, base64>\\n
    time <ISO 8601 UTC>\\n                  (extension lines, ours)
    ledger <hex SHA-256>\\n

followed by a blank line and one signature line,
`\\u2014 <key name> <base64(key hash (4 bytes) || Ed25519 signature)>\\n`, where the
signature is over the text (every byte up to the blank line) and the key hash is the
first 4 bytes of SHA-256(key name || "\\n" || 0x01 || raw public key). This is what
Go's golang.org/x/mod/sumdb/note and the transparency-dev tools read, so a checkpoint
can be checked with stock tools; the key name is the log's origin.

`ledger` commits to the budget ledger's totals as the log knows them (see
`dataops.audit.log`), so a ledger reset behind the log is visible to anyone holding
a checkpoint.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
from dataclasses import dataclass

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

__all__ = [
    "Checkpoint",
    "NoteError",
    "key_hash",
    "key_id",
    "parse_checkpoint",
    "sign_checkpoint",
    "verifier_key",
]

_DASH = "\u2014 "
_ED25519 = b"\x01"


class NoteError(ValueError):
    """Not a checkpoint note, or its signature does not verify."""


def _raw(public_key: Ed25519PublicKey) -> bytes:
    return public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def key_hash(name: str, public_key: Ed25519PublicKey) -> bytes:
    return hashlib.sha256(name.encode() + b"\n" + _ED25519 + _raw(public_key)).digest()[:4]


def key_id(public_key: Ed25519PublicKey) -> str:
    """A short name for a public key (for people): 16 hex digits of SHA-256 over its raw form."""
    return hashlib.sha256(_raw(public_key)).hexdigest()[:16]


def verifier_key(name: str, public_key: Ed25519PublicKey) -> str:
    """The note verifier key string (`name+hash+key`) Go's note package takes."""
    return (
        f"{name}+{key_hash(name, public_key).hex()}+{base64.b64encode(_ED25519 + _raw(public_key)).decode()}"
    )


@dataclass(frozen=True)
class Checkpoint:
    origin: str
    size: int
    root: bytes
    time: str
    ledger: str  # hex SHA-256 of the ledger totals the log implies ("" if none)
    note: str  # the whole signed note, exactly as signed

    @property
    def text(self) -> str:
        return self.note.split("\n\n", 1)[0] + "\n"

    def __str__(self) -> str:
        return f"checkpoint size {self.size} root {self.root.hex()[:16]}… ({self.time})"


def checkpoint_text(origin: str, size: int, root: bytes, time: str, ledger: str) -> str:
    for value in (origin, time, ledger):
        if "\n" in value or not value.isprintable():
            raise NoteError(f"{value!r} cannot go in a checkpoint line")
    return f"{origin}\n{size}\n{base64.b64encode(root).decode()}\ntime {time}\nledger {ledger}\n"


def sign_checkpoint(
    key: Ed25519PrivateKey, origin: str, size: int, root: bytes, time: str, ledger: str
) -> Checkpoint:
    text = checkpoint_text(origin, size, root, time, ledger)
    signature = key_hash(origin, key.public_key()) + key.sign(text.encode())
    note = f"{text}\n{_DASH}{origin} {base64.b64encode(signature).decode()}\n"
    return Checkpoint(origin, size, root, time, ledger, note)


def parse_checkpoint(
    note: str, public_key: Ed25519PublicKey | None, *, origin: str | None = None
) -> Checkpoint:
    """Parse a checkpoint note and verify its signature with `public_key`.

    `public_key` None parses without verifying (only to show what a file holds).
    Raises NoteError saying what is wrong.
    """
    if not isinstance(note, str) or "\n\n" not in note or not note.endswith("\n"):
        raise NoteError("not a signed note (text, a blank line, signature lines)")
    text, signatures = note.split("\n\n", 1)
    lines = text.split("\n")
    if len(lines) < 3:
        raise NoteError("a checkpoint needs origin, size and root lines")
    name, size_line, root_line, *extensions = lines
    if origin is not None and name != origin:
        raise NoteError(f"checkpoint of log {name!r}, not of {origin!r}")
    if not size_line.isascii() or not size_line.isdigit() or (size_line != "0" and size_line.startswith("0")):
        raise NoteError(f"tree size {size_line!r} is not a decimal number")
    try:
        root = base64.b64decode(root_line, validate=True)
    except binascii.Error:
        root = b""
    if len(root) != 32:
        raise NoteError("the root hash is not 32 bytes of base64")
    fields = dict(line.split(" ", 1) for line in extensions if " " in line)
    if public_key is not None:
        wanted = key_hash(name, public_key)
        verified = False
        for line in signatures.rstrip("\n").split("\n"):
            if not line.startswith(_DASH):
                raise NoteError(f"bad signature line {line[:40]!r}")
            signer, _, blob = line[len(_DASH) :].rpartition(" ")
            try:
                raw = base64.b64decode(blob, validate=True)
            except binascii.Error:
                raise NoteError("a signature is not base64") from None
            if signer != name or raw[:4] != wanted:
                continue  # another key's signature (a witness's, say)
            try:
                public_key.verify(raw[4:], (text + "\n").encode())
            except InvalidSignature:
                raise NoteError(
                    f"the signature of {signer!r} does not verify: the checkpoint was edited or forged"
                ) from None
            verified = True
        if not verified:
            raise NoteError(
                f"no signature by the public key given (key id {key_id(public_key)}): wrong key, "
                "or the checkpoint was forged with another"
            )
    return Checkpoint(name, int(size_line), root, fields.get("time", ""), fields.get("ledger", ""), note)
