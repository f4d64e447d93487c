"""A real, throwaway PostgreSQL server for tests, from the distribution's own package.

``PostgresServer`` finds ``initdb``/``pg_ctl`` (on PATH, else the newest
``/usr/lib/postgresql/*/bin``), initializes a cluster in a fresh temporary folder, starts it on
a free loopback port with its unix socket in that folder, hands out one new database per test,
and stops it (``pg_ctl stop -m immediate``) and removes the folder at the end. PostgreSQL
refuses to run as root, so under root every server command runs as the ``postgres`` system user
that the package creates (``runuser -u postgres --``), in a folder that user owns. Durability
is switched off (``fsync=off``): the data dies with the test anyway.

When the server is not installed this raises ``PostgresUnavailable`` with the command that
installs it; the tests do not skip (CI installs the package, see ``.ci/run``).
"""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path

SERVER_USER = "postgres"  # the system user the Debian/Ubuntu package creates
SUPERUSER = "postgres"  # the database superuser initdb creates


class PostgresUnavailable(RuntimeError):
    """The PostgreSQL server binaries (or a user allowed to run them) are missing."""


def find_bin_dir() -> Path:
    on_path = shutil.which("pg_ctl")
    if on_path and shutil.which("initdb"):
        return Path(on_path).resolve().parent
    candidates = sorted(
        glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"),
        key=lambda path: int(Path(path).parts[-3]) if Path(path).parts[-3].isdigit() else 0,
    )
    if not candidates:
        raise PostgresUnavailable(
            "PostgreSQL server not found (no pg_ctl on PATH or in /usr/lib/postgresql/*/bin); "
            "install it with: apt-get install -y postgresql"
        )
    return Path(candidates[-1]).parent


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class PostgresServer:
    """One running cluster; use as a context manager."""

    def __init__(self) -> None:
        self.bin_dir = find_bin_dir()
        self.as_root = os.geteuid() == 0
        if self.as_root and shutil.which("runuser") is None:
            raise PostgresUnavailable("running as root needs runuser to start PostgreSQL")
        self.root = Path(tempfile.mkdtemp(prefix="yalm-pg-"))
        self.data_dir = self.root / "data"
        self.log_file = self.root / "server.log"
        self.port = 0
        self._databases = 0

    def _run(self, *argv: str) -> subprocess.CompletedProcess:
        command = [str(self.bin_dir / argv[0]), *argv[1:]]
        if self.as_root:
            command = ["runuser", "-u", SERVER_USER, "--", *command]
        result = subprocess.run(command, capture_output=True, text=True, check=False)
        if result.returncode != 0:
            log = self.log_file.read_text() if self.log_file.exists() else ""
            raise PostgresUnavailable(
                f"{argv[0]} failed ({result.returncode}): {result.stderr.strip()}\n{log[-2000:]}"
            )
        return result

    def start(self) -> PostgresServer:
        if self.as_root:
            try:
                shutil.chown(self.root, user=SERVER_USER, group=SERVER_USER)
            except LookupError as exc:
                raise PostgresUnavailable(
                    f"no '{SERVER_USER}' system user to run PostgreSQL as (root is refused); "
                    "the postgresql package creates it"
                ) from exc
        self._run(
            "initdb", "-D", str(self.data_dir), "--username", SUPERUSER, "--auth", "trust",
            "--encoding", "UTF8", "--no-sync", "--no-instructions",
        )  # fmt: skip
        self.port = free_port()
        options = (
            f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c fsync=off "
            "-c synchronous_commit=off -c full_page_writes=off -c max_connections=50"
        )
        self._run(
            "pg_ctl", "start", "-D", str(self.data_dir), "-l", str(self.log_file), "-w",
            "-t", "60", "-o", options,
        )  # fmt: skip
        return self

    def stop(self) -> None:
        if (self.data_dir / "postmaster.pid").exists():
            self._run("pg_ctl", "stop", "-D", str(self.data_dir), "-m", "immediate", "-w")
        shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> PostgresServer:
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def url(self, database: str = "postgres", user: str = SUPERUSER) -> str:
        """A SQLAlchemy URL for the pipeline (``postgresql+psycopg://``) over TCP loopback."""
        return f"postgresql+psycopg://{user}@127.0.0.1:{self.port}/{database}"

    def execute(self, *statements: str, database: str = "postgres") -> None:
        """Run statements as the superuser, each in autocommit (CREATE DATABASE needs that)."""
        import psycopg

        conninfo = f"host=127.0.0.1 port={self.port} user={SUPERUSER} dbname={database}"
        with psycopg.connect(conninfo, autocommit=True) as connection:
            for statement in statements:
                connection.execute(statement)

    def create_database(self, prefix: str = "test") -> str:
        """A new empty database; returns its URL."""
        self._databases += 1
        name = f"{prefix}_{self._databases}"
        self.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)
