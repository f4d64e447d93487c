"""Feeds over real HTTP on loopback: good ones stored, each bad one recorded with its reason."""

from __future__ import annotations

import time
from datetime import datetime, timezone

import pytest
from flows_testkit import sample

from flows.config import WatchlistEntry
from flows.errors import FeedError
from flows.sources.feeds import TickerMatcher, dedup_key, parse_feed, strip_html
from flows.sources.fetcher import fetch
from flows.sources.ingest import ingest_feeds
from flows.store.database import fetch_history, list_news

TRUNCATED_RSS = b"""<?xml version="1.0" encoding="utf-8"?>
<rss version="2.0"><channel><title>Broken wire</title>
<item><title>Nvidia beats estimates</title><link>http://news.test/1</link></item>
<item><title>Apple & the rest</title><link>http://news.test/2</link></item>
<item><title>Third item, cut off</title><link>http://news.test/3"""

UNREADABLE = b'<?xml version="1.0"?><rss version="2.0"><channel><title>x</ti'
NO_DATES_RSS = """<?xml version="1.0" encoding="utf-8"?>
<rss version="2.0"><channel><title>No dates</title>
<item><title>Сбербанк без даты</title><description>Текст</description></item>
</channel></rss>""".encode()


def serve_everything(server):
    """One route per case the issue names; returns the feed list for the config."""
    server.add("/rss", body=sample("markets_ru.rss.xml"), etag='"rss-v1"')
    server.add(
        "/atom",
        body=sample("global_markets_en.atom.xml"),
        content_type="application/atom+xml",
        last_modified="Tue, 14 May 2024 02:20:00 GMT",
    )
    server.add("/cp1251", body=sample("birzha_cp1251.rss.xml"), content_type="text/xml")
    server.add("/truncated", body=TRUNCATED_RSS)
    server.add("/unreadable", body=UNREADABLE)
    server.add("/error", status=500)
    server.add("/hang", hang_s=5.0)
    server.add("/huge", body=b"<rss>" + b" " * 300_000 + b"</rss>")
    server.add("/huge-stream", body=b"<rss>" + b" " * 300_000 + b"</rss>", send_length=False)
    server.add("/html", body=b"<html><body>Hello</body></html>", content_type="text/html")
    names = ["rss", "atom", "cp1251", "truncated", "unreadable", "error", "hang"]
    names += ["huge", "huge-stream", "html"]
    feeds = [{"name": name, "url": server.url(f"/{name}")} for name in names]
    feeds.append({"name": "missing", "url": server.url("/missing")})
    for feed in feeds:
        if feed["name"] == "hang":
            feed["retries"] = 0
        if feed["name"].startswith("huge"):
            feed["max_bytes"] = 100_000
    return feeds


def test_good_feeds_stored_and_each_bad_one_named_with_its_reason(feed_server, make_config, store):
    config = make_config(feeds=serve_everything(feed_server))
    started = time.monotonic()
    report = ingest_feeds(config, store)
    assert time.monotonic() - started < 5.0
    by_feed = {row.feed: row for row in report.feeds}

    assert {name: by_feed[name].status for name in ("rss", "atom", "cp1251")} == dict.fromkeys(
        ("rss", "atom", "cp1251"), "ok"
    )
    assert (by_feed["rss"].items_new, by_feed["atom"].items_new, by_feed["cp1251"].items_new) == (
        5,
        4,
        3,
    )
    assert by_feed["truncated"].status == "partial"
    assert "malformed feed" in by_feed["truncated"].reason
    assert by_feed["truncated"].items_new == 3
    failures = {name: by_feed[name].reason for name in by_feed if by_feed[name].status == "failed"}
    assert set(failures) == {
        "unreadable",
        "error",
        "hang",
        "huge",
        "huge-stream",
        "html",
        "missing",
    }
    assert "malformed feed" in failures["unreadable"]
    assert failures["error"].startswith("HTTP 500")
    assert "timed out after 0.5 s" in failures["hang"]
    assert "max_bytes=100000" in failures["huge"]
    assert "max_bytes=100000" in failures["huge-stream"]
    assert "wrong content type 'text/html'" in failures["html"]
    assert failures["missing"].startswith("HTTP 404")
    assert by_feed["missing"].http_status == 404
    # Transient faults are retried (retries=1), permanent ones are not.
    assert feed_server.routes["/error"].requests == 2
    assert feed_server.routes["/html"].requests == 1

    history = {row["feed"]: row for row in fetch_history(store)}
    assert history["hang"]["status"] == "failed" and "timed out" in history["hang"]["reason"]
    assert len(list_news(store)) == 15


def test_cp1251_feed_decoded(feed_server, make_config, store):
    feed_server.add("/cp1251", body=sample("birzha_cp1251.rss.xml"), content_type="text/xml")
    config = make_config(feeds=[{"name": "birzha", "url": feed_server.url("/cp1251")}])
    ingest_feeds(config, store)
    titles = [row["title"] for row in list_news(store)]
    assert "ЦБ сохранил ключевую ставку на уровне 16%" in titles
    gazprom = next(row for row in list_news(store) if row["title"].startswith("Газпрому"))
    assert gazprom["tickers"] == ["GAZP"]


def test_repeated_ingest_adds_no_duplicates_and_honours_conditional_get(
    feed_server, make_config, store
):
    rss = feed_server.add("/rss", body=sample("markets_ru.rss.xml"), etag='"rss-v1"')
    atom = feed_server.add(
        "/atom",
        body=sample("global_markets_en.atom.xml"),
        content_type="application/atom+xml",
        last_modified="Tue, 14 May 2024 02:20:00 GMT",
    )
    plain = feed_server.add("/plain", body=sample("birzha_cp1251.rss.xml"))  # no validators
    feeds = [
        {"name": name, "url": feed_server.url(f"/{name}")} for name in ("rss", "atom", "plain")
    ]
    config = make_config(feeds=feeds)

    first = ingest_feeds(config, store)
    second = ingest_feeds(config, store)
    third = ingest_feeds(config, store)

    assert [row.items_new for row in first.feeds] == [5, 4, 3]
    assert [row.status for row in second.feeds] == ["not_modified", "not_modified", "ok"]
    assert [row.items_new for row in (*second.feeds, *third.feeds)] == [0] * 6
    assert len(list_news(store)) == 12
    assert (rss.not_modified, atom.not_modified, plain.not_modified) == (2, 2, 0)
    assert rss.headers_seen[1]["If-None-Match"] == '"rss-v1"'
    assert atom.headers_seen[1]["If-Modified-Since"] == "Tue, 14 May 2024 02:20:00 GMT"


def test_a_feed_turning_bad_loses_nothing_already_stored(feed_server, make_config, store):
    route = feed_server.add("/rss", body=sample("markets_ru.rss.xml"), etag='"v1"')
    config = make_config(feeds=[{"name": "rss", "url": feed_server.url("/rss")}])
    ingest_feeds(config, store)
    before = list_news(store)

    route.body, route.etag = UNREADABLE, '"v2"'
    report = ingest_feeds(config, store)
    assert report.feeds[0].status == "failed" and "malformed" in report.feeds[0].reason
    assert list_news(store) == before
    # The good fetch's validator is kept, so the next request is still conditional on it.
    route.body, route.etag = sample("markets_ru.rss.xml"), '"v1"'
    assert ingest_feeds(config, store).feeds[0].status == "not_modified"


def test_transient_error_retried_then_ok(feed_server):
    feed_server.add("/flaky", body=sample("markets_ru.rss.xml"), fail_first=1)
    response = fetch(feed_server.url("/flaky"), timeout_s=0.5, retries=2, backoff_s=0.01)
    assert response.http_status == 200 and response.attempts == 2


def test_unreachable_host_is_a_clear_error(feed_server):
    port = feed_server.httpd.server_port
    feed_server.httpd.server_close()  # nothing listens on this port any more
    with pytest.raises(FeedError, match="connection failed"):
        fetch(f"http://127.0.0.1:{port}/rss", timeout_s=0.5, retries=0)


def test_unknown_feed_name_is_an_error(make_config, store):
    config = make_config(feeds=[{"name": "rss", "url": "http://127.0.0.1:9/rss"}])
    with pytest.raises(FeedError, match="no feed named 'nope'"):
        ingest_feeds(config, store, only=["nope"])


def test_items_normalised():
    fetched_at = datetime(2024, 5, 14, 6, 0, tzinfo=timezone.utc)
    matcher = TickerMatcher([WatchlistEntry("SBER", ("Сбербанк",)), WatchlistEntry("NVDA", ())])
    parsed = parse_feed(
        sample("markets_ru.rss.xml"), source="ru", fetched_at=fetched_at, matcher=matcher
    )
    first = parsed.items[0]
    assert first.published_at == datetime(2024, 5, 14, 2, 30, tzinfo=timezone.utc)  # +03:00 -> UTC
    assert first.summary.startswith("Чистая прибыль Сбербанка по МСФО")  # <p>, <b> stripped
    assert "<" not in first.summary
    assert first.tickers == ("SBER",)
    assert first.link == "https://example.ru/markets/2024/05/14/sber-april"
    undated = parse_feed(NO_DATES_RSS, source="x", fetched_at=fetched_at, matcher=matcher).items[0]
    assert undated.published_at == fetched_at and undated.published_estimated
    assert undated.dedup_key == dedup_key("x", None, None, "Сбербанк без даты", "Текст")


def test_dedup_key_prefers_guid_then_link_then_text():
    assert dedup_key("a", "g1", "http://l", "t", "s") == dedup_key(
        "a", "g1", "http://other", "", ""
    )
    assert dedup_key("a", None, "http://l", "t", "s") == dedup_key("b", None, "http://l", "x", "y")
    assert dedup_key("a", None, None, "t", "s") != dedup_key("a", None, None, "t", "s2")


def test_ticker_matching_rules():
    matcher = TickerMatcher(
        [
            WatchlistEntry("SBER", ("Сбербанк", "Сбер")),
            WatchlistEntry("AAPL", ("Apple",)),
            WatchlistEntry("GAZP", ("Газпром",)),
        ]
    )
    assert matcher.match("Акции Сбербанка выросли") == ("SBER",)
    assert matcher.match("$AAPL and apple pie") == ("AAPL",)
    assert matcher.match("Pineapple sales; SBERBANKING") == ()
    assert matcher.match("Газпромнефть отчиталась") == ()  # another company, not an inflection
    assert matcher.match("газпромом и GAZP") == ("GAZP",)


def test_strip_html():
    assert strip_html("<p>A&nbsp;<b>bold</b></p><script>x()</script><p>B &amp; C</p>") == (
        "A bold B & C"
    )
