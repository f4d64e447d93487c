"""Turning a feed's bytes into normalised news items.

Owns parsing (the bytes decoded by ``flows.sources.encoding``, then feedparser; RSS and Atom),
normalisation (markup stripped from HTML fields while plain-text fields keep their literal
``<`` and ``>``, links made absolute against ``xml:base`` and the feed's base URL, times in UTC,
the fetch time when a feed gives none), matching items to watchlist tickers, and the stable
dedup key. A malformed feed that still yields items gives those items plus a ``problem``; one
that yields nothing is a ``FeedError``; one whose text cannot be trusted (no encoding reads it
plausibly) gives no items and ``text_untrusted``. It does not do HTTP and knows nothing of the
store.
"""

from __future__ import annotations

import calendar
import hashlib
import re
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from html import unescape
from html.parser import HTMLParser
from urllib.parse import urlsplit

import feedparser

from flows.config import WatchlistEntry
from flows.errors import FeedError
from flows.sources.encoding import decode_feed

MAX_SUMMARY_CHARS = 4000
# feedparser flags these as "bozo" although the feed parsed correctly. (It gets text already
# decoded to UTF-8, so neither should appear; the encoding's own problems come from decode_feed.)
_BENIGN_BOZO = (feedparser.CharacterEncodingOverride, feedparser.NonXMLContentType)
# How feedparser marks a field that is plain text (Atom type="text", most RSS titles); every
# other type (text/html, application/xhtml+xml) is markup.
PLAIN_TEXT = "text/plain"


@dataclass(frozen=True)
class NewsItem:
    source: str
    title: str
    summary: str
    link: str | None
    guid: str | None
    published_at: datetime
    published_estimated: bool  # True when the feed gave no time and the fetch time is used
    tickers: tuple[str, ...]
    dedup_key: str


@dataclass(frozen=True)
class ParsedFeed:
    title: str
    items: tuple[NewsItem, ...]
    problem: str | None  # set when the feed was malformed but still readable
    encoding: str = "utf-8"  # the codec its bytes were read with
    text_untrusted: bool = False  # no encoding reads it plausibly: items held back, see problem


class _TextExtractor(HTMLParser):
    _SKIP = frozenset({"script", "style"})
    _BLOCK = frozenset({"p", "br", "div", "li", "tr", "h1", "h2", "h3", "h4", "blockquote"})

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self._skipping = 0

    def handle_starttag(self, tag, attrs):
        if tag in self._SKIP:
            self._skipping += 1
        elif tag in self._BLOCK:
            self.parts.append(" ")

    def handle_endtag(self, tag):
        if tag in self._SKIP and self._skipping:
            self._skipping -= 1

    def handle_data(self, data):
        if not self._skipping:
            self.parts.append(data)


def strip_html(text: str) -> str:
    """Plain text of an HTML fragment: tags and scripts dropped, entities decoded, spaces folded."""
    if "<" not in text and "&" not in text:
        return " ".join(text.split())
    extractor = _TextExtractor()
    extractor.feed(text)
    extractor.close()
    return " ".join(unescape("".join(extractor.parts)).split())


# A word as ``re`` sees it; and a word character outside ASCII, Latin-1 letters and the basic
# Cyrillic block. Inside those, ``str.lower`` and ``re.IGNORECASE`` agree letter for letter;
# outside them ``re`` has equivalences ``lower`` lacks (dotless i, long s, the Kelvin sign,
# old Cyrillic letter forms), so such a text is matched by the plain scan.
_WORD = re.compile(r"\w+")
_EXOTIC = re.compile(r"[^\W\x00-\x7f\xc0-\xff\u0400-\u04ff]")
_SUFFIX_LETTERS = frozenset("абвгдеёжзийклмнопрстуфхцчшщъыьэюя")  # [а-яё], lower-cased
_MAX_SUFFIX_CHARS = 3  # the inflection a Cyrillic alias may carry


class TickerMatcher:
    """Finds watchlist tickers in text.

    A ticker matches as a whole word in capitals (``SBER``, ``$NVDA``); an alias matches as a
    whole word in any case, and a Cyrillic alias also with up to three more letters, so
    ``Сбербанк`` matches ``Сбербанка`` and ``Сбербанком``.

    Each ticker keeps its one regular expression (the rules above), but a text is read once:
    its lower-cased words are looked up in a table of the first word of every ticker and alias
    (and, for a one-word Cyrillic alias, the word less up to three final Cyrillic letters, its
    inflection). Only the tickers found there (a superset of the answer, usually none to
    three) run their expression. The answer is exactly that of running every expression over
    the text, in watchlist order.
    """

    def __init__(self, watchlist: Sequence[WatchlistEntry]):
        self._patterns = []
        self._by_word: dict[str, set[int]] = {}  # a name's first word, lower-cased
        self._by_stem: dict[str, set[int]] = {}  # a one-word Cyrillic alias, lower-cased
        self._always: set[int] = set()  # no plain first word: checked on every text
        for index, entry in enumerate(watchlist):
            parts = [rf"(?<![\w$])\$?{re.escape(entry.ticker)}(?!\w)"]
            for alias in entry.aliases:
                inflected = bool(re.search(r"[а-яё]", alias, re.IGNORECASE))
                suffix = r"[а-яё]{0,3}" if inflected else ""
                parts.append(rf"(?i:(?<!\w){re.escape(alias)}{suffix}(?!\w))")
                first = _WORD.search(alias)
                if inflected and first is not None and first.end() == len(alias):
                    self._by_stem.setdefault(first.group().lower(), set()).add(index)
            self._patterns.append((entry.ticker, re.compile("|".join(parts))))
            for name in (entry.ticker, *entry.aliases):
                first = _WORD.search(name)
                if first is None or _EXOTIC.search(name):
                    self._always.add(index)
                else:
                    self._by_word.setdefault(first.group().lower(), set()).add(index)

    def match(self, text: str) -> tuple[str, ...]:
        if _EXOTIC.search(text):
            candidates = range(len(self._patterns))
        else:
            candidates = sorted(self._candidates(set(_WORD.findall(text.lower()))))
        return tuple(
            ticker
            for ticker, pattern in (self._patterns[index] for index in candidates)
            if pattern.search(text)
        )

    def _candidates(self, words: set[str]) -> set[int]:
        found = set(self._always)
        for word in words:
            hits = self._by_word.get(word)
            if hits:
                found |= hits
            for cut in range(1, min(_MAX_SUFFIX_CHARS, len(word) - 1) + 1):
                if word[-cut] not in _SUFFIX_LETTERS:
                    break
                hits = self._by_stem.get(word[:-cut])
                if hits:
                    found |= hits
        return found


def dedup_key(source: str, guid: str | None, link: str | None, title: str, summary: str) -> str:
    """Stable identity of an item: its guid (within its feed), else its link, else its text.

    An absolute link is one story wherever it appears (a syndicated item is stored once); a
    link still relative (the feed gave no base to resolve it) only identifies it within its feed.
    """
    if guid:
        basis = f"guid\n{source}\n{guid.strip()}"
    elif link and is_absolute(link):
        basis = f"link\n{link.strip()}"
    elif link:
        basis = f"link\n{source}\n{link.strip()}"
    else:
        basis = f"text\n{source}\n{title}\n{summary}"
    return hashlib.sha256(basis.encode("utf-8")).hexdigest()


def is_absolute(link: str) -> bool:
    """True for a link with a scheme and a host (``https://x.ru/a``), or a ``mailto:``-like URI."""
    parts = urlsplit(link.strip())
    return bool(parts.scheme) and (bool(parts.netloc) or parts.scheme not in ("http", "https"))


def parse_feed(
    body: bytes,
    *,
    source: str,
    fetched_at: datetime,
    content_type: str = "",
    matcher: TickerMatcher | None = None,
    base_url: str | None = None,
    encoding: str | None = None,
    stored: Callable[[list[str]], Collection[str]] | None = None,
) -> ParsedFeed:
    """Parse one feed's bytes into items; raise ``FeedError`` when nothing usable is in them.

    ``base_url`` is what relative links resolve against when no ``xml:base`` says otherwise
    (the fetcher's ``FetchResponse.base_url``); ``encoding`` is the config's override.
    ``stored`` answers which of the items' dedup keys are stored already (ingest passes the
    store's): those items are returned unmatched (no tickers), since saving skips them anyway
    and matching is most of the cost of an item.
    """
    decoded = decode_feed(body, content_type=content_type, override=encoding)
    headers = {"content-type": "application/xml; charset=utf-8"}
    if base_url:
        headers["content-location"] = base_url
    try:
        parsed = feedparser.parse(decoded.text.encode("utf-8"), response_headers=headers)
    except Exception as exc:
        raise FeedError(f"parser failed: {exc.__class__.__name__}: {exc}") from exc
    problem = None
    if parsed.get("bozo") and not isinstance(parsed.get("bozo_exception"), _BENIGN_BOZO):
        problem = f"malformed feed: {_describe(parsed.get('bozo_exception'))}"
    if not parsed.entries:
        if problem:
            raise FeedError(problem)
        if not parsed.get("version"):
            raise FeedError("not an RSS or Atom feed")
    normalised = [
        _normalise(entry, source=source, fetched_at=fetched_at) for entry in parsed.entries
    ]
    normalised = [pair for pair in normalised if pair is not None]
    known = stored([item.dedup_key for item, _ in normalised]) if stored and normalised else ()
    items = [
        replace(item, tickers=matcher.match(text))
        if matcher and item.dedup_key not in known
        else item
        for item, text in normalised
    ]
    if parsed.entries and not items:
        problem = problem or "no entry had a title, summary or link"
    feed = parsed.get("feed") or {}
    title = _field_text(feed.get("title", ""), feed.get("title_detail"))
    if decoded.problem:
        # Garbled text stored once stays garbled (its dedup key is "seen"): hold the items back
        # until the encoding is fixed, and say how to fix it.
        held = f"{len(items)} items not stored" if items else "no items"
        reason = f"{decoded.problem} (set encoding: for this feed); {held}"
        problem = f"{reason}; {problem}" if problem else reason
        return ParsedFeed(title, (), problem, decoded.encoding, text_untrusted=True)
    return ParsedFeed(title, tuple(items), problem, decoded.encoding)


def _describe(exc: object) -> str:
    if exc is None:
        return "unknown problem"
    return str(exc).strip() or exc.__class__.__name__


def _field_text(value: str | None, detail) -> str:
    """A field as plain text: markup stripped from HTML, plain text taken literally."""
    if (detail or {}).get("type") == PLAIN_TEXT:
        return " ".join((value or "").split())
    return strip_html(value or "")


def _normalise(entry, *, source: str, fetched_at: datetime) -> tuple[NewsItem, str] | None:
    """The item (without tickers) and the text its tickers are matched in."""
    title = _field_text(entry.get("title"), entry.get("title_detail"))
    summary = _field_text(entry.get("summary"), entry.get("summary_detail"))
    if not summary and entry.get("content"):
        summary = _field_text(entry["content"][0].get("value"), entry["content"][0])
    summary = summary[:MAX_SUMMARY_CHARS]
    link = (entry.get("link") or "").strip() or None
    guid = (entry.get("id") or "").strip() or None
    if not (title or summary or link):
        return None
    published_at, estimated = fetched_at, True
    for field in ("published_parsed", "updated_parsed", "created_parsed"):
        moment = entry.get(field)
        if moment:
            published_at = datetime.fromtimestamp(calendar.timegm(moment), tz=timezone.utc)
            estimated = False
            break
    item = NewsItem(
        source=source,
        title=title or summary[:120],
        summary=summary,
        link=link,
        guid=guid,
        published_at=published_at,
        published_estimated=estimated,
        tickers=(),
        dedup_key=dedup_key(source, guid, link, title, summary),
    )
    return item, f"{title}\n{summary}"
