"""PostgreSQL for tests and benchmarks: a fresh database on a server, a throwaway cluster.

``fresh_database(server_url, prefix)`` creates ``<prefix>_<random>`` on the server of
``server_url`` (for example ``TRACKING_TEST_POSTGRES_URL``) and drops it afterwards.

``throwaway_cluster()`` starts a PostgreSQL cluster of its own (``initdb`` + ``pg_ctl`` from
``/usr/lib/postgresql/*/bin`` or ``PATH``) in a temporary directory, on a free port of
127.0.0.1 with trust authentication, so a test can stop it (``pg_ctl stop -m immediate``: a
crash, as far as clients can tell) and start it again without touching the machine's own
server. PostgreSQL refuses to run as root: as root the cluster runs as the ``postgres`` OS
user (or, when there is none, a system user ``tracking-pg`` created once with ``useradd``).

Example::

    with throwaway_cluster() as cluster:
        url = cluster.create_database("tracking")  # postgresql://postgres@127.0.0.1:<port>/tracking
        cluster.stop()                                  # immediate: connections drop
        cluster.start()
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
import uuid as uuid_lib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import sqlalchemy as sa
from sqlalchemy.engine import make_url

from tracking.db import normalise_url

FALLBACK_OS_USER = "tracking-pg"


def free_port() -> int:
    """A TCP port of 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def fresh_database(server_url: str, prefix: str = "tracking_test") -> Iterator[str]:
    """A new database ``<prefix>_<random>`` on the server of ``server_url``; yields its URL
    (``postgresql+psycopg://``) and drops it (``WITH (FORCE)``) afterwards."""
    server = make_url(normalise_url(server_url))
    if server.get_backend_name() != "postgresql":
        raise ValueError(f"not a PostgreSQL URL: {server_url!r}")
    name = f"{prefix}_{uuid_lib.uuid4().hex[:10]}"
    admin = sa.create_engine(server, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
        try:
            yield server.set(database=name).render_as_string(hide_password=False)
        finally:
            with admin.connect() as conn:
                conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        admin.dispose()


def asyncpg_url(url: str) -> str:
    """The same database as an asyncpg URL (what Prefect's server wants)."""
    return make_url(url).set(drivername="postgresql+asyncpg").render_as_string(
        hide_password=False
    )


# -- a throwaway cluster ---------------------------------------------------------------------


def postgres_bin(name: str) -> str:
    """The path of a PostgreSQL server program (``initdb``, ``pg_ctl``), newest version first."""
    for directory in sorted(glob.glob("/usr/lib/postgresql/*/bin"),
                            key=lambda d: int(Path(d).parent.name) if Path(d).parent.name.isdigit()
                            else 0, reverse=True):
        candidate = Path(directory) / name
        if candidate.exists():
            return str(candidate)
    found = shutil.which(name)
    if found:
        return found
    raise FileNotFoundError(f"{name} not found under /usr/lib/postgresql/*/bin nor on PATH")


def _os_user() -> str | None:
    """The OS user to run the cluster as: None (ourselves) unless we are root."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", FALLBACK_OS_USER):
        try:
            pwd.getpwnam(name)
            return name
        except KeyError:
            continue
    subprocess.run(
        ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin",
         FALLBACK_OS_USER],
        check=True, capture_output=True, timeout=30,
    )
    return FALLBACK_OS_USER


class Cluster:
    """A PostgreSQL cluster in ``directory`` (data in ``directory/data``) on 127.0.0.1:``port``."""

    def __init__(self, directory: Path, port: int, os_user: str | None) -> None:
        self.directory = directory
        self.data = directory / "data"
        self.log = directory / "postgres.log"
        self.port = port
        self.os_user = os_user
        self.url = f"postgresql://postgres@127.0.0.1:{port}/postgres"

    def _run(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        command = list(args)
        if self.os_user is not None:
            command = ["runuser", "-u", self.os_user, "--", *command]
        result = subprocess.run(command, capture_output=True, text=True, timeout=timeout,
                                stdin=subprocess.DEVNULL)
        if result.returncode != 0:
            raise RuntimeError(
                f"{' '.join(command)} failed ({result.returncode}):\n{result.stdout}{result.stderr}"
                f"\n{self._log_tail()}"
            )
        return result

    def _log_tail(self) -> str:
        try:
            return self.log.read_text(errors="replace")[-3000:]
        except OSError:
            return ""

    def init(self) -> None:
        self._run(postgres_bin("initdb"), "-D", str(self.data), "-U", "postgres",
                  "-A", "trust", "-E", "UTF8", "--locale=C", "--no-sync")

    def start(self) -> None:
        """Start the server and wait until it accepts connections."""
        options = (
            f"-p {self.port} -c listen_addresses=127.0.0.1 "
            f"-c unix_socket_directories={self.directory} "
            # A process crash loses nothing with fsync off (the kernel has the pages); only
            # a machine crash would, and this cluster does not outlive the test.
            "-c fsync=off -c max_connections=200 -c shared_buffers=32MB"
        )
        self._run(postgres_bin("pg_ctl"), "-D", str(self.data), "-l", str(self.log),
                  "-o", options, "-w", "-t", "60", "start")

    def stop(self, mode: str = "immediate") -> None:
        """Stop the server; ``immediate`` aborts every connection at once (like a crash)."""
        self._run(postgres_bin("pg_ctl"), "-D", str(self.data), "-m", mode, "-w", "-t", "60",
                  "stop")

    def running(self) -> bool:
        command = [postgres_bin("pg_ctl"), "-D", str(self.data), "status"]
        if self.os_user is not None:
            command = ["runuser", "-u", self.os_user, "--", *command]
        return subprocess.run(command, capture_output=True, timeout=30).returncode == 0

    def create_database(self, name: str) -> str:
        """Create database ``name``; returns its URL (plain ``postgresql://``)."""
        admin = sa.create_engine(normalise_url(self.url), isolation_level="AUTOCOMMIT")
        try:
            with admin.connect() as conn:
                conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
        finally:
            admin.dispose()
        return f"postgresql://postgres@127.0.0.1:{self.port}/{name}"

    def kill(self) -> None:
        """Last resort: SIGKILL the postmaster named in ``postmaster.pid`` (ours only)."""
        try:
            pid = int((self.data / "postmaster.pid").read_text().splitlines()[0])
        except (OSError, ValueError, IndexError):
            return
        try:
            os.kill(pid, 9)
        except ProcessLookupError:
            pass


@contextmanager
def throwaway_cluster(port: int | None = None) -> Iterator[Cluster]:
    """A running PostgreSQL cluster of our own; stopped and deleted afterwards."""
    user = _os_user()
    directory = Path(tempfile.mkdtemp(prefix="tracking-pg-"))
    if user is not None:
        info = pwd.getpwnam(user)
        os.chown(directory, info.pw_uid, info.pw_gid)
    cluster = Cluster(directory, port or free_port(), user)
    try:
        cluster.init()
        cluster.start()
        yield cluster
    finally:
        try:
            if cluster.running():
                cluster.stop("immediate")
        except Exception:
            cluster.kill()
            time.sleep(1)
        shutil.rmtree(directory, ignore_errors=True)
