"""A real PostgreSQL server for tests: ``initdb`` + ``pg_ctl`` (Debian's ``postgresql``) in a temp dir.

Listens on a Unix socket only (in its own directory: no TCP port to collide with anyone's). As root,
the cluster runs as the ``postgres`` user (PostgreSQL refuses to run as root). Each test takes a fresh
database (``fresh_url``), so tests share one server but no state.
"""

from __future__ import annotations

import itertools
import os
import pwd
import shutil
import subprocess
import tempfile
from pathlib import Path

BIN_DIRS = sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True)


def pg_bin(name: str) -> str:
    for d in BIN_DIRS:
        if (d / name).is_file():
            return str(d / name)
    found = shutil.which(name)
    if found is None:
        raise RuntimeError(f"{name} not found: install Debian's postgresql package (scripts/test does)")
    return found


class PgServer:
    PORT = 5432  # only names the socket file: there is no TCP listener

    def __init__(self) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="beagled-pg-"))
        self.data = self.root / "data"
        self.sock = self.root / "sock"
        self.sock.mkdir()
        self._as: list[str] = []
        if os.geteuid() == 0:
            pw = pwd.getpwnam("postgres")
            os.chown(self.root, pw.pw_uid, pw.pw_gid)
            os.chown(self.sock, pw.pw_uid, pw.pw_gid)
            self.root.chmod(0o755)
            self._as = ["runuser", "-u", "postgres", "--"]
        self._names = itertools.count(1)
        self._run(pg_bin("initdb"), "-D", str(self.data), "--auth=trust", "-U", "postgres", "--no-sync")
        self.start()

    def _run(self, *argv: str) -> None:
        done = subprocess.run([*self._as, *argv], capture_output=True, text=True, check=False, timeout=120)
        if done.returncode != 0:
            raise RuntimeError(f"{argv[0]} failed: {done.stdout[-2000:]} {done.stderr[-2000:]}")

    def start(self) -> None:
        opts = f"-k {self.sock} -p {self.PORT} -c listen_addresses='' -c max_connections=200"
        log = str(self.root / "log")
        self._run(pg_bin("pg_ctl"), "-D", str(self.data), "-o", opts, "-w", "-l", log, "start")

    def stop(self, mode: str = "fast") -> None:
        self._run(pg_bin("pg_ctl"), "-D", str(self.data), "-m", mode, "-w", "stop")

    def restart(self, mode: str = "fast") -> None:
        self.stop(mode)
        self.start()

    def url(self, db: str = "postgres") -> str:
        return f"postgresql+psycopg://postgres@/{db}?host={self.sock}&port={self.PORT}"

    def conninfo(self, db: str = "postgres") -> str:
        return f"host={self.sock} port={self.PORT} user=postgres dbname={db}"

    def sql(self, statement: str, db: str = "postgres") -> list[tuple[object, ...]]:
        import psycopg

        with psycopg.connect(self.conninfo(db), autocommit=True) as c:
            cur = c.execute(statement)  # type: ignore[call-overload]
            return list(cur.fetchall()) if cur.description else []

    def fresh_url(self) -> str:
        name = f"t{next(self._names)}"
        self.sql(f"CREATE DATABASE {name}")
        return self.url(name)

    def close(self) -> None:
        try:
            self.stop("immediate")
        finally:
            shutil.rmtree(self.root, ignore_errors=True)
