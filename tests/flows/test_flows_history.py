"""A store with history: reads that use their indexes, migrations that keep every row's meaning,
a WAL truncated after each run, and retention that prunes only old news.

The history is written in bulk, straight into the schema the migrations made (hundreds of
forecasts and news items, too many to make one by one through the API in a test).
"""

from __future__ import annotations

import sqlite3
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from alembic import command
from flows_testkit import sample, write_config
from sqlalchemy import text

from flows.config import load_config
from flows.errors import PipelineConfigError
from flows.sources.ingest import ingest_feeds
from flows.store.database import (
    _alembic_config,
    list_news,
    open_store,
    parse_database_url,
    postgres_engine,
    sqlite_engine,
    tidy_after_run,
)
from flows.store.generations import pending_prompts
from flows.store.robot import connect_readonly, forecasts_query, read_forecasts

TICKERS = ("SBER", "GAZP", "LKOH", "YDEX", "AAPL", "NVDA", "ROSN", "MTSS", "MOEX", "ALRS")
TEMPLATES = ("ticker_outlook_ru", "ticker_outlook_en")
LAST_NIGHT = datetime(2024, 5, 14, 3, 0, tzinfo=timezone.utc)
NIGHTS = 120  # 2,520 prompts: more than ANALYZE's bounded sample of 1000 entries
ITEMS_PER_NIGHT = 30


def stamp(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def history_rows(*, nights: int = NIGHTS, tag_times: bool = True) -> dict[str, list[dict]]:
    """A history's rows, table by table: news with tickers, prompts, forecasts."""
    rows: dict[str, list[dict]] = {"feeds": [{"id": 1, "name": "wire", "url": "http://w/rss"}]}
    items, tags, prompts, generations = [], [], [], []
    for night_index in range(nights):
        night = LAST_NIGHT - timedelta(days=nights - 1 - night_index)
        for slot in range(ITEMS_PER_NIGHT):
            item_id = len(items) + 1
            published = night - timedelta(minutes=30 * slot + 1)
            ticker = TICKERS[(item_id * 7) % len(TICKERS)]
            items.append({
                "id": item_id, "dedup_key": f"item{item_id:06d}", "feed_id": 1, "source": "wire",
                "guid": None, "title": f"{ticker}: новость {item_id}", "summary": "Текст",
                "link": f"http://w/{item_id}", "published_at": stamp(published),
                "published_estimated": False, "fetched_at": stamp(published),
            })  # fmt: skip
            for symbol in {ticker, TICKERS[item_id % 3]}:
                tag = {"item_id": item_id, "ticker": symbol}
                tags.append({**tag, "published_at": stamp(published)} if tag_times else tag)
        last = night_index == nights - 1
        for slot, (ticker, template) in enumerate(
            [(ticker, template) for ticker in TICKERS for template in TEMPLATES]
            + [(None, "morning_brief_ru")]
        ):
            key = f"p{night_index:03d}-{slot:02d}"
            status = "failed" if slot == 5 else ("pending" if last and slot % 4 == 0 else "done")
            prompts.append({
                "key": key, "template_name": template, "template_version": 1,
                "template_hash": "h" * 64, "language": template[-2:],
                "scope": "ticker" if ticker else "market", "ticker": ticker,
                "as_of": night.date().isoformat(), "text": f"prompt {key}", "token_count": 10,
                "max_new_tokens": 20, "sampling_json": "{}",
                "item_keys_json": f'["item{len(items):06d}", "item{len(items) - 1:06d}"]',
                "items_dropped": 0, "status": status, "created_at": stamp(night),
                "updated_at": stamp(night),
            })  # fmt: skip
            if status == "done":
                generations.append({
                    "id": len(generations) + 1, "prompt_key": key, "text": f"прогноз {key}",
                    "token_ids_json": "[1, 2]", "prompt_tokens": 10, "new_tokens": 2,
                    "finish_reason": "eos", "model_manifest_hash": "m" * 64,
                    "template_name": template, "template_version": 1, "template_hash": "h" * 64,
                    "sampling_json": "{}", "timings_json": "{}", "code_version": "test",
                    "created_at": stamp(night + timedelta(minutes=slot)),
                })  # fmt: skip
    rows.update(news_items=items, news_item_tickers=tags, prompts=prompts, generations=generations)
    return rows


def write_history(connection, rows: dict[str, list[dict]]) -> None:
    for table, table_rows in rows.items():
        columns = list(table_rows[0])
        marks = ", ".join(f":{name}" for name in columns)
        connection.execute(
            text(f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({marks})"), table_rows
        )


@pytest.fixture
def history_store(tmp_path):
    with open_store(f"sqlite:///{tmp_path / 'history.sqlite'}") as store:
        with store.transaction() as session:
            write_history(session, history_rows())
        yield store


def plan(database: str, sql: str, params: list) -> str:
    connection = connect_readonly(database)
    try:
        rows = connection.execute(f"EXPLAIN QUERY PLAN {sql}", params).fetchall()
    finally:
        connection.close()
    return "; ".join(row[-1] for row in rows)


ONE_TICKER = [
    "SEARCH g USING INTEGER PRIMARY KEY (rowid=?)",
    "LIST SUBQUERY 1",
    "SEARCH p USING COVERING INDEX ix_prompts_ticker (ticker=? AND status=?)",
    "SEARCH g USING COVERING INDEX ix_generations_prompt_created (prompt_key=?{since})",
    "USE TEMP B-TREE FOR ORDER BY",  # one ticker's index entries, not its rows
    "SEARCH p USING INDEX sqlite_autoindex_prompts_1 (key=?)",
    "USE TEMP B-TREE FOR ORDER BY",  # the rows returned
]
# Each read and its plan once a run has left statistics: a search by the index that answers
# it (for the latest rows, a walk down the time index that the LIMIT stops), then lookups by
# key; one ticker's forecasts are chosen from covering indexes before any row is read.
ROBOT_READS = {
    "latest 100": (
        {"limit": 100},
        [
            "SCAN g USING INDEX ix_generations_created_at",
            "SEARCH p USING INDEX sqlite_autoindex_prompts_1 (key=?)",
        ],
    ),
    "one ticker": (
        {"ticker": "SBER", "limit": 100},
        [step.format(since="") for step in ONE_TICKER],
    ),
    "since yesterday": (
        {"since": LAST_NIGHT - timedelta(hours=12)},
        [
            "SEARCH g USING INDEX ix_generations_created_at (created_at>?)",
            "SEARCH p USING INDEX sqlite_autoindex_prompts_1 (key=?)",
        ],
    ),
    "one ticker since a date": (
        {"ticker": "SBER", "since": LAST_NIGHT - timedelta(days=10)},
        [step.format(since=" AND created_at>?") for step in ONE_TICKER],
    ),
    "one forecast by id": (
        {"forecast_id": 7},
        [
            "SEARCH g USING INTEGER PRIMARY KEY (rowid=?)",
            "SEARCH p USING INDEX sqlite_autoindex_prompts_1 (key=?)",
            "USE TEMP B-TREE FOR ORDER BY",  # of one row
        ],
    ),
}


@pytest.mark.parametrize("statistics", ["none yet", "after a run"])
def test_the_robots_reads_use_their_index_and_never_scan_or_sort_everything(
    history_store, statistics
):
    database = history_store.engine.url.database
    if statistics == "after a run":
        tidy_after_run(history_store)  # what every run ends with
    everything = read_forecasts(database)
    assert len(everything) > 600
    for name, (filters, expected_plan) in ROBOT_READS.items():
        steps = plan(database, *forecasts_query(**filters)).split("; ")
        if statistics == "after a run":
            assert steps == expected_plan, name
        else:  # without statistics the plans may differ, but still only search and look up
            walk = "SCAN g USING INDEX ix_generations_created_at"
            assert all(
                step.startswith(("SEARCH", "LIST SUBQUERY", "USE TEMP B-TREE")) or step == walk
                for step in steps
            ), (name, steps)
        expected = [row for row in everything if _matches(row, filters)]
        assert read_forecasts(database, **filters) == expected[: filters.get("limit")], name


def _matches(row, filters) -> bool:
    since = filters.get("since")
    return (
        (since is None or row.generated_at >= stamp(since))
        and filters.get("ticker", row.ticker) == row.ticker
        and filters.get("forecast_id", row.forecast_id) == row.forecast_id
    )


def test_renders_news_query_walks_one_tickers_window_by_its_index(history_store):
    seen: list[tuple[str, tuple]] = []

    def remember(conn, cursor, statement, parameters, context, executemany):
        seen.append((statement, parameters))

    from sqlalchemy import event

    event.listen(history_store.engine, "before_cursor_execute", remember)
    window = (LAST_NIGHT - timedelta(hours=24), LAST_NIGHT)
    news = list_news(history_store, since=window[0], until=window[1], ticker="SBER", limit=25)
    statement, parameters = next(each for each in seen if "FROM news_items" in each[0])
    steps = plan(history_store.engine.url.database, statement, list(parameters)).split("; ")
    assert steps == [
        "SEARCH news_item_tickers USING COVERING INDEX ix_news_item_tickers_ticker_published "
        "(ticker=? AND published_at>? AND published_at<?)",
        "SEARCH news_items USING INTEGER PRIMARY KEY (rowid=?)",
    ]
    everything = list_news(history_store)
    expected = [
        row
        for row in everything
        if "SBER" in row["tickers"] and stamp(window[0]) <= row["published_at"] <= stamp(window[1])
    ]
    assert news == expected[:25] and len(news) > 5


# ---- migrations --------------------------------------------------------------------------------


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request, tmp_path):
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'old.sqlite'}"
    return request.getfixturevalue("postgres_server").create_database()


def migrated_to(url: str, revision: str):
    """An engine on ``url`` whose schema is at ``revision`` (as an older release left it)."""
    if url.startswith("sqlite"):
        engine = sqlite_engine(url)
    else:
        engine = postgres_engine(parse_database_url(url))
    config = _alembic_config()
    with engine.connect() as connection:
        config.attributes["connection"] = connection
        command.upgrade(config, revision)
        connection.commit()
    return engine


def snapshot(connection) -> dict[str, list[tuple]]:
    queries = {
        "forecasts_v1": "SELECT * FROM forecasts_v1 ORDER BY forecast_id",
        "tickers": "SELECT item_id, ticker FROM news_item_tickers ORDER BY item_id, ticker",
        "prompts": "SELECT key, status, ticker, as_of FROM prompts ORDER BY key",
    }
    return {
        name: [tuple(row) for row in connection.execute(text(sql))] for name, sql in queries.items()
    }


def test_nothing_stored_changes_meaning_through_the_migrations(database_url):
    engine = migrated_to(database_url, "0002_prompt_claims")
    with engine.begin() as connection:
        write_history(connection, history_rows(tag_times=False))
    with engine.connect() as connection:
        before = snapshot(connection)
    engine.dispose()
    assert len(before["forecasts_v1"]) > 600 and len(before["tickers"]) > 1000

    with open_store(database_url) as store:  # migrates to the newest schema
        with store.engine.connect() as connection:
            assert snapshot(connection) == before
            untimed = connection.execute(
                text(
                    "SELECT count(*) FROM news_item_tickers AS t JOIN news_items AS n "
                    "ON n.id = t.item_id WHERE t.published_at IS NULL "
                    "OR t.published_at <> n.published_at"
                )
            ).scalar()
        assert untimed == 0
        window = (LAST_NIGHT - timedelta(days=3), LAST_NIGHT)
        by_ticker = list_news(store, since=window[0], until=window[1], ticker="GAZP")
        expected = [
            row
            for row in list_news(store, since=window[0], until=window[1])
            if "GAZP" in row["tickers"]
        ]
        assert by_ticker == expected and by_ticker
        pending = [prompt.key for prompt in pending_prompts(store)]
        assert pending == sorted(
            key for key, status, *_ in before["prompts"] if status == "pending"
        )


# ---- the WAL after a run -----------------------------------------------------------------------


def test_a_run_truncates_the_wal_while_a_robot_stays_connected(feed_server, make_config):
    feed_server.add("/rss", body=sample("markets_ru.rss.xml"))
    config = make_config(feeds=[{"name": "rss", "url": feed_server.url("/rss")}])
    wal = Path(f"{config.database_path}-wal")
    with open_store(config.database_url):
        pass
    robot = connect_readonly(config.database_path)
    try:
        read_forecasts(robot)  # a robot that polls: connected, no transaction between polls
        with open_store(config.database_url) as store:
            report = ingest_feeds(config, store)
            assert sum(feed.items_new for feed in report.feeds) == 5
            assert wal.stat().st_size == 0  # the run's writes are in the database file
        assert wal.exists() and wal.stat().st_size == 0  # the robot keeps the file, empty
        assert len(list_news_readonly(robot)) == 5
    finally:
        robot.close()


def list_news_readonly(connection: sqlite3.Connection) -> list[tuple]:
    return connection.execute("SELECT title FROM news_items").fetchall()


def test_a_reader_holding_a_snapshot_delays_the_truncation_but_never_the_run(
    feed_server, make_config
):
    feed_server.add("/rss", body=sample("markets_ru.rss.xml"))
    config = make_config(feeds=[{"name": "rss", "url": feed_server.url("/rss")}])
    wal = Path(f"{config.database_path}-wal")
    with open_store(config.database_url) as store:
        reader = connect_readonly(config.database_path)
        reader.execute("BEGIN")  # a robot that leaves its read transaction open
        assert reader.execute("SELECT count(*) FROM news_items").fetchone() == (0,)
        try:
            report = ingest_feeds(config, store)  # not blocked, not "database is locked"
            assert sum(feed.items_new for feed in report.feeds) == 5
            assert wal.stat().st_size > 0
            assert reader.execute("SELECT count(*) FROM news_items").fetchone() == (0,)
            reader.execute("COMMIT")
            checkpoint = tidy_after_run(store)  # the next run's end
            assert checkpoint is not None and not checkpoint.busy
            assert wal.stat().st_size == 0
        finally:
            reader.close()


# ---- retention ---------------------------------------------------------------------------------


def recent_feed(now: datetime) -> bytes:
    items = "".join(
        f"<item><title>Сбербанк: новость {hours} ч назад</title><guid>recent-{hours}</guid>"
        f"<pubDate>{(now - timedelta(hours=hours)).strftime('%a, %d %b %Y %H:%M:%S +0000')}"
        "</pubDate></item>"
        for hours in (1, 5, 30)
    )
    channel = f"<channel><title>r</title>{items}</channel>"
    return f'<?xml version="1.0"?><rss version="2.0">{channel}</rss>'.encode()


def test_retention_prunes_only_news_older_than_its_days(feed_server, make_config):
    now = datetime.now(timezone.utc)
    feed_server.add("/rss", body=recent_feed(now))
    config = make_config(
        feeds=[{"name": "rss", "url": feed_server.url("/rss")}], retention={"news_days": 30}
    )
    with open_store(config.database_url) as store:
        history = history_rows()  # all of it from 2024: older than 30 days
        with store.transaction() as session:
            write_history(session, history)
        forecasts = read_forecasts(config.database_path)
        with store.engine.connect() as connection:
            prompts = snapshot(connection)["prompts"]
        report = ingest_feeds(config, store)

        assert report.pruned is not None
        assert report.pruned.items == len(history["news_items"])
        assert report.pruned.tickers == len(history["news_item_tickers"])
        assert report.pruned.bytes_freed > 0
        titles = [row["title"] for row in list_news(store)]
        assert titles == [f"Сбербанк: новость {hours} ч назад" for hours in (1, 5, 30)]
        assert read_forecasts(config.database_path) == forecasts  # forecasts are never pruned
        with store.engine.connect() as connection:
            assert snapshot(connection)["prompts"] == prompts


def test_retention_days_must_be_a_positive_integer(tmp_path):
    for bad in (0, "ninety"):
        with pytest.raises(PipelineConfigError, match=r"retention\.news_days"):
            load_config(write_config(tmp_path, retention={"news_days": bad}))
    with pytest.raises(PipelineConfigError, match=r"retention\.keep_forecasts: unknown key"):
        load_config(write_config(tmp_path, retention={"keep_forecasts": 1}))
