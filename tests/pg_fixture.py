"""A throwaway, real PostgreSQL server for tests (pytest plugin, see ``tests/conftest.py``).

``postgres_url`` (session scope) runs ``initdb`` + ``pg_ctl start`` from the Debian server
binaries (``/usr/lib/postgresql/*/bin``) in a temporary folder, on a free loopback port, and
stops it with ``pg_ctl stop -m fast`` at the end of the session. As root, the server runs as the
``postgres`` user through ``runuser`` (``initdb`` refuses root). The fixture skips with a reason
when the binaries are absent. ``postgres_database`` gives each test a fresh, empty database.
"""

from __future__ import annotations

import glob
import itertools
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

_counter = itertools.count()


def _pg_bin() -> Path | None:
    candidates = sorted(
        glob.glob("/usr/lib/postgresql/*/bin/initdb"),
        key=lambda p: int(Path(p).parts[-3]) if Path(p).parts[-3].isdigit() else 0,
    )
    return Path(candidates[-1]).parent if candidates else None


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _as_server_user(cmd: list[str]) -> list[str]:
    if os.geteuid() == 0:
        return ["runuser", "-u", "postgres", "--", *cmd]
    return cmd


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """URL of a running throwaway PostgreSQL server (``postgresql+psycopg://...``)."""
    pg_bin = _pg_bin()
    if pg_bin is None:
        pytest.skip("PostgreSQL server binaries (/usr/lib/postgresql/*/bin/initdb) are absent")
    if os.geteuid() == 0:
        try:
            pw = pwd.getpwnam("postgres")
        except KeyError:
            pytest.skip("running as root but there is no 'postgres' user to run the server")
        if shutil.which("runuser") is None:
            pytest.skip("running as root but 'runuser' is missing")
    base = Path(tempfile.mkdtemp(prefix="cxr-triage-pg-"))
    data, sock, log = base / "data", base / "sock", base / "server.log"
    sock.mkdir()
    if os.geteuid() == 0:
        for path in (base, sock):
            os.chown(path, pw.pw_uid, pw.pw_gid)
    port = _free_port()
    started = False
    try:
        subprocess.run(
            _as_server_user(
                [
                    str(pg_bin / "initdb"),
                    "-D",
                    str(data),
                    "-U",
                    "postgres",
                    "-A",
                    "trust",
                    "--no-sync",
                    "-E",
                    "UTF8",
                ]
            ),
            check=True,
            capture_output=True,
            timeout=120,
        )
        options = (
            f"-c listen_addresses=127.0.0.1 -p {port} -k {sock} -c fsync=off -c max_connections=50"
        )
        result = subprocess.run(
            _as_server_user(
                [str(pg_bin / "pg_ctl"), "-D", str(data), "-l", str(log), "-w", "-o", options]
                + ["start"]
            ),
            capture_output=True,
            timeout=120,
        )
        if result.returncode != 0:
            server_log = log.read_text(errors="replace") if log.exists() else ""
            pytest.fail(
                f"pg_ctl start failed: {result.stderr.decode(errors='replace')}\n{server_log}"
            )
        started = True
        yield f"postgresql+psycopg://postgres@127.0.0.1:{port}/postgres"
    finally:
        if started:
            subprocess.run(
                _as_server_user(
                    [str(pg_bin / "pg_ctl"), "-D", str(data), "-m", "fast", "-w", "stop"]
                ),
                capture_output=True,
                timeout=120,
                check=False,
            )
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture()
def postgres_database(postgres_url: str) -> str:
    """URL of a new, empty database on the throwaway server (one per test)."""
    import psycopg

    name = f"t{os.getpid()}_{next(_counter)}"
    conninfo = postgres_url.replace("postgresql+psycopg://", "postgresql://")
    with psycopg.connect(conninfo, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    return postgres_url.rsplit("/", 1)[0] + f"/{name}"
