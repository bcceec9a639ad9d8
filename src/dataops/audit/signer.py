"""The checkpoint signer: a separate process holding the log's Ed25519 key.

The server process must not be able to rewrite history, so it never holds the key.
The signer keeps the key and the last checkpoint it signed in its own directory
(mode 0700, key 0600) and answers on a local Unix socket:

    {"op": "hello"}   -> {"origin", "public_key" (base64 raw), "key_id", "checkpoint" (last note or null)}
    {"op": "sign", "size": N, "root": b64, "ledger": hex, "proof": [b64, …]}
                      -> {"checkpoint": note} or {"error": why}

It signs a tree only if it *extends* the last one it signed: `proof` must be the RFC
6962 consistency proof from that tree to the new one. So even the server process —
or anyone who edits the log while the server is down — cannot get a signature over a
rewritten, truncated or rolled-back log; it can only append.

`dataops serve` starts it as a child process (`python -m dataops.audit.signerd`), which
exits when the server does (its stdin closes). A real deployment runs it as another
OS user, so the server's user cannot read the key at all: see docs/audit.md.

`LocalSigner` is the same signer in-process, for tools, tests and benchmarks.
"""

from __future__ import annotations

import argparse
import base64
import datetime as dt
import io
import json
import logging
import os
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from dataops.audit.merkle import EMPTY_ROOT, ProofError, verify_consistency
from dataops.audit.note import Checkpoint, NoteError, key_id, parse_checkpoint, sign_checkpoint

log = logging.getLogger(__name__)

__all__ = ["LocalSigner", "SignerClient", "SignerError", "SignerProcess", "spawn_signer"]

SIGNING_KEY = "signing.key"
PUBLIC_KEY = "signing.pub"
STATE = "last-checkpoint"
_STATE_SYNC_SECONDS = 0.25
_STATE_COMPACT_BYTES = 1 << 20
_SOCKET_DIR_PREFIX = "dataops-signer-"


def _last_note(path: Path) -> str | None:
    """The last complete line's note of the state file, or None."""
    if not path.exists():
        return None
    for line in reversed(path.read_bytes().split(b"\n")[:-1]):  # the part after the last \n is torn
        try:
            return json.loads(line)["note"]
        except (ValueError, KeyError, TypeError):
            raise SignerError(
                f"{path}: a damaged line; the signer will not sign over an unknown history"
            ) from None
    return None


def _compact(path: Path, note: str) -> None:
    """Rewrite the state file as its one last line (atomically, durably)."""
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, json.dumps({"note": note}).encode() + b"\n")
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


class SignerError(OSError):
    """The signer refused, or cannot be reached: no checkpoint, so the log must not go on."""


def _private_dir(directory: Path) -> None:
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    mode = stat.S_IMODE(directory.stat().st_mode)
    if mode & 0o077:
        os.chmod(directory, 0o700)


def _load_or_create_key(directory: Path) -> Ed25519PrivateKey:
    path = directory / SIGNING_KEY
    if not path.exists():
        key = Ed25519PrivateKey.generate()
        pem = key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        tmp = directory / f".{SIGNING_KEY}.{os.getpid()}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, pem)
            os.fsync(fd)
        finally:
            os.close(fd)
        try:
            os.link(tmp, path)  # link, not rename: a key made meanwhile by another process wins
        except FileExistsError:
            pass
        finally:
            tmp.unlink()
        dfd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    elif stat.S_IMODE(path.stat().st_mode) & 0o077:
        raise SignerError(
            f"{path} is readable by others (mode {stat.S_IMODE(path.stat().st_mode):o}); chmod 600 it"
        )
    loaded = serialization.load_pem_private_key(path.read_bytes(), password=None)
    if not isinstance(loaded, Ed25519PrivateKey):
        raise SignerError(f"{path}: not an Ed25519 private key")
    key = loaded
    public = directory / PUBLIC_KEY
    pem = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    if not public.exists() or public.read_bytes() != pem:
        public.write_bytes(pem)
    return key


class LocalSigner:
    """The signer's logic: one key, one log (origin), and the last checkpoint signed."""

    def __init__(self, directory: Path, origin: str = "dataops-audit") -> None:
        self.directory = Path(directory)
        _private_dir(self.directory)
        self.origin = origin
        self._key = _load_or_create_key(self.directory)
        self.public_key: Ed25519PublicKey = self._key.public_key()
        self.key_id = key_id(self.public_key)
        self._lock = threading.Lock()
        self._state = self.directory / STATE
        self._last: Checkpoint | None = None
        self._dirty = False
        self._synced = time.monotonic()
        note = _last_note(self._state)
        if note is not None:
            try:
                self._last = parse_checkpoint(note, self.public_key, origin=origin)
            except NoteError as exc:
                raise SignerError(
                    f"{self._state}: not a checkpoint this key signed for {origin!r} ({exc}); "
                    "the signer will not sign over an unknown history"
                ) from None
            _compact(self._state, note)
        self._fd = os.open(self._state, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        self._size = os.fstat(self._fd).st_size

    def last_checkpoint(self) -> str | None:
        return self._last.note if self._last else None

    def sign(self, size: int, root: bytes, ledger: str, proof: list[bytes]) -> str:
        """Sign (size, root) if it extends the last tree signed; return the note."""
        with self._lock:
            last = self._last
            try:
                if last is None:
                    if size == 0 and root != EMPTY_ROOT:
                        raise ProofError("the empty tree has another root")
                else:
                    verify_consistency(last.size, size, last.root, root, proof)
            except ProofError as exc:
                raise SignerError(
                    f"refusing to sign size {size}: it does not extend the checkpoint of size "
                    f"{last.size if last else 0} this signer signed last ({exc})"
                ) from None
            now = dt.datetime.now(dt.UTC).isoformat(timespec="microseconds")
            checkpoint = sign_checkpoint(self._key, self.origin, size, root, now, ledger)
            self._save(checkpoint)
            self._last = checkpoint
            return checkpoint.note

    def _save(self, checkpoint: Checkpoint) -> None:
        # Appended (one JSON line per signature; the last complete line is the state),
        # synced at most every 0.25 s and at close: a crash of either process loses
        # nothing (the page cache holds it), a power cut can take the anchor back at
        # most that far, and a torn last line only falls back to the line before.
        line = json.dumps({"note": checkpoint.note}).encode() + b"\n"
        if os.write(self._fd, line) != len(line):
            raise SignerError(f"{self._state}: short write")
        self._size += len(line)
        now = time.monotonic()
        if now - self._synced >= _STATE_SYNC_SECONDS:
            os.fsync(self._fd)
            self._synced, self._dirty = now, False
        else:
            self._dirty = True
        if self._size > _STATE_COMPACT_BYTES:
            os.close(self._fd)
            _compact(self._state, checkpoint.note)
            self._fd = os.open(self._state, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            self._size = os.fstat(self._fd).st_size

    def close(self) -> None:
        with self._lock:
            if self._fd >= 0:
                if self._dirty:
                    os.fsync(self._fd)
                os.close(self._fd)
                self._fd = -1

    def hello(self) -> dict[str, Any]:
        return {
            "origin": self.origin,
            "key_id": self.key_id,
            "checkpoint": self.last_checkpoint(),
            "public_key": base64.b64encode(
                self.public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
            ).decode(),
        }


# --- the process ------------------------------------------------------------------


def _handle(signer: LocalSigner, request: Any) -> dict[str, Any]:
    if not isinstance(request, dict):
        return {"error": "a request is a JSON object"}
    op = request.get("op")
    if op == "hello":
        return signer.hello()
    if op == "sign":
        try:
            size, root, ledger = (
                int(request["size"]),
                base64.b64decode(request["root"]),
                str(request["ledger"]),
            )
            proof = [base64.b64decode(p) for p in request.get("proof", [])]
            return {"checkpoint": signer.sign(size, root, ledger, proof)}
        except SignerError as exc:
            return {"error": str(exc)}
        except OSError as exc:  # the state could not be saved: nothing is signed, and this says why
            return {"error": f"the signer could not save its state ({exc})"}
        except (KeyError, TypeError, ValueError) as exc:
            return {"error": f"malformed sign request ({exc!r})"}
    return {"error": f"unknown op {op!r}"}


def _serve_connection(signer: LocalSigner, conn: socket.socket) -> None:
    with conn, conn.makefile("rwb") as stream:
        for line in stream:
            try:
                request = json.loads(line)
            except ValueError:
                request = None
            stream.write(json.dumps(_handle(signer, request)).encode() + b"\n")
            stream.flush()


def serve(directory: Path, socket_path: Path, origin: str, *, watch_stdin: bool = False) -> None:
    signer = LocalSigner(directory, origin)
    socket_path = Path(socket_path)
    if socket_path.exists():
        socket_path.unlink()
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o117)  # the socket: owner and group (the server's) only
    try:
        listener.bind(str(socket_path))
    finally:
        os.umask(old)
    listener.listen(8)
    stopping = threading.Event()

    def accept() -> None:
        while not stopping.is_set():
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            threading.Thread(target=_serve_connection, args=(signer, conn), daemon=True).start()

    threading.Thread(target=accept, name="signer-accept", daemon=True).start()
    print(f"ready {signer.key_id}", flush=True)
    try:
        if watch_stdin:
            sys.stdin.buffer.read()  # returns when the parent (the server) exits or closes the pipe
        else:
            threading.Event().wait()
    except KeyboardInterrupt:
        pass
    finally:
        stopping.set()
        listener.close()
        signer.close()
        try:
            socket_path.unlink()
            if socket_path.parent.name.startswith(_SOCKET_DIR_PREFIX):
                socket_path.parent.rmdir()  # the private directory spawn_signer made (the server may be gone)
        except OSError:
            pass


# --- the server's side ---------------------------------------------------------------


class SignerClient:
    """The server's connection to a signer process; the same methods as LocalSigner."""

    def __init__(self, socket_path: Path, *, timeout: float = 10.0) -> None:
        self.socket_path = Path(socket_path)
        self.timeout = timeout
        self._lock = threading.Lock()
        self._stream: io.BufferedRWPair | None = None
        hello = self._request({"op": "hello"})
        self.origin: str = self._field(hello, "origin")
        self.key_id: str = self._field(hello, "key_id")
        self.public_key = Ed25519PublicKey.from_public_bytes(
            base64.b64decode(self._field(hello, "public_key"))
        )
        self._hello_checkpoint: str | None = self._field(hello, "checkpoint", optional=True)

    def _connect(self) -> io.BufferedRWPair:
        conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        conn.settimeout(self.timeout)
        try:
            conn.connect(str(self.socket_path))
        except OSError as exc:
            conn.close()
            raise SignerError(f"cannot reach the audit signer at {self.socket_path}: {exc}") from None
        return conn.makefile("rwb")

    def _request(self, message: dict[str, Any]) -> dict[str, Any]:
        with self._lock:
            for attempt in (1, 2):  # one reconnect: the signer may have been restarted
                try:
                    if self._stream is None:
                        self._stream = self._connect()
                    stream = self._stream
                    stream.write(json.dumps(message).encode() + b"\n")
                    stream.flush()
                    line = stream.readline()
                    if not line:
                        raise OSError("the signer closed the connection")
                    answer = json.loads(line)
                    break
                except (OSError, ValueError) as exc:
                    self._close_stream()
                    if attempt == 2:
                        raise SignerError(
                            f"the audit signer at {self.socket_path} did not answer: {exc}"
                        ) from None
        if not isinstance(answer, dict):
            raise SignerError(
                f"the audit signer at {self.socket_path} answered {type(answer).__name__}, not an object"
            )
        if "error" in answer:
            raise SignerError(f"the audit signer refused: {answer['error']}")
        return answer

    def _field(
        self, answer: dict[str, Any], name: str, optional: bool = False
    ) -> Any:  # str, or None if optional
        # An answer without the field (a signer of another version, a broken one) is the
        # signer's failure, raised as one: the log's group commit handles exactly that.
        value = answer.get(name)
        if not isinstance(value, str) and not (optional and value is None):
            raise SignerError(f"the audit signer at {self.socket_path} answered without a {name!r}")
        return value

    def _close_stream(self) -> None:
        if self._stream is not None:
            try:
                self._stream.close()
            except OSError:
                pass
            self._stream = None

    def last_checkpoint(self) -> str | None:
        return self._field(self._request({"op": "hello"}), "checkpoint", optional=True)

    def sign(self, size: int, root: bytes, ledger: str, proof: list[bytes]) -> str:
        answer = self._request(
            {
                "op": "sign",
                "size": size,
                "root": base64.b64encode(root).decode(),
                "ledger": ledger,
                "proof": [base64.b64encode(p).decode() for p in proof],
            }
        )
        return self._field(answer, "checkpoint")

    def close(self) -> None:
        with self._lock:
            self._close_stream()


class SignerProcess:
    """A signer started by the server as its child; `stop()` ends it."""

    def __init__(self, process: subprocess.Popen[bytes], socket_path: Path, socket_dir: Path | None) -> None:
        self.process = process
        self.socket_path = socket_path
        self._socket_dir = socket_dir

    def stop(self, timeout: float = 10.0) -> None:
        if self.process.poll() is None and self.process.stdin is not None:  # spawned with stdin=PIPE
            try:
                self.process.stdin.close()  # the signer exits at EOF, syncing its state first
            except OSError:
                pass
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self._socket_dir is not None:
            try:
                os.rmdir(self._socket_dir)
            except OSError:
                pass


def spawn_signer(directory: Path, origin: str, *, timeout: float = 30.0) -> SignerProcess:
    """Start `python -m dataops.audit.signer` on a socket in a fresh private directory.

    The server passes the key directory on the command line and never opens it.
    """
    socket_dir = Path(tempfile.mkdtemp(prefix=_SOCKET_DIR_PREFIX))  # 0700; short, for AF_UNIX's 108 bytes
    socket_path = socket_dir / "signer.sock"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "dataops.audit.signerd",
            "--dir",
            str(directory),
            "--socket",
            str(socket_path),
            "--origin",
            origin,
            "--watch-stdin",
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        env=env,
        close_fds=True,
        # Its own session: a SIGTERM or Ctrl-C meant for the server's process group must
        # not stop the signer before the server has drained and signed its last batch.
        # It exits when the server closes (or dies and so closes) its stdin.
        start_new_session=True,
    )
    ready: list[bytes] = []
    stdout = process.stdout
    assert stdout is not None  # spawned with stdout=PIPE
    reader = threading.Thread(target=lambda: ready.append(stdout.readline()), daemon=True)
    reader.start()
    reader.join(timeout)
    if not ready or not ready[0].startswith(b"ready"):
        process.kill()
        process.wait()
        raise SignerError(f"the audit signer did not start (key directory {directory}); see its error above")
    return SignerProcess(process, socket_path, socket_dir)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dataops-signer", description=__doc__.splitlines()[0])
    parser.add_argument("--dir", type=Path, required=True, help="the signer's own directory (key and state)")
    parser.add_argument("--socket", type=Path, required=True, help="the Unix socket to listen on")
    parser.add_argument("--origin", default="dataops-audit", help="the log's name in its checkpoints")
    parser.add_argument("--watch-stdin", action="store_true", help="exit when stdin closes (a child process)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    try:
        serve(args.dir, args.socket, args.origin, watch_stdin=args.watch_stdin)
    except (SignerError, OSError) as exc:
        print(f"dataops signer: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
