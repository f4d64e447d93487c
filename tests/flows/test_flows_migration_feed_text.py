"""Migration 0003_feed_text on SQLite and on a real PostgreSQL server.

A store is built at 0002 with rows as earlier versions wrote them (relative links keyed across
feeds, KOI8-R and windows-1251 titles decoded as Latin-1, a prompt naming the old keys); opening
it migrates to the head, and the next ingest of the same feeds stores nothing twice.
"""

from __future__ import annotations

import hashlib
import json

import pytest
from alembic import command
from alembic.config import Config as AlembicConfig
from sqlalchemy import text

from flows.sources.ingest import ingest_feeds
from flows.store.database import (
    MIGRATIONS_DIR,
    list_news,
    open_store,
    parse_database_url,
    postgres_engine,
    sqlite_engine,
)

GARBLED_KOI8 = "Как пережить новогоднюю ночь".encode("koi8-r").decode("latin-1")
GARBLED_CP1251 = "Сбербанк повысил ставки по вкладам".encode("cp1251").decode("cp1252")
GARBLED_UTF8 = "Газпром сократил добычу".encode().decode("latin-1")
HEBREW_AS_LATIN1 = "שלום עולם זהו מבחן של קידוד".encode("cp1255").decode("latin-1")
T = "2024-05-14T03:00:00Z"


def old_key(basis: str) -> str:
    return hashlib.sha256(basis.encode("utf-8")).hexdigest()


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request, tmp_path):
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'store.sqlite'}"
    return request.getfixturevalue("postgres_server").create_database()


def store_at_0002(url: str):
    """An engine on a store migrated only up to 0002_prompt_claims."""
    parsed = parse_database_url(url)
    engine = (
        sqlite_engine(url) if parsed.get_backend_name() == "sqlite" else postgres_engine(parsed)
    )
    config = AlembicConfig()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    with engine.connect() as connection:
        config.attributes["connection"] = connection
        command.upgrade(config, "0002_prompt_claims")
        connection.commit()
    return engine


def insert_old_rows(engine, feed_a: str, feed_b: str) -> dict[str, str]:
    keys = {
        "relative": old_key("link\nstory/1.html"),
        "guid": old_key("guid\na\ng-1"),
        "koi8": old_key("guid\na\ng-2"),
        "cp1251_text": old_key(f"text\nb\n{GARBLED_CP1251}\n"),
        "utf8": old_key("link\nhttps://x.example/utf8"),
        "hebrew": old_key("link\nhttps://x.example/he"),
        "duplicate": old_key("link\n../b/story/2.html"),
        "absolute": old_key("link\n" + feed_b.rsplit("/", 2)[0] + "/b/story/2.html"),
    }
    rows = [
        # key, feed, source, guid, title, summary, link
        ("relative", 1, "a", None, "Relative story", "", "story/1.html"),
        ("guid", 1, "a", "g-1", "Guid story", "", "img/../p.html"),
        ("koi8", 1, "a", "g-2", GARBLED_KOI8, "", "https://x.example/koi8"),
        ("cp1251_text", 2, "b", None, GARBLED_CP1251, "", None),
        ("utf8", 2, "b", None, GARBLED_UTF8, "", "https://x.example/utf8"),
        ("hebrew", 2, "b", None, HEBREW_AS_LATIN1, "", "https://x.example/he"),
        ("absolute", 2, "b", None, "Story two", "", feed_b.rsplit("/", 2)[0] + "/b/story/2.html"),
        ("duplicate", 1, "a", None, "Story two", "", "../b/story/2.html"),
    ]
    with engine.begin() as connection:
        for feed_id, (name, url) in enumerate((("a", feed_a), ("b", feed_b)), start=1):
            connection.execute(
                text("INSERT INTO feeds (id, name, url) VALUES (:id, :name, :url)"),
                {"id": feed_id, "name": name, "url": url},
            )
        for item_id, (key, feed_id, source, guid, title, summary, link) in enumerate(rows, 1):
            connection.execute(
                text(
                    "INSERT INTO news_items (id, dedup_key, feed_id, source, guid, title, summary,"
                    " link, published_at, published_estimated, fetched_at) VALUES (:id, :key,"
                    " :feed, :source, :guid, :title, :summary, :link, :t, false, :t)"
                ),
                {
                    "id": item_id,
                    "key": keys[key],
                    "feed": feed_id,
                    "source": source,
                    "guid": guid,
                    "title": title,
                    "summary": summary,
                    "link": link,
                    "t": T,
                },
            )
        connection.execute(
            text("INSERT INTO news_item_tickers (item_id, ticker) VALUES (8, 'SBER')")
        )
        connection.execute(
            text(
                "INSERT INTO prompts (key, template_name, template_version, template_hash,"
                " language, scope, as_of, text, token_count, max_new_tokens, sampling_json,"
                " item_keys_json, items_dropped, status, created_at, updated_at) VALUES"
                " ('p1', 't', 1, 'h', 'ru', 'market', '2024-05-14', 'x', 1, 1, '{}', :keys, 0,"
                " 'done', :t, :t)"
            ),
            {"keys": json.dumps([keys["relative"], keys["duplicate"]]), "t": T},
        )
    return keys


def test_migration_0003_repairs_mojibake_re_keys_relative_links_and_merges_duplicates(
    database_url, feed_server
):
    feed_a, feed_b = feed_server.url("/a/feed.xml"), feed_server.url("/b/feed.xml")
    engine = store_at_0002(database_url)
    keys = insert_old_rows(engine, feed_a, feed_b)
    engine.dispose()

    with open_store(database_url) as store:
        rows = {row["title"]: row for row in list_news(store)}
        with store.reading() as session:
            prompt_keys = json.loads(
                session.execute(text("SELECT item_keys_json FROM prompts")).scalar()
            )
            tickers = session.execute(text("SELECT count(*) FROM news_item_tickers")).scalar()

    root = feed_a.rsplit("/", 2)[0]
    relative = rows["Relative story"]
    assert relative["link"] == f"{root}/a/story/1.html"
    assert relative["dedup_key"] == old_key(f"link\n{root}/a/story/1.html")
    assert rows["Guid story"]["link"] == f"{root}/a/p.html"
    assert rows["Guid story"]["dedup_key"] == keys["guid"]  # keyed by guid: key unchanged
    # Repaired where the round trip shows; re-keyed when the text was the key.
    koi8 = rows["Как пережить новогоднюю ночь"]
    assert (koi8["text_status"], koi8["dedup_key"]) == ("repaired", keys["koi8"])
    cp1251 = rows["Сбербанк повысил ставки по вкладам"]
    assert cp1251["text_status"] == "repaired"
    assert cp1251["dedup_key"] == old_key("text\nb\nСбербанк повысил ставки по вкладам\n")
    assert rows["Газпром сократил добычу"]["text_status"] == "repaired"
    # No round trip fits: flagged, kept as it was, and out of prompts.
    assert rows[HEBREW_AS_LATIN1]["text_status"] == "garbled"
    # "../b/story/2.html" on feed a is the story feed b stored: one row left, the older one.
    (story_two,) = [row for row in rows.values() if row["title"] == "Story two"]
    assert story_two["dedup_key"] == keys["absolute"] and story_two["source"] == "b"
    assert tickers == 0  # the merged row's tickers went with it
    assert prompt_keys == [relative["dedup_key"], keys["absolute"]]
    assert len(rows) == 7


def test_after_migration_0003_the_next_ingest_stores_nothing_twice(
    database_url, feed_server, make_config
):
    body = (
        b'<?xml version="1.0"?><rss version="2.0"><channel><title>t</title>'
        b"<item><title>Relative story</title><link>story/1.html</link></item>"
        b"<item><title>Story two</title><link>../b/story/2.html</link></item>"
        b"</channel></rss>"
    )
    feed_server.add("/a/feed.xml", body=body)
    feed_a, feed_b = feed_server.url("/a/feed.xml"), feed_server.url("/b/feed.xml")
    engine = store_at_0002(database_url)
    insert_old_rows(engine, feed_a, feed_b)
    engine.dispose()

    config = make_config(database=database_url, feeds=[{"name": "a", "url": feed_a}])
    with open_store(database_url) as store:
        before = len(list_news(store))
        report = ingest_feeds(config, store)
        assert (report.feeds[0].items_seen, report.feeds[0].items_new) == (2, 0)
        assert len(list_news(store)) == before
