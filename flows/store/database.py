"""Opening the pipeline's store (SQLite or PostgreSQL), migrating it, and writing feeds and news.

Owns the connection rules of each database it supports. SQLite: WAL so readers never wait for
the writer, a busy timeout, foreign keys, ``BEGIN IMMEDIATE`` so every write transaction takes
the write lock up front. PostgreSQL (``postgresql+psycopg://``): plain READ COMMITTED write
transactions (row locks do the rest, see ``flows.store.claims``), read transactions that are
``READ ONLY`` and ``REPEATABLE READ`` (one snapshot, never a write), and migrations serialized
by an advisory lock so hosts starting at once do not race. It also runs the Alembic migrations
on open, holds the feed/news/run writes and reads, and ends every run with fresh planner
statistics and a truncated WAL (SQLite). Every write happens in one explicit
transaction: a failure leaves what was stored before untouched. Prompt and generation writes
live in ``flows.store.generations`` and ``flows.store.claims``; the robot's read-only side in
``flows.store.robot``. This module does not fetch, parse or render anything.
"""

from __future__ import annotations

import json
import logging
import re
import sqlite3
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config as AlembicConfig
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import create_engine, event, insert, or_, select
from sqlalchemy.engine import URL, Engine, make_url
from sqlalchemy.exc import ArgumentError, SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from flows.errors import StoreError
from flows.store.models import Feed, Fetch, NewsItem, NewsTicker, Run
from flows.store.provenance import code_version

MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"
BUSY_TIMEOUT_MS = 10_000
CONNECT_TIMEOUT_S = 10
# Any fixed number shared by every process that migrates the same PostgreSQL database.
MIGRATION_LOCK_ID = 0x59414C4D  # "YALM"
# How long the end-of-run checkpoint waits for a reader still on an old snapshot: a robot that
# reads in short transactions (docs/database.md) is gone in milliseconds; one that is not gets
# its WAL truncated by the next run instead of holding this one's writer back.
CHECKPOINT_BUSY_TIMEOUT_MS = 1_000
# ANALYZE reads at most this many entries of each index (SQLite's advice: 400 to 1000): the
# statistics it writes are estimates, enough for the planner, and keeping them fresh after
# every run costs tens of milliseconds on a store of any size...
ANALYSIS_LIMIT_ROWS = 1_000
# ... except for the tables behind forecasts_v1, analysed exactly: estimated row counts that
# disagree between prompts and generations (each taken from another index's first entries)
# made the planner read the newest forecasts by scanning every prompt and sorting. Exact
# statistics for them cost ~0.1 s per 100k forecasts.
EXACT_STATISTICS_TABLES = ("prompts", "generations")
log = logging.getLogger("flows.store")


def utc_now() -> datetime:
    return datetime.now(timezone.utc).replace(microsecond=0)


class Store:
    """An open store: an engine plus explicit transactions. Use as a context manager."""

    def __init__(self, engine: Engine):
        self.engine = engine
        self.dialect = engine.dialect.name  # "sqlite" | "postgresql"
        self._writes = sessionmaker(engine, expire_on_commit=False)
        reads = engine.execution_options(read_only=True)
        if self.dialect == "postgresql":
            reads = engine.execution_options(
                isolation_level="REPEATABLE READ", postgresql_readonly=True
            )
        self._reads = sessionmaker(reads, expire_on_commit=False)

    @contextmanager
    def transaction(self) -> Iterator[Session]:
        """One write transaction (SQLite: ``BEGIN IMMEDIATE``): all of it commits, or none."""
        with self._wrap_errors(), self._writes.begin() as session:
            yield session

    @contextmanager
    def reading(self) -> Iterator[Session]:
        """One read-only transaction: a consistent snapshot that never blocks a writer."""
        with self._wrap_errors(), self._reads.begin() as session:
            yield session

    @contextmanager
    def _wrap_errors(self) -> Iterator[None]:
        try:
            yield
        except SQLAlchemyError as exc:
            raise StoreError(f"{describe_url(self.engine.url)}: {_one_line(exc)}") from exc

    def close(self) -> None:
        self.engine.dispose()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def sqlite_engine(database_url: str, *, busy_timeout_ms: int = BUSY_TIMEOUT_MS) -> Engine:
    """An engine whose connections use WAL, a busy timeout, foreign keys, BEGIN IMMEDIATE."""
    engine = create_engine(database_url, connect_args={"timeout": busy_timeout_ms / 1000})

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection, _record):
        # Take transaction control from the sqlite3 module so BEGIN is ours (see "begin").
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute(f"PRAGMA busy_timeout = {int(busy_timeout_ms)}")
        cursor.execute("PRAGMA journal_mode = WAL")
        cursor.execute("PRAGMA synchronous = NORMAL")
        cursor.execute("PRAGMA foreign_keys = ON")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(connection):
        # Writers take the write lock up front: a deferred transaction that later writes can
        # fail with "database is locked" without waiting for the busy timeout.
        read_only = connection.get_execution_options().get("read_only", False)
        connection.exec_driver_sql("BEGIN" if read_only else "BEGIN IMMEDIATE")

    return engine


def postgres_engine(url: URL, *, connect_timeout_s: int = CONNECT_TIMEOUT_S) -> Engine:
    """An engine for PostgreSQL through psycopg 3: READ COMMITTED writes, checked connections."""
    try:
        import psycopg  # noqa: F401  (only to give a missing driver a readable error)
    except ImportError as exc:
        raise StoreError(
            f"{describe_url(url)}: PostgreSQL needs the psycopg driver: "
            "pip install 'yalm-forecast[postgres]'"
        ) from exc
    return create_engine(
        url,
        pool_pre_ping=True,  # a server restart between nightly runs costs one reconnect
        connect_args={"connect_timeout": connect_timeout_s, "application_name": "yalm-forecast"},
    )


def parse_database_url(value: str) -> URL:
    """Parse a store URL: ``sqlite:///path`` or ``postgresql[+psycopg]://user@host/db``.

    ``postgresql://`` and ``postgres://`` mean psycopg 3, the one PostgreSQL driver we ship.
    """
    try:
        url = make_url(value)
    except (ArgumentError, ValueError) as exc:  # ValueError: a port that is not a number
        hidden = re.sub(r"://([^:/@]*):[^@]*@", r"://\1:***@", value)
        raise StoreError(f"not a database URL: {hidden!r}") from exc
    # Split the name ourselves: asking SQLAlchemy for the driver loads the dialect, and an
    # unknown one ("postgres", "mysql") would fail there with a plugin error.
    backend, _, driver = url.drivername.partition("+")
    if backend in ("postgres", "postgresql"):
        if driver not in ("", "psycopg"):
            raise StoreError(f"{describe_url(url)}: use postgresql+psycopg:// (psycopg 3)")
        if not url.database:
            raise StoreError(f"{describe_url(url)}: the URL names no database")
        return url.set(drivername="postgresql+psycopg")
    if backend == "sqlite":
        if not url.database or url.database == ":memory:":
            raise StoreError(f"{value}: SQLite needs a file path (readers open it separately)")
        return url
    raise StoreError(f"unsupported database {url.drivername!r}: use sqlite:/// or postgresql://")


def describe_url(url: URL | str) -> str:
    """How errors name a database: the file for SQLite, the URL without password otherwise."""
    url = make_url(url) if isinstance(url, str) else url
    if url.get_backend_name() == "sqlite":
        return str(url.database)
    return url.render_as_string(hide_password=True)


def _one_line(exc: BaseException) -> str:
    return " ".join(str(getattr(exc, "orig", None) or exc).split())


def open_store(database_url: str, *, migrate: bool = True) -> Store:
    """Open the store (a SQLite file is created if needed) and migrate it to the newest schema."""
    url = parse_database_url(database_url)
    if url.get_backend_name() == "sqlite":
        path = Path(url.database)
        if not path.parent.is_dir():
            raise StoreError(f"database directory does not exist: {path.parent}")
        engine = sqlite_engine(database_url)
    else:
        engine = postgres_engine(url)
    try:
        if migrate:
            migrate_to_head(engine)
        else:
            with engine.connect():
                pass  # fail here, naming the host, rather than at the first query
    except SQLAlchemyError as exc:
        engine.dispose()
        raise StoreError(f"{describe_url(url)}: cannot open or migrate: {_one_line(exc)}") from exc
    return Store(engine)


def _alembic_config() -> AlembicConfig:
    config = AlembicConfig()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    return config


def migrate_to_head(engine: Engine) -> None:
    """Apply the named migrations not yet applied, each in its own transaction.

    On PostgreSQL a session advisory lock makes concurrent openers (several hosts starting the
    same night) wait for the first one's migrations instead of racing it.
    """
    config = _alembic_config()
    head = ScriptDirectory.from_config(config).get_current_head()
    with engine.connect() as connection:
        locked = engine.dialect.name == "postgresql"
        if locked:
            connection.exec_driver_sql(f"SELECT pg_advisory_lock({MIGRATION_LOCK_ID})")
            connection.commit()
        try:
            current = MigrationContext.configure(connection).get_current_revision()
            connection.rollback()
            if current == head:
                return
            config.attributes["connection"] = connection
            command.upgrade(config, "head")
            connection.commit()
        finally:
            if locked:
                connection.rollback()
                connection.exec_driver_sql(f"SELECT pg_advisory_unlock({MIGRATION_LOCK_ID})")
                connection.commit()


# ---- runs ------------------------------------------------------------------------------------


def start_run(store: Store, kind: str, details: dict[str, Any] | None = None) -> int:
    with store.transaction() as session:
        run = Run(
            kind=kind,
            status="running",
            started_at=utc_now(),
            details_json=json.dumps(details or {}, ensure_ascii=False, sort_keys=True),
            code_version=code_version(),
        )
        session.add(run)
        session.flush()
        return run.id


def finish_run(store: Store, run_id: int, status: str, details: dict[str, Any] | None = None):
    with store.transaction() as session:
        run = session.get(Run, run_id)
        if run is None:
            raise StoreError(f"no run with id {run_id}")
        run.status, run.finished_at = status, utc_now()
        if details is not None:
            run.details_json = json.dumps(details, ensure_ascii=False, sort_keys=True)
    tidy_after_run(store)


@dataclass(frozen=True)
class Checkpoint:
    """What ``PRAGMA wal_checkpoint(TRUNCATE)`` did: ``busy`` when a reader kept it from
    finishing (the WAL then stays until the next run's checkpoint)."""

    busy: bool
    wal_pages: int
    checkpointed_pages: int


def tidy_after_run(store: Store) -> Checkpoint | None:
    """End of a run: refresh the planner's statistics, then move the WAL into the database
    file and truncate it to zero bytes. SQLite only (PostgreSQL's autovacuum does both).

    The statistics come from ``ANALYZE`` (bounded, but exact for ``forecasts_v1``'s tables)
    rather than ``PRAGMA optimize``: SQLite 3.40's optimize analyses only tables this
    connection has queried, so a store could go without statistics for good, and one ticker's
    read needs them to pick its covering index.

    Read-only connections (the robot's) can never checkpoint, and a writer that closes while
    one is connected leaves its WAL behind, however large; so every run truncates it here.
    """
    if store.dialect != "sqlite":
        return None
    connection = store.engine.raw_connection()  # autocommit: no transaction around PRAGMAs
    try:
        cursor = connection.cursor()
        cursor.execute(f"PRAGMA analysis_limit = {ANALYSIS_LIMIT_ROWS}")
        cursor.execute("ANALYZE")
        cursor.execute("PRAGMA analysis_limit = 0")
        for table in EXACT_STATISTICS_TABLES:
            cursor.execute(f"ANALYZE {table}")
        cursor.execute(f"PRAGMA busy_timeout = {CHECKPOINT_BUSY_TIMEOUT_MS}")
        try:
            busy, wal_pages, moved = cursor.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
        finally:
            cursor.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
            cursor.close()
    except sqlite3.Error as exc:
        raise StoreError(f"{describe_url(store.engine.url)}: end-of-run checkpoint: {exc}") from exc
    finally:
        connection.close()
    checkpoint = Checkpoint(bool(busy), wal_pages, moved)
    if checkpoint.busy:
        log.warning(
            "%s: WAL not truncated (%d pages): a reader still holds an old snapshot; the next "
            "run truncates it (readers: keep read transactions short, see docs/database.md)",
            describe_url(store.engine.url),
            wal_pages,
        )
    return checkpoint


# ---- feeds and news --------------------------------------------------------------------------


@dataclass(frozen=True)
class FetchRecord:
    """What one fetch of one feed produced, as the store keeps it."""

    feed_name: str
    url: str
    status: str  # ok | partial | not_modified | failed
    reason: str | None
    http_status: int | None = None
    etag: str | None = None
    last_modified: str | None = None
    bytes_received: int = 0
    attempts: int = 1
    duration_s: float = 0.0
    fetched_at: datetime | None = None


def feed_validators(store: Store, feed_name: str) -> tuple[str | None, str | None]:
    """The (ETag, Last-Modified) stored for a feed, for a conditional GET."""
    with store.reading() as session:
        feed = session.scalar(select(Feed).where(Feed.name == feed_name))
        return (feed.etag, feed.last_modified) if feed else (None, None)


def save_fetch(
    store: Store, record: FetchRecord, items: Sequence, run_id: int | None = None
) -> int:
    """Record one fetch and insert its new items (deduplicated); returns how many were new.

    ``items`` are ``flows.sources.feeds.NewsItem``. The feed's stored validators change only when
    the fetch produced a body, so a failed fetch never loses the ETag of the last good one.
    """
    fetched_at = record.fetched_at or utc_now()
    with store.transaction() as session:
        feed = session.scalar(select(Feed).where(Feed.name == record.feed_name))
        if feed is None:
            feed = Feed(name=record.feed_name, url=record.url)
            session.add(feed)
            session.flush()
        feed.url, feed.last_status, feed.last_fetched_at = record.url, record.status, fetched_at
        if record.status in ("ok", "partial", "not_modified"):
            feed.last_ok_at = fetched_at
        if record.status in ("ok", "partial"):
            feed.etag, feed.last_modified = record.etag, record.last_modified
        existing = _stored_keys(session, [item.dedup_key for item in items])
        new_items = []
        for item in items:
            if item.dedup_key not in existing:
                existing.add(item.dedup_key)
                new_items.append(item)
        if new_items:
            _insert_items(session, new_items, feed.id, fetched_at)
        new_count = len(new_items)
        session.add(
            Fetch(
                feed_id=feed.id,
                run_id=run_id,
                fetched_at=fetched_at,
                status=record.status,
                reason=record.reason,
                http_status=record.http_status,
                etag=record.etag,
                last_modified=record.last_modified,
                bytes_received=record.bytes_received,
                attempts=record.attempts,
                duration_s=record.duration_s,
                items_seen=len(items),
                items_new=new_count,
            )
        )
        return new_count


def _insert_items(session: Session, items: Sequence, feed_id: int, fetched_at: datetime) -> None:
    """Insert new items and their tickers: two multi-row inserts and one query, not a round
    trip per item."""
    session.execute(
        insert(NewsItem),
        [
            {
                "dedup_key": item.dedup_key,
                "feed_id": feed_id,
                "source": item.source,
                "guid": item.guid,
                "title": item.title,
                "summary": item.summary,
                "link": item.link,
                "published_at": item.published_at,
                "published_estimated": item.published_estimated,
                "fetched_at": fetched_at,
            }
            for item in items
        ],
    )
    tagged = [item for item in items if item.tickers]
    if not tagged:
        return
    ids = dict(
        session.execute(
            select(NewsItem.dedup_key, NewsItem.id).where(
                NewsItem.dedup_key.in_([item.dedup_key for item in tagged])
            )
        ).all()
    )
    session.execute(
        insert(NewsTicker),
        [
            {"item_id": ids[item.dedup_key], "ticker": ticker, "published_at": item.published_at}
            for item in tagged
            for ticker in item.tickers
        ],
    )


def _stored_keys(session: Session, keys: Sequence[str]) -> set[str]:
    if not keys:
        return set()
    return set(session.scalars(select(NewsItem.dedup_key).where(NewsItem.dedup_key.in_(keys))))


def stored_keys(store: Store, keys: Sequence[str]) -> set[str]:
    """Which of these dedup keys are already stored (ingest matches tickers only for the rest)."""
    with store.reading() as session:
        return _stored_keys(session, list(keys))


def list_news(
    store: Store,
    *,
    since: datetime | None = None,
    until: datetime | None = None,
    source: str | Sequence[str] | None = None,
    ticker: str | None = None,
    limit: int | None = None,
    text_only: bool = False,
) -> list[dict[str, Any]]:
    """Stored news items, newest first, as plain dicts (tickers as a sorted list).

    ``text_only`` keeps only what a prompt may use: items with a title or summary whose text is
    not flagged garbled (link-only items are stored for provenance, ``has_text`` false).
    With ``ticker`` the time window and the order are read from ``news_item_tickers`` (which
    repeats each item's time), so the cost follows the window's items of that ticker, not
    every item ever tagged with it.
    """
    query = select(NewsItem)
    published_at, item_id = NewsItem.published_at, NewsItem.id
    if ticker:
        published_at, item_id = NewsTicker.published_at, NewsTicker.item_id
        query = query.join(NewsTicker, NewsTicker.item_id == NewsItem.id).where(
            NewsTicker.ticker == ticker
        )
    query = query.order_by(published_at.desc(), item_id.desc())
    if text_only:
        query = query.where(
            or_(NewsItem.title != "", NewsItem.summary != ""),
            or_(NewsItem.text_status.is_(None), NewsItem.text_status != "garbled"),
        )
    if since is not None:
        query = query.where(published_at >= since)
    if until is not None:
        query = query.where(published_at <= until)
    if source:
        sources = [source] if isinstance(source, str) else list(source)
        query = query.where(NewsItem.source.in_(sources))
    if limit is not None:
        query = query.limit(limit)
    with store.reading() as session:
        rows = list(session.scalars(query))
        tickers: dict[int, list[str]] = {row.id: [] for row in rows}
        if rows:
            pairs = session.execute(
                select(NewsTicker.item_id, NewsTicker.ticker).where(NewsTicker.item_id.in_(tickers))
            )
            for item_id, symbol in pairs:
                tickers[item_id].append(symbol)
        return [
            {
                "published_at": row.published_at.strftime("%Y-%m-%dT%H:%M:%SZ"),
                "source": row.source,
                "title": row.title,
                "summary": row.summary,
                "link": row.link,
                "tickers": sorted(tickers[row.id]),
                "published_estimated": row.published_estimated,
                "dedup_key": row.dedup_key,
                "has_text": bool(row.title.strip() or row.summary.strip()),
                "text_status": row.text_status,
            }
            for row in rows
        ]


def fetch_history(store: Store, feed_name: str | None = None) -> list[dict[str, Any]]:
    """Every recorded fetch, oldest first: the feed, status, reason and counts."""
    query = select(Fetch, Feed.name).join(Feed, Feed.id == Fetch.feed_id).order_by(Fetch.id)
    if feed_name:
        query = query.where(Feed.name == feed_name)
    with store.reading() as session:
        return [
            {
                "feed": name,
                "status": fetch.status,
                "reason": fetch.reason,
                "http_status": fetch.http_status,
                "items_seen": fetch.items_seen,
                "items_new": fetch.items_new,
                "run_id": fetch.run_id,
            }
            for fetch, name in session.execute(query)
        ]
