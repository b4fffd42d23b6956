"""A throwaway PostgreSQL cluster for tests and benchmarks: `initdb` into a temporary folder, a server on a free
port of 127.0.0.1 (trust auth, fsync off), a `wenmai` database; stopped and removed afterwards, even on failure.

    with throwaway_postgres() as url:       # postgresql+psycopg://postgres@127.0.0.1:PORT/wenmai
        store = ReviewStore.open(url)

In a test, `postgres_or_skip()` skips when PostgreSQL cannot be started here, and fails instead under `CI=true`
(CI is meant to have it). PostgreSQL refuses to run as root, so as root its commands run as the `postgres` user.
"""

from __future__ import annotations

import os
import pwd
import re
import shutil
import signal
import socket
import stat
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

DATABASE = "wenmai"
COMMAND_TIMEOUT = 60  # seconds for any one command; `pg_ctl -w -t 30` waits at most 30 of them
START_ATTEMPTS = 3  # a free port can be taken between finding it and the server binding it
LOG_LINES = 30


class PostgresUnavailable(RuntimeError):
    """PostgreSQL could not be started here; the message says why (and ends with the server log's tail)."""


@contextmanager
def postgres_or_skip(tmp_dir: str | Path | None = None) -> Iterator[str]:
    """`throwaway_postgres` for a pytest fixture: skip the test when it cannot start, fail instead under CI=true."""
    cluster = throwaway_postgres(tmp_dir)
    try:
        url = cluster.__enter__()
    except PostgresUnavailable as err:
        problem = str(err)  # reported below, outside this block: one message, not a chain of two
    else:
        problem = None
    if problem is not None:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"PostgreSQL is required under CI=true and did not start: {problem}", pytrace=False)
        pytest.skip(f"no PostgreSQL here: {problem}")
    try:
        yield url
    finally:
        cluster.__exit__(None, None, None)


@contextmanager
def throwaway_postgres(tmp_dir: str | Path | None = None) -> Iterator[str]:
    """A fresh cluster in a new folder under `tmp_dir` (the system temp folder by default); yields its URL."""
    bin_dir = _bin_dir()
    owner = _owner()
    root = Path(tempfile.mkdtemp(prefix="wenmai-pg-", dir=tmp_dir))
    data, sockets, log = root / "data", root / "sockets", root / "server.log"
    started = False
    try:
        sockets.mkdir(mode=0o700)
        if owner is not None:
            _make_traversable(root.parent)
            for path in (root, sockets):
                os.chown(path, owner.pw_uid, owner.pw_gid)
        _run(
            [bin_dir / "initdb", "-D", data, "-U", "postgres", "--auth=trust", "-E", "UTF8", "--locale=C", "--no-sync"],
            "initdb",
            root,
            owner,
            log,
        )
        for attempt in range(START_ATTEMPTS):
            port = _free_port()
            options = f"-c listen_addresses=127.0.0.1 -p {port} -k {sockets} -c fsync=off"
            try:
                _run(
                    [bin_dir / "pg_ctl", "-D", data, "-l", log, "-w", "-t", "30", "-o", options, "start"],
                    "pg_ctl start",
                    root,
                    owner,
                    log,
                )
                started = True
                break
            except PostgresUnavailable:
                if attempt == START_ATTEMPTS - 1 or "could not bind" not in _tail(log):
                    raise
        _run(
            [bin_dir / "createdb", "-h", "127.0.0.1", "-p", str(port), "-U", "postgres", DATABASE],
            "createdb",
            root,
            owner,
            log,
        )
        yield f"postgresql+psycopg://postgres@127.0.0.1:{port}/{DATABASE}"
    finally:
        if started:
            _stop(bin_dir, data, root, owner)
        shutil.rmtree(root, ignore_errors=True)


def _bin_dir() -> Path:
    """The folder of `initdb` (and `pg_ctl`, `createdb`): on PATH, else the newest /usr/lib/postgresql/N/bin."""
    found = shutil.which("initdb")
    if found:
        return Path(found).resolve().parent
    versions = sorted(
        Path("/usr/lib/postgresql").glob("*/bin/initdb"),
        key=lambda p: [int(n) for n in re.findall(r"\d+", p.parent.parent.name)],
    )
    if not versions:
        raise PostgresUnavailable("no initdb on PATH or in /usr/lib/postgresql/*/bin; install PostgreSQL")
    return versions[-1].parent


def _owner() -> pwd.struct_passwd | None:
    """The user the server runs as: `postgres` when we are root (the server refuses root), else ourselves."""
    if os.geteuid() != 0:
        return None
    try:
        return pwd.getpwnam("postgres")
    except KeyError:
        raise PostgresUnavailable("running as root and there is no `postgres` user to run the server as") from None


def _make_traversable(folder: Path) -> None:
    """Let the `postgres` user reach the cluster folder: add search (not read) permission where it is missing."""
    for path in [folder, *folder.parents]:
        mode = path.stat().st_mode
        if not mode & stat.S_IXOTH:
            path.chmod(mode | stat.S_IXOTH)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _run(command: list, what: str, cwd: Path, owner: pwd.struct_passwd | None, log: Path) -> None:
    """Run one command (as `postgres` when we are root), bounded; failure raises with its output and the log."""
    argv = [str(part) for part in command]
    if owner is not None:
        argv = ["runuser", "-u", owner.pw_name, "--", *argv]
    try:
        done = subprocess.run(
            argv,
            cwd=cwd,  # the server user may not be allowed into our working directory
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=COMMAND_TIMEOUT,
            env={**os.environ, "PGCONNECT_TIMEOUT": "10", "LC_ALL": "C"},
        )
    except (OSError, subprocess.TimeoutExpired) as err:
        raise PostgresUnavailable(f"{what}: {err}{_log_section(log)}") from None
    if done.returncode != 0:
        output = (done.stderr or done.stdout).strip()
        raise PostgresUnavailable(f"{what} exited {done.returncode}: {output}{_log_section(log)}")


def _stop(bin_dir: Path, data: Path, root: Path, owner: pwd.struct_passwd | None) -> None:
    """Stop the server: fast shutdown, then immediate, then SIGKILL to the postmaster as the last resort."""
    for mode in ("fast", "immediate"):
        try:
            _run(
                [bin_dir / "pg_ctl", "-D", data, "-m", mode, "-w", "-t", "30", "stop"],
                "pg_ctl stop",
                root,
                owner,
                root / "server.log",
            )
            return
        except PostgresUnavailable:
            continue
    try:
        pid = int((data / "postmaster.pid").read_text().split()[0])
        os.kill(pid, signal.SIGKILL)
    except (OSError, ValueError, IndexError):
        pass


def _tail(log: Path) -> str:
    try:
        return "\n".join(log.read_text(errors="replace").splitlines()[-LOG_LINES:])
    except OSError:
        return ""


def _log_section(log: Path) -> str:
    tail = _tail(log)
    return f"\n--- server log, last {LOG_LINES} lines ---\n{tail}" if tail else ""
