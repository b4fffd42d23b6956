"""Connecting to the review database: URLs, the SQLite settings (WAL, the write lock taken first), and the
Alembic migrations that bring the tables up to date when a store opens."""

from __future__ import annotations

import threading
from pathlib import Path

from sqlalchemy import create_engine, event
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.exc import ArgumentError

MIGRATIONS = Path(__file__).parent / "migrations"
READ_ONLY = "wenmai_read_only"  # execution option: a transaction that only reads
# Alembic keeps the running migration in module globals (alembic.context, alembic.op): two threads opening a
# store at once would run on each other's. PostgreSQL: one more lock, so two processes don't both create tables.
MIGRATING = threading.Lock()
MIGRATION_LOCK_ID = 0x77656E6D6169  # "wenmai", the key of PostgreSQL's advisory lock


def database_url(db: str | Path) -> str:
    """A SQLAlchemy URL from `--db`: a URL as given, or a file path for the embedded SQLite store."""
    text = str(db)
    if "://" in text:
        return text
    return f"sqlite:///{Path(text).expanduser().resolve()}"


def shown_url(url: str) -> str:
    """The URL with its password hidden, for messages and lineage."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except ArgumentError:
        return url


def engine_for(url: str) -> Engine:
    """An engine for `url`; SQLite in WAL mode, each transaction taking the write lock as it begins."""
    if not url.startswith("sqlite"):
        return create_engine(url, pool_pre_ping=True, connect_args=_connect_timeout(url))
    engine = create_engine(url, connect_args={"timeout": 60, "check_same_thread": False})

    @event.listens_for(engine, "connect")
    def _sqlite_settings(connection, _record) -> None:
        connection.isolation_level = None  # SQLAlchemy emits BEGIN itself (below), not the driver
        cursor = connection.cursor()
        cursor.execute("PRAGMA busy_timeout=60000")
        _wal(cursor)
        for pragma in ("foreign_keys=ON", "synchronous=NORMAL"):
            cursor.execute(f"PRAGMA {pragma}")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _write_lock_first(connection) -> None:
        # A writing transaction takes the write lock when it starts: two writers that both read then write would
        # otherwise deadlock on the upgrade from a read lock, and SQLite would fail one at once. A read-only one
        # (READ_ONLY) begins deferred: in WAL mode it reads a snapshot without waiting for writers.
        read_only = connection.get_execution_options().get(READ_ONLY, False)
        connection.exec_driver_sql("BEGIN" if read_only else "BEGIN IMMEDIATE")

    return engine


def _wal(cursor, attempts: int = 100) -> None:
    """Switch a SQLite database to WAL. Several processes opening a new file at once can find it locked: the
    switch does not always wait through the busy timeout, so it is tried again (bounded: 100 x 0.1 s)."""
    import sqlite3
    import time

    for attempt in range(attempts):
        try:
            cursor.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as err:
            if "locked" not in str(err) or attempt == attempts - 1:
                raise
            time.sleep(0.1)


def _connect_timeout(url: str) -> dict:
    return {"connect_timeout": 10} if make_url(url).get_backend_name() == "postgresql" else {}


def migrate(engine: Engine) -> None:
    """Bring the tables to the newest revision (Alembic); a no-op when they are there already."""
    from alembic import command
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    with MIGRATING, engine.begin() as connection:
        if connection.dialect.name == "postgresql":
            connection.exec_driver_sql(f"SELECT pg_advisory_xact_lock({MIGRATION_LOCK_ID})")
        config.attributes["connection"] = connection
        command.upgrade(config, "head")
