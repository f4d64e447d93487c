"""Feeds as they really come, over loopback HTTP: undeclared Russian encodings, plain-text
fields, relative links, link-only items; and migration 0003, which fixes what was stored before.
"""

from __future__ import annotations

import json
from datetime import datetime, timezone

import pytest
from flows_testkit import sample, write_config

from flows.commands.cli import main
from flows.config import load_config
from flows.errors import PipelineConfigError
from flows.prompting.rendering import render_prompts
from flows.sources.feeds import parse_feed
from flows.sources.ingest import ingest_feeds
from flows.store.database import feed_validators, fetch_history, list_news, open_store
from flows.store.models import Prompt

NEWS_RU = [
    ("Как пережить новогоднюю ночь", "Врачи советуют не смешивать напитки и выспаться заранее."),
    ("Сбербанк повысил ставки по вкладам", "Доходность годовых вкладов выросла до шестнадцати."),
    ("Газпром сократил добычу в апреле", "Компания объяснила снижение тёплой погодой в Европе."),
]


def russian_rss(encoding: str, *, declare: str | None = None, items=NEWS_RU) -> bytes:
    """An RSS feed in ``encoding``; its XML declaration names ``declare`` (or no encoding)."""
    declaration = f' encoding="{declare}"' if declare else ""
    entries = "".join(
        f"<item><title>{title}</title><description>{summary}</description>"
        f"<link>https://news.example.ru/{index}</link></item>"
        for index, (title, summary) in enumerate(items)
    )
    text = f'<?xml version="1.0"{declaration}?>\n<rss version="2.0"><channel><title>Лента</title>'
    return (text + entries + "</channel></rss>").encode(encoding)


def stored(store, source: str) -> list[tuple[str, str]]:
    rows = sorted(list_news(store, source=source), key=lambda row: row["link"] or "")
    return [(row["title"], row["summary"]) for row in rows]


@pytest.mark.parametrize("encoding", ["koi8-r", "windows-1251"])
@pytest.mark.parametrize("content_type", ["application/rss+xml", "text/xml"])
def test_an_undeclared_russian_feed_stores_the_right_cyrillic_text(
    encoding, content_type, feed_server, make_config, store
):
    feed_server.add("/feed", body=russian_rss(encoding), content_type=content_type)
    config = make_config(feeds=[{"name": "ru", "url": feed_server.url("/feed")}])

    report = ingest_feeds(config, store)

    assert (report.feeds[0].status, report.feeds[0].reason) == ("ok", None)
    assert stored(store, "ru") == NEWS_RU


@pytest.mark.parametrize(
    ("encoding", "content_type", "declare"),
    [
        ("koi8-r", "application/rss+xml; charset=windows-1251", None),
        ("windows-1251", "application/rss+xml", "koi8-r"),
        ("windows-1251", "application/rss+xml", "iso-8859-1"),
        ("koi8-r", "text/xml; charset=utf-8", None),
    ],
)
def test_a_wrong_declared_charset_gives_way_to_the_reading_that_makes_sense(
    encoding, content_type, declare, feed_server, make_config, store
):
    body = russian_rss(encoding, declare=declare)
    feed_server.add("/feed", body=body, content_type=content_type)
    config = make_config(feeds=[{"name": "ru", "url": feed_server.url("/feed")}])

    assert ingest_feeds(config, store).feeds[0].status == "ok"
    assert stored(store, "ru") == NEWS_RU


def test_text_no_encoding_reads_is_partial_stores_nothing_and_ingest_exits_3(
    feed_server, tmp_path, capsys
):
    noise = bytes(range(0x80, 0x100)) * 2  # no language in any single-byte encoding
    body = b'<rss version="2.0"><channel><item><title>' + noise + b"</title>"
    body += b"<link>https://x.example/1</link></item></channel></rss>"
    route = feed_server.add("/feed", body=body, content_type="application/rss+xml", etag='"1"')
    feeds = [{"name": "noise", "url": feed_server.url("/feed")}]
    path = write_config(tmp_path, feeds=feeds)

    code = main(["ingest", "--config", str(path), "--format", "json"])
    rows = json.loads(capsys.readouterr().out)

    assert code == 3
    assert rows[0]["status"] == "partial"
    assert "encoding not declared and not recognised" in rows[0]["reason"]
    assert "set encoding: for this feed" in rows[0]["reason"]
    assert "1 items not stored" in rows[0]["reason"]
    with open_store(load_config(path).database_url) as store:
        assert list_news(store) == []
        # Nothing stored, so no validator kept: the next run fetches in full again.
        assert feed_validators(store, "noise") == (None, None)
    main(["ingest", "--config", str(path)])
    assert route.not_modified == 0 and route.requests == 2


def test_the_config_encoding_is_used_whatever_the_feed_declares(feed_server, make_config, store):
    # Declared (wrongly) as UTF-8 and not valid UTF-8: the config's word is final.
    body = russian_rss("koi8-r", declare="utf-8")
    feed_server.add("/feed", body=body, content_type="application/rss+xml; charset=utf-8")
    feeds = [{"name": "ru", "url": feed_server.url("/feed"), "encoding": "koi8-r"}]

    assert ingest_feeds(make_config(feeds=feeds), store).feeds[0].status == "ok"
    assert stored(store, "ru") == NEWS_RU


def test_an_unknown_encoding_in_the_config_is_named(make_config):
    feeds = [{"name": "ru", "url": "https://x.example/rss", "encoding": "koi-9"}]
    with pytest.raises(PipelineConfigError, match=r"feeds\[0\]\.encoding: unknown encoding"):
        make_config(feeds=feeds)


ATOM_TEXT_AND_HTML = b"""<?xml version="1.0" encoding="utf-8"?>
<feed xmlns="http://www.w3.org/2005/Atom"><title type="text">Markup &lt;notes&gt;</title>
<id>urn:feed</id><updated>2024-05-14T03:00:00Z</updated>
<entry><id>urn:1</id><updated>2024-05-14T03:00:00Z</updated>
  <title type="text">History of the &lt;blink&gt; tag</title>
  <summary type="text">Use &lt;b&gt; for bold &amp; &lt;i&gt; for italics</summary></entry>
<entry><id>urn:2</id><updated>2024-05-14T03:00:00Z</updated>
  <title type="html">History of the &lt;blink&gt; tag</title>
  <summary type="html">&lt;p&gt;Use &lt;b&gt;bold&lt;/b&gt; here&lt;/p&gt;</summary></entry>
<entry><id>urn:3</id><updated>2024-05-14T03:00:00Z</updated>
  <title>Content only</title>
  <content type="text">a &lt; b and c &gt; d</content></entry>
<entry><id>urn:4</id><updated>2024-05-14T03:00:00Z</updated>
  <title type="xhtml"><div xmlns="http://www.w3.org/1999/xhtml">An <em>xhtml</em> title</div>
  </title></entry>
</feed>"""


def test_text_fields_keep_their_angle_brackets_and_html_fields_are_stripped(
    feed_server, make_config, store
):
    feed_server.add("/atom", body=ATOM_TEXT_AND_HTML, content_type="application/atom+xml")
    config = make_config(feeds=[{"name": "atom", "url": feed_server.url("/atom")}])
    ingest_feeds(config, store)

    by_key = {row["title"] + "|" + row["summary"] for row in list_news(store)}
    assert by_key == {
        "History of the <blink> tag|Use <b> for bold & <i> for italics",
        "History of the tag|Use bold here",
        "Content only|a < b and c > d",
        "An xhtml title|",
    }


def relative_rss(link: str, *, base: str = "") -> bytes:
    attribute = f' xml:base="{base}"' if base else ""
    return (
        f'<?xml version="1.0"?><rss version="2.0"><channel{attribute}><title>t</title>'
        f"<item><title>Story</title><link>{link}</link></item></channel></rss>"
    ).encode()


def test_the_same_relative_link_on_two_feeds_stores_two_absolute_items(
    feed_server, make_config, store
):
    feed_server.add("/a/feed.xml", body=relative_rss("story/1.html"))
    feed_server.add("/b/feed.xml", body=relative_rss("story/1.html"))
    feeds = [{"name": n, "url": feed_server.url(f"/{n}/feed.xml")} for n in ("a", "b")]

    report = ingest_feeds(make_config(feeds=feeds), store)

    assert [feed.items_new for feed in report.feeds] == [1, 1]
    assert sorted(row["link"] for row in list_news(store)) == [
        feed_server.url("/a/story/1.html"),
        feed_server.url("/b/story/1.html"),
    ]


def test_a_syndicated_story_with_one_absolute_link_is_stored_once(feed_server, make_config, store):
    feed_server.add("/a", body=relative_rss("https://wire.example/story/7"))
    feed_server.add("/b", body=relative_rss("https://wire.example/story/7"))
    feeds = [{"name": n, "url": feed_server.url(f"/{n}")} for n in ("a", "b")]

    report = ingest_feeds(make_config(feeds=feeds), store)

    assert [feed.items_new for feed in report.feeds] == [1, 0]


def test_xml_base_content_location_and_redirects_decide_what_links_resolve_against(
    feed_server, make_config, store
):
    feed_server.add("/based", body=relative_rss("s/1.html", base="https://base.example/news/"))
    feed_server.add(
        "/located",
        body=relative_rss("s/2.html"),
        headers={"Content-Location": "https://mirror.example/feeds/ru.xml"},
    )
    feed_server.add(
        "/relocated", body=relative_rss("s/3.html"), headers={"Content-Location": "/elsewhere/x"}
    )
    feed_server.add("/old", redirect_to=feed_server.url("/moved/here/feed.xml"))
    feed_server.add("/moved/here/feed.xml", body=relative_rss("s/4.html"))
    names = ("based", "located", "relocated", "old")
    feeds = [{"name": n, "url": feed_server.url(f"/{n}")} for n in names]

    report = ingest_feeds(make_config(feeds=feeds), store)

    assert [feed.status for feed in report.feeds] == ["ok"] * 4
    links = {row["source"]: row["link"] for row in list_news(store)}
    assert links == {
        "based": "https://base.example/news/s/1.html",
        "located": "https://mirror.example/feeds/s/2.html",
        "relocated": feed_server.url("/elsewhere/s/3.html"),
        "old": feed_server.url("/moved/here/s/4.html"),
    }


LINK_ONLY_RSS = """<?xml version="1.0"?><rss version="2.0"><channel><title>t</title>
<item><title>Сбербанк отчитался о прибыли</title><link>https://x.example/1</link>
  <pubDate>Tue, 14 May 2024 02:00:00 GMT</pubDate></item>
<item><link>https://x.example/2</link><pubDate>Tue, 14 May 2024 02:10:00 GMT</pubDate></item>
</channel></rss>""".encode()


def test_link_only_items_are_stored_marked_and_kept_out_of_prompts(
    feed_server, tmp_path, capsys, count_tokens
):
    feed_server.add("/rss", body=LINK_ONLY_RSS)
    prompts = tmp_path / "prompts"
    prompts.mkdir()
    (prompts / "list.yaml").write_text(
        "name: list\nversion: 1\nlanguage: ru\nscope: market\ndescription: every item\n"
        "items: {window_h: 24, max_items: 10}\n"
        'body: "{% for item in items %}- [{{ item.title }}] {{ item.link }}\\n{% endfor %}"\n',
        "utf-8",
    )
    path = write_config(
        tmp_path,
        feeds=[{"name": "rss", "url": feed_server.url("/rss")}],
        prompts_dir="prompts",
        templates=["list"],
    )
    assert main(["ingest", "--config", str(path)]) == 0
    capsys.readouterr()
    assert main(["news", "--config", str(path), "--format", "json", "--since", "2024-05-13"]) == 0
    news = json.loads(capsys.readouterr().out)
    assert [(row["link"], row["has_text"]) for row in news] == [
        ("https://x.example/2", False),
        ("https://x.example/1", True),
    ]

    config = load_config(path)
    with open_store(config.database_url) as store:
        as_of = datetime(2024, 5, 14, 6, 0, tzinfo=timezone.utc)
        (outcome,) = render_prompts(config, store, count_tokens=count_tokens, as_of=as_of)
        text = store_prompt_text(store, outcome.prompt_key)
    assert outcome.items_used == 1
    assert text == "- [Сбербанк отчитался о прибыли] https://x.example/1\n"


def store_prompt_text(store, key: str) -> str:
    with store.reading() as session:
        return session.get(Prompt, key).text


def test_a_false_declaration_with_no_better_reading_is_recorded_as_partial(
    feed_server, make_config, store
):
    noise = bytes(range(0x80, 0x100))
    body = b'<rss version="2.0"><channel><item><title>' + noise + b"</title></item></channel></rss>"
    feed_server.add("/feed", body=body)  # declared UTF-8 (the route's Content-Type): it is not
    ingest_feeds(make_config(feeds=[{"name": "n", "url": feed_server.url("/feed")}]), store)
    (row,) = fetch_history(store)
    assert row["status"] == "partial"
    assert row["reason"].startswith("bytes are not valid utf-8 and no other encoding fits")
    assert (row["items_seen"], row["items_new"]) == (0, 0)


def test_the_declared_cp1251_sample_feed_is_read_as_declared():
    fetched_at = datetime(2024, 5, 14, 6, 0, tzinfo=timezone.utc)
    parsed = parse_feed(sample("birzha_cp1251.rss.xml"), source="b", fetched_at=fetched_at)
    assert (parsed.encoding, parsed.problem) == ("cp1251", None)
    assert "ЦБ сохранил ключевую ставку на уровне 16%" in [item.title for item in parsed.items]
