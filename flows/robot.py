"""The trading robot's side of the store: the stable view ``forecasts_v1``, read-only.

Owns the contract the robot relies on: the view's name and columns (documented in README) and a
small Python read API that opens the SQLite file read-only (``mode=ro``), so a reader can never
write, and reads one consistent snapshot (WAL: it never waits for, nor blocks, the writer).
It uses only the standard library's ``sqlite3``, so a robot can copy it as is; it knows nothing
of the internal tables, which may change behind the view.
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass, fields
from datetime import datetime, timezone
from pathlib import Path
from urllib.parse import quote

from flows.errors import StoreError

VIEW = "forecasts_v1"
BUSY_TIMEOUT_MS = 10_000


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


def connect_readonly(database: str | Path) -> sqlite3.Connection:
    """A read-only connection to the store (a path or a ``sqlite:///`` URL)."""
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


def _utc_text(moment: datetime | str) -> str:
    if isinstance(moment, str):
        return moment
    if moment.tzinfo is None:
        raise StoreError(f"naive datetime {moment!r}: pass an aware (UTC) time")
    return moment.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def read_forecasts(
    database: str | Path | sqlite3.Connection,
    *,
    since: datetime | str | None = None,
    ticker: str | None = None,
    template: str | None = None,
    limit: int | None = None,
) -> list[Forecast]:
    """Finished forecasts, newest first; ``since`` filters on ``generated_at`` (inclusive)."""
    clauses, params = [], []
    if since is not None:
        clauses.append("generated_at >= ?")
        params.append(_utc_text(since))
    if ticker is not None:
        clauses.append("ticker = ?")
        params.append(ticker)
    if template is not None:
        clauses.append("template = ?")
        params.append(template)
    where = f" WHERE {' AND '.join(clauses)}" if clauses else ""
    order = " ORDER BY generated_at DESC, forecast_id DESC"
    query = f"SELECT {', '.join(COLUMNS)} FROM {VIEW}{where}{order}"
    if limit is not None:
        query += " LIMIT ?"
        params.append(int(limit))
    owned = not isinstance(database, sqlite3.Connection)
    connection = connect_readonly(database) if owned else database
    try:
        rows = connection.execute(query, params).fetchall()
    except sqlite3.OperationalError as exc:
        raise StoreError(f"cannot read {VIEW}: {exc} (is this a yalm-forecast database?)") from exc
    finally:
        if owned:
            connection.close()
    return [Forecast(*row) for row in rows]
