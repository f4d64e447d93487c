"""The trading robot's side of the store: the stable views ``forecasts_v1``, ``signals_v1`` and
``runs_v1``, read-only.

Owns the contract the robot relies on: the views' names and columns (documented in
docs/robot.md and docs/signals.md) and a small Python read API (``read_forecasts``,
``read_signals``). For SQLite it opens the file read-only
(``mode=ro``), so a reader can never write, and reads one consistent snapshot (WAL: it never
waits for, nor blocks, the writer).
For PostgreSQL (a ``postgresql://`` URL, best with a role that may only read the view, see
docs/postgres.md) it reads in a ``READ ONLY`` transaction through psycopg 3; MVCC gives the same
never-wait, never-half-a-row reads. It uses only the standard library's ``sqlite3`` (and
psycopg for PostgreSQL), so a robot can copy it as is; it knows nothing of the internal tables,
which may change behind the view.
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass, fields
from datetime import datetime, timezone
from pathlib import Path
from typing import Any
from urllib.parse import quote

from flows.errors import StoreError

VIEW = "forecasts_v1"
BUSY_TIMEOUT_MS = 10_000
CONNECT_TIMEOUT_S = 10
# SQLAlchemy-style URLs the pipeline's config uses, and libpq's own.
POSTGRES_SCHEMES = ("postgresql+psycopg://", "postgresql://", "postgres://")


@dataclass(frozen=True)
class Forecast:
    """One row of ``forecasts_v1``; times are ISO 8601 UTC text (``2024-05-01T06:00:00Z``)."""

    forecast_id: int
    generated_at: str
    as_of: str
    ticker: str | None
    template: str
    template_version: int
    language: str
    forecast: str
    finish_reason: str
    new_tokens: int
    news_count: int
    model_hash: str
    prompt_key: str
    run_id: int | None


COLUMNS = tuple(field.name for field in fields(Forecast))
SIGNALS_VIEW = "signals_v1"


@dataclass(frozen=True)
class Signal:
    """One row of ``signals_v1``: one answer label of one scored prompt. ``probability`` is the
    calibrated one (the labels of one prompt sum to 1); ``ticker`` is empty for market-wide."""

    signal_id: int
    scored_at: str
    as_of: str
    ticker: str
    template: str
    template_version: int
    language: str
    label: str
    probability: float
    raw_probability: float
    content_free_probability: float
    logprob: float
    answer_tokens: int
    model_hash: str
    prompt_key: str
    run_id: int | None


SIGNAL_COLUMNS = tuple(field.name for field in fields(Signal))

RUNS_VIEW = "runs_v1"


@dataclass(frozen=True)
class NightRun:
    """One row of ``runs_v1``: one night of the pipeline (docs/night.md). ``outcome`` is
    running, done, partial, interrupted or failed; times are ISO 8601 UTC text."""

    night_id: int
    as_of: str
    started_at: str
    finished_at: str | None
    outcome: str
    forecasts_stored: int
    forecasts_failed: int
    cause: str | None


RUN_COLUMNS = tuple(field.name for field in fields(NightRun))


def is_postgres_url(database: object) -> bool:
    return isinstance(database, str) and database.startswith(POSTGRES_SCHEMES)


def connect_readonly(database: str | Path) -> Any:
    """A read-only connection: ``sqlite3`` for a path or ``sqlite:///`` URL, psycopg for a
    ``postgresql://`` URL (every transaction on it is ``READ ONLY``)."""
    if is_postgres_url(database):
        return _connect_postgres_readonly(database)
    path = Path(str(database).removeprefix("sqlite:///"))
    if not path.is_file():
        raise StoreError(f"database not found: {path} (run `yalm-forecast ingest` first)")
    uri = f"file:{quote(str(path.resolve()))}?mode=ro"
    try:
        connection = sqlite3.connect(uri, uri=True, timeout=BUSY_TIMEOUT_MS / 1000)
        connection.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
    except sqlite3.Error as exc:
        raise StoreError(f"{path}: cannot open read-only: {exc}") from exc
    return connection


def _connect_postgres_readonly(url: str) -> Any:
    try:
        import psycopg
    except ImportError as exc:
        raise StoreError(
            "reading PostgreSQL needs the psycopg driver: pip install 'psycopg[binary]'"
        ) from exc
    conninfo = "postgresql://" + url.split("://", 1)[1]  # libpq does not know "+psycopg"
    try:
        connection = psycopg.connect(
            conninfo, connect_timeout=CONNECT_TIMEOUT_S, application_name="yalm-forecast-robot"
        )
    except psycopg.Error as exc:
        where = url.split("@", 1)[-1]  # never echo a password
        raise StoreError(f"{where}: cannot connect: {' '.join(str(exc).split())}") from exc
    connection.read_only = True
    return connection


def _utc_text(moment: datetime | str) -> str:
    if isinstance(moment, str):
        return moment
    if moment.tzinfo is None:
        raise StoreError(f"naive datetime {moment!r}: pass an aware (UTC) time")
    return moment.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def read_forecasts(
    database: str | Path | Any,
    *,
    since: datetime | str | None = None,
    ticker: str | None = None,
    template: str | None = None,
    forecast_id: int | None = None,
    limit: int | None = None,
) -> list[Forecast]:
    """Finished forecasts, newest first; ``since`` filters on ``generated_at`` (inclusive).

    ``database``: a SQLite path or ``sqlite:///`` URL, a ``postgresql://`` URL, or a connection
    from ``connect_readonly`` (kept open for the caller). Each call is one short read
    transaction, so a robot that polls on one connection never holds the writer back.
    """
    owned = isinstance(database, (str, Path))
    connection = connect_readonly(database) if owned else database
    postgres = not isinstance(connection, sqlite3.Connection)
    query, params = forecasts_query(
        since=since,
        ticker=ticker,
        template=template,
        forecast_id=forecast_id,
        limit=limit,
        mark="%s" if postgres else "?",
    )
    try:
        rows = (
            _postgres_rows(connection, query, params)
            if postgres
            else _sqlite_rows(connection, query, params)
        )
    finally:
        if owned:
            connection.close()
    return [Forecast(*row) for row in rows]


def forecasts_query(
    *,
    since: datetime | str | None = None,
    ticker: str | None = None,
    template: str | None = None,
    forecast_id: int | None = None,
    limit: int | None = None,
    mark: str = "?",
) -> tuple[str, list]:
    """The SQL ``read_forecasts`` sends and its parameters (``mark``: the driver's placeholder).

    Every filter is a column the store indexes (docs/database.md), so a read costs about the
    rows it returns, not the forecasts stored. One ticker's forecasts are chosen first by
    their ids alone (an inner query the store answers from two covering indexes, without
    reading a forecast's text), then only the chosen rows are read: a ticker's whole history
    is sorted as index entries, never as rows.
    """
    clauses, params = [], []
    for column, value in (
        ("generated_at >=", None if since is None else _utc_text(since)),
        ("ticker =", ticker),
        ("template =", template),
        ("forecast_id =", None if forecast_id is None else int(forecast_id)),
    ):
        if value is not None:
            clauses.append(f"{column} {mark}")
            params.append(value)
    where = f" WHERE {' AND '.join(clauses)}" if clauses else ""
    order = " ORDER BY generated_at DESC, forecast_id DESC"
    cut = ""
    if limit is not None:
        cut = f" LIMIT {mark}"
        params.append(int(limit))
    if ticker is not None:
        chosen = f"SELECT forecast_id FROM {VIEW}{where}{order}{cut}"
        where, cut = f" WHERE forecast_id IN ({chosen})", ""
    return f"SELECT {', '.join(COLUMNS)} FROM {VIEW}{where}{order}{cut}", params


def read_signals(
    database: str | Path | Any,
    *,
    since: datetime | str | None = None,
    ticker: str | None = None,
    template: str | None = None,
    prompt_key: str | None = None,
    limit: int | None = None,
) -> list[Signal]:
    """Signals, newest first, one row per scored prompt and label; ``since`` filters on
    ``scored_at`` (inclusive); ``ticker=""`` selects the market-wide ones. ``database`` as for
    ``read_forecasts``."""
    filters = {
        "scored_at >=": since,
        "ticker =": ticker,
        "template =": template,
        "prompt_key =": prompt_key,
    }
    order = "scored_at DESC, prompt_key, signal_id"
    rows = _read_view(database, SIGNALS_VIEW, SIGNAL_COLUMNS, filters, order, limit)
    return [Signal(*row) for row in rows]


def _read_view(
    database: str | Path | Any,
    view: str,
    columns: tuple[str, ...],
    filters: dict[str, object],
    order: str,
    limit: int | None,
) -> list[tuple]:
    """``SELECT columns FROM view WHERE ... ORDER BY order`` through a read-only connection;
    ``filters`` maps ``"column op"`` to a value (None: no filter; a datetime: UTC text)."""
    owned = isinstance(database, (str, Path))
    connection = connect_readonly(database) if owned else database
    postgres = not isinstance(connection, sqlite3.Connection)
    mark = "%s" if postgres else "?"
    clauses, params = [], []
    for condition, value in filters.items():
        if value is None:
            continue
        clauses.append(f"{condition} {mark}")
        params.append(_utc_text(value) if isinstance(value, datetime) else value)
    where = f" WHERE {' AND '.join(clauses)}" if clauses else ""
    query = f"SELECT {', '.join(columns)} FROM {view}{where} ORDER BY {order}"
    if limit is not None:
        query += f" LIMIT {mark}"
        params.append(int(limit))
    try:
        if postgres:
            return _postgres_rows(connection, query, params, view)
        return _sqlite_rows(connection, query, params, view)
    finally:
        if owned:
            connection.close()


def read_runs(
    database: str | Path | Any, *, since: datetime | str | None = None, limit: int | None = None
) -> list[NightRun]:
    """The nights, newest first; ``since`` filters on ``started_at`` (inclusive). ``database``
    as for ``read_forecasts``."""
    owned = isinstance(database, (str, Path))
    connection = connect_readonly(database) if owned else database
    postgres = not isinstance(connection, sqlite3.Connection)
    mark = "%s" if postgres else "?"
    query, params = f"SELECT {', '.join(RUN_COLUMNS)} FROM {RUNS_VIEW}", []
    if since is not None:
        query += f" WHERE started_at >= {mark}"
        params.append(_utc_text(since))
    query += " ORDER BY started_at DESC, night_id DESC"
    if limit is not None:
        query += f" LIMIT {mark}"
        params.append(int(limit))
    try:
        rows = (
            _postgres_rows(connection, query, params, RUNS_VIEW)
            if postgres
            else _sqlite_rows(connection, query, params, RUNS_VIEW)
        )
    finally:
        if owned:
            connection.close()
    return [NightRun(*row) for row in rows]


def _sqlite_rows(
    connection: sqlite3.Connection, query: str, params: list, view: str = VIEW
) -> list[tuple]:
    try:
        return connection.execute(query, params).fetchall()
    except sqlite3.OperationalError as exc:
        raise StoreError(f"cannot read {view}: {exc} (is this a yalm-forecast database?)") from exc


def _postgres_rows(connection: Any, query: str, params: list, view: str = VIEW) -> list[tuple]:
    import psycopg

    try:
        # One transaction per read, ended at once: a robot's long-lived connection is never
        # left "idle in transaction" holding back the server's cleanup.
        with connection.transaction(), connection.cursor() as cursor:
            cursor.execute(query, params)
            return cursor.fetchall()
    except psycopg.Error as exc:
        detail = " ".join(str(exc).split())
        raise StoreError(
            f"cannot read {view}: {detail} (is this a yalm-forecast database?)"
        ) from exc
