"""A year of nights: a year of pipeline use built in a real store, and what reads and writes cost.

The year is synthetic but shaped like the real thing: a 200-ticker watchlist (real MOEX and US
names first, then made-up ones), Russian and English headlines that name those companies in
their inflected forms, ~400 forecasts a night for 249 trading nights, and news arriving at a
fixed rate (``--news-per-day``), so that a bigger ``--items`` means more history *before* the
render window, never more news inside it. The store is created by the real migrations
(``open_store``); rows go in with bulk ``executemany`` on a plain ``sqlite3`` connection, in the
schema those migrations made (a column the schema lacks is simply not filled).

Measured, per size (``--sizes FORECASTS:ITEMS,...``):

- the robot's reads through ``flows.store.robot`` (latest 100; one ticker, newest 100; since
  yesterday; one ticker since a date; one forecast by id), warm (median of repeats on one open
  connection) and cold (the file's pages dropped from the OS page cache with
  ``posix_fadvise(DONTNEED)`` on the database and its WAL, then a fresh read-only connection);
  each with SQLite's ``EXPLAIN QUERY PLAN``;
- render: ``list_news`` for every ticker over the 24 h window, and ``render_run`` of the two
  ticker templates over the watchlist (400 prompts); token counting by the real YaLM tokenizer
  when ``--tokenizer`` (or ``$YALM_VOCAB``) names one, else a word count;
- ingest: items served by a loopback HTTP server, 200-ticker watchlist, per item: all new, then
  the same items again (all duplicates), and feedparser alone for scale;
- the database file and its WAL: size per night, WAL left on disk after a run.

Example: ``python benchmarks/year_of_nights.py --sizes 10k:100k,100k:100k,100k:3M``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import sqlite3
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from xml.sax.saxutils import escape

import yaml

from flows.config import load_config
from flows.prompting.rendering import render_run
from flows.sources.feeds import parse_feed
from flows.sources.ingest import ingest_feeds
from flows.store import database
from flows.store.database import list_news, open_store
from flows.store.robot import COLUMNS, VIEW, connect_readonly, read_forecasts

NIGHTS = 249
LAST_NIGHT = datetime(2024, 5, 14, tzinfo=timezone.utc)  # a Tuesday
TEMPLATES = ("ticker_outlook_ru", "ticker_outlook_en")
FEEDS = ("interfax", "rbc", "kommersant", "vedomosti", "cbr", "cnbc", "marketwatch", "yahoo")
WARM_REPEATS = 15
COLD_REPEATS = 3

# ---- the watchlist -----------------------------------------------------------------------------

REAL = [
    ("SBER", ["Сбербанк", "Сбер", "Sberbank"]), ("GAZP", ["Газпром", "Gazprom"]),
    ("LKOH", ["Лукойл", "Lukoil"]), ("YDEX", ["Яндекс", "Yandex"]),
    ("ROSN", ["Роснефть", "Rosneft"]), ("GMKN", ["Норникель", "Норильский никель", "Nornickel"]),
    ("NVTK", ["Новатэк", "Novatek"]), ("TATN", ["Татнефть", "Tatneft"]),
    ("MGNT", ["Магнит", "Magnit"]), ("MTSS", ["МТС", "MTS"]), ("ALRS", ["Алроса", "Alrosa"]),
    ("CHMF", ["Северсталь", "Severstal"]), ("NLMK", ["НЛМК", "NLMK"]), ("MAGN", ["ММК", "MMK"]),
    ("PLZL", ["Полюс", "Polyus"]), ("VTBR", ["ВТБ", "VTB"]),
    ("MOEX", ["Мосбиржа", "Московская биржа", "Moscow Exchange"]),
    ("AFLT", ["Аэрофлот", "Aeroflot"]), ("PHOR", ["ФосАгро", "PhosAgro"]),
    ("RUAL", ["Русал", "Rusal"]), ("SNGS", ["Сургутнефтегаз", "Surgutneftegas"]),
    ("T", ["Т-Банк", "Тинькофф", "Tinkoff"]), ("OZON", ["Озон", "Ozon"]), ("PIKK", ["ПИК", "PIK"]),
    ("IRAO", ["Интер РАО", "Inter RAO"]), ("HYDR", ["РусГидро", "RusHydro"]),
    ("FEES", ["Россети", "Rosseti"]), ("AFKS", ["АФК Система", "Sistema"]),
    ("RTKM", ["Ростелеком", "Rostelecom"]), ("SMLT", ["Самолет", "Samolet"]),
    ("POSI", ["Позитив", "Positive Technologies"]), ("FIVE", ["X5", "Пятерочка"]),
    ("TRNFP", ["Транснефть", "Transneft"]), ("BANE", ["Башнефть", "Bashneft"]),
    ("MTLR", ["Мечел", "Mechel"]), ("UPRO", ["Юнипро", "Unipro"]), ("VKCO", ["VK", "ВК"]),
    ("FLOT", ["Совкомфлот", "Sovcomflot"]), ("MVID", ["М.Видео", "M.Video"]),
    ("BELU", ["Белуга", "Beluga"]), ("AAPL", ["Apple"]), ("NVDA", ["Nvidia"]),
    ("MSFT", ["Microsoft"]), ("AMZN", ["Amazon"]), ("GOOGL", ["Alphabet", "Google"]),
    ("META", ["Meta Platforms", "Facebook"]), ("TSLA", ["Tesla"]), ("JPM", ["JPMorgan"]),
    ("BRK.B", ["Berkshire Hathaway"]), ("XOM", ["Exxon Mobil", "Exxon"]), ("NFLX", ["Netflix"]),
    ("AMD", ["Advanced Micro Devices"]), ("INTC", ["Intel"]), ("BA", ["Boeing"]),
    ("NKE", ["Nike"]), ("KO", ["Coca-Cola"]), ("PFE", ["Pfizer"]), ("DIS", ["Disney"]),
    ("WMT", ["Walmart"]), ("V", ["Visa"]), ("MA", ["Mastercard"]), ("ORCL", ["Oracle"]),
]  # fmt: skip
RU_STEMS = ("Урал", "Сибир", "Волг", "Дон", "Кам", "Балт", "Амур", "Север", "Енисей", "Алтай")
RU_ENDS = ("нефть", "газ", "энерго", "хим", "сталь", "транс", "банк", "агро", "телеком", "фарм")
LATIN = {"Урал": "Ural", "Сибир": "Sibir", "Волг": "Volg", "Дон": "Don", "Кам": "Kam",
         "Балт": "Balt", "Амур": "Amur", "Север": "Sever", "Енисей": "Enisey", "Алтай": "Altay",
         "нефть": "neft", "газ": "gaz", "энерго": "energo", "хим": "khim", "сталь": "stal",
         "транс": "trans", "банк": "bank", "агро": "agro", "телеком": "telecom",
         "фарм": "farm"}  # fmt: skip
US_NAMES = ("Northwind", "Bluestone", "Crescent", "Ironwood", "Lakeshore", "Pinecrest", "Redfield",
            "Silverline", "Summit", "Westbrook", "Harbor", "Granite", "Evergreen", "Falcon",
            "Keystone", "Oakmont", "Riverside", "Sterling", "Trident", "Vanguard")  # fmt: skip
US_ENDS = ("Energy", "Health", "Systems", "Foods", "Motors")


def watchlist(count: int) -> list[tuple[str, list[str]]]:
    """``count`` tickers: the real names first, then made-up Russian and US companies."""
    entries, seen = list(REAL), {ticker for ticker, _ in REAL}
    made_up = [(stem, end) for end in RU_ENDS for stem in RU_STEMS]
    us = [(name, end) for end in US_ENDS for name in US_NAMES]
    while len(entries) < count and (made_up or us):
        if made_up and (len(entries) % 3 or not us):
            stem, end = made_up.pop(0)
            latin = (LATIN[stem] + LATIN[end]).capitalize()
            ticker = (LATIN[stem][:2] + LATIN[end][:2]).upper()
            aliases = [stem + end, latin]
        else:
            name, end = us.pop(0)
            ticker, aliases = (name[:3] + end[0]).upper(), [f"{name} {end}"]
        while ticker in seen:
            ticker = ticker[:-1] + chr(ord(ticker[-1]) % 26 + 65)
        seen.add(ticker)
        entries.append((ticker, aliases))
    return entries[:count]


# ---- headlines ---------------------------------------------------------------------------------

_CYRILLIC = set("абвгдеёжзийклмнопрстуфхцчшщъыьэюя")


def cyrillic(text: str) -> bool:
    return any(char in _CYRILLIC for char in text.lower())


def ru_forms(name: str) -> dict[str, str]:
    """Nominative, genitive, dative, instrumental, prepositional, as headlines inflect them."""
    last = name[-1]
    if not cyrillic(name) or not last.isalpha() or last.isupper() or last in "оеиэю":
        return dict.fromkeys(("nom", "gen", "dat", "ins", "pre"), name)  # indeclinable
    if last == "ь":
        stem = name[:-1]
        return {"nom": name, "gen": stem + "и", "dat": stem + "и", "ins": name + "ю",
                "pre": stem + "и"}  # fmt: skip
    if last == "а":
        stem = name[:-1]
        return {"nom": name, "gen": stem + "ы", "dat": stem + "е", "ins": stem + "ой",
                "pre": stem + "е"}  # fmt: skip
    if last == "й":
        stem = name[:-1]
        return {"nom": name, "gen": stem + "я", "dat": stem + "ю", "ins": stem + "ем",
                "pre": stem + "е"}  # fmt: skip
    return {"nom": name, "gen": name + "а", "dat": name + "у", "ins": name + "ом",
            "pre": name + "е"}  # fmt: skip


RU_TITLES = (
    "Акции {gen} выросли на {pct}% после публикации отчетности",
    "{nom} увеличил чистую прибыль по МСФО на {pct}%",
    "Совет директоров {gen} рекомендовал дивиденды {rub} руб. на акцию",
    "Аналитики повысили целевую цену {gen} до {price} руб.",
    "ФАС одобрила сделку с {ins}",
    "В {pre} сменился финансовый директор",
    "{nom} разместит облигации на {bn} млрд руб.",
    "Индекс Мосбиржи снизился на {pct}%, лидеры падения — {nom} и {nom2}",
    "Минфин и {nom} обсуждают налог на сверхприбыль",
    "${ticker}: {nom} отчитался о выручке {bn} млрд руб.",
    "Санкции ударили по {dat}: экспорт сократился на {pct}%",
)
EN_TITLES = (
    "{nom} shares rise {pct}% after earnings beat",
    "{nom} to buy back ${bn} billion of stock",
    "{ticker} falls as {nom} cuts full-year guidance",
    "Analysts raise {nom}'s price target to ${price}",
    "{nom} and {nom2} lead tech rally as yields ease",
    "Regulators open probe into {nom} pricing",
)
RU_GENERAL = (
    "ЦБ сохранил ключевую ставку на уровне {pct}%",
    "Рубль укрепился к доллару на фоне налогового периода",
    "Инфляция в России за неделю составила {pct}%",
    "Индекс Мосбиржи завершил торги ростом на {pct}%",
)
EN_GENERAL = (
    "Fed holds rates steady, signals patience on cuts",
    "Oil prices climb {pct}% on supply worries",
    "Treasury yields slip after soft jobs report",
)
RU_SUMMARY = (
    "Компания сообщила об этом в раскрытии на сайте биржи. Аналитики ожидали более скромных "
    "результатов, однако рост выручки и снижение долговой нагрузки поддержали котировки.",
    "По данным агентства, решение будет рассмотрено на годовом собрании акционеров в июне. "
    "Инвесторы отыгрывают новость покупками, объем торгов вдвое выше среднего.",
)
EN_SUMMARY = (
    "The company said in a statement that demand remained strong through the quarter, while "
    "margins narrowed on higher input costs. Shares moved in premarket trading.",
    "People familiar with the matter said a decision could come as soon as next month; the "
    "company declined to comment. Analysts see limited impact on earnings.",
)


@dataclass
class Headlines:
    """Draws headlines naming chosen tickers, in Russian (60 %) or English."""

    entries: list[tuple[str, list[str]]]
    rng: random.Random
    ru_names: dict[str, list[dict[str, str]]] = field(default_factory=dict)
    en_names: dict[str, list[str]] = field(default_factory=dict)

    def __post_init__(self):
        for ticker, aliases in self.entries:
            ru = [ru_forms(alias) for alias in aliases if cyrillic(alias)]
            en = [alias for alias in aliases if not cyrillic(alias)] or [ticker]
            self.ru_names[ticker] = ru or [ru_forms(en[0])]
            self.en_names[ticker] = en

    def draw(self, tickers: list[str]) -> tuple[str, str]:
        rng = self.rng
        numbers = {"pct": f"{rng.uniform(0.1, 9.9):.1f}", "rub": f"{rng.uniform(1, 40):.2f}",
                   "price": rng.randrange(50, 900), "bn": rng.randrange(2, 90)}  # fmt: skip
        russian = rng.random() < 0.6
        if not tickers:
            title = rng.choice(RU_GENERAL if russian else EN_GENERAL).format(**numbers)
        elif russian:
            forms = rng.choice(self.ru_names[tickers[0]])
            other = rng.choice(self.ru_names[tickers[-1]])["nom"]
            title = rng.choice(RU_TITLES).format(ticker=tickers[0], nom2=other, **forms, **numbers)
        else:
            name, other = rng.choice(self.en_names[tickers[0]]), self.en_names[tickers[-1]][0]
            title = rng.choice(EN_TITLES).format(nom=name, nom2=other, ticker=tickers[0], **numbers)
        summary = rng.choice(RU_SUMMARY if russian else EN_SUMMARY)
        if len(tickers) > 2:  # the third company is named in the summary
            summary += f" Также упоминается {self.ru_names[tickers[1]][0]['nom']}."
        return title, summary


# ---- building the year -------------------------------------------------------------------------


def parse_count(text: str) -> int:
    text = text.strip().lower()
    scale = {"k": 1_000, "m": 1_000_000}.get(text[-1:], 1)
    return int(float(text.rstrip("km")) * scale)


def nights_ending(last: datetime, count: int) -> list[datetime]:
    nights, day = [], last
    while len(nights) < count:
        if day.weekday() < 5:
            nights.append(day)
        day -= timedelta(days=1)
    return nights[::-1]


def stamp(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def item_key(index: int) -> str:
    """A 64-character key like the store's, led by the index so that keys sort in insertion
    order: the unique index is appended to, not written at random (a bulk-load shortcut; no
    measured read depends on the keys' order)."""
    return f"{index:012x}" + hashlib.sha256(f"bench\nitem\n{index}".encode()).hexdigest()[:52]


@dataclass
class Year:
    path: Path
    forecasts: int
    items: int
    entries: list[tuple[str, list[str]]]
    nights: list[datetime]
    news_end: datetime
    build_s: float = 0.0
    sample_forecast_id: int = 0


def _columns(connection: sqlite3.Connection, table: str) -> list[str]:
    return [row[1] for row in connection.execute(f"PRAGMA table_info({table})")]


def _insert(connection, table: str, rows: list[dict], columns: list[str]) -> None:
    if not rows:
        return
    names = [name for name in columns if name in rows[0]]
    marks = ", ".join("?" for _ in names)
    connection.executemany(
        f"INSERT INTO {table} ({', '.join(names)}) VALUES ({marks})",
        [tuple(row[name] for name in names) for row in rows],
    )


def build_year(path: Path, *, forecasts: int, items: int, tickers: int, news_per_day: int,
               seed: int) -> Year:  # fmt: skip
    started = time.perf_counter()
    rng = random.Random(seed)
    entries = watchlist(tickers)
    year = Year(path, forecasts, items, entries, nights_ending(LAST_NIGHT, NIGHTS),
                news_end=LAST_NIGHT + timedelta(hours=2, minutes=59))  # fmt: skip
    with open_store(f"sqlite:///{path}"):  # the real migrations, nothing else
        pass
    connection = sqlite3.connect(path, isolation_level=None)
    connection.execute("PRAGMA journal_mode = DELETE")  # bulk load without a WAL the size of it
    connection.execute("PRAGMA synchronous = OFF")
    connection.execute("PRAGMA cache_size = -1000000")
    columns = {table: _columns(connection, table) for table in
               ("runs", "feeds", "fetches", "news_items", "news_item_tickers", "prompts",
                "generations")}  # fmt: skip
    connection.execute("BEGIN")
    _insert(connection, "feeds", [
        {"id": index + 1, "name": name, "url": f"https://{name}.example/rss", "last_status": "ok"}
        for index, name in enumerate(FEEDS)
    ], columns["feeds"])  # fmt: skip
    _build_news(connection, year, rng, columns, news_per_day)
    _build_forecasts(connection, year, rng, columns, news_per_day)
    connection.execute("COMMIT")
    connection.execute("PRAGMA journal_mode = WAL")
    connection.close()
    year.build_s = time.perf_counter() - started
    return year


NEWS_COLUMNS = ("id", "dedup_key", "feed_id", "source", "guid", "title", "summary", "link",
                "published_at", "published_estimated", "fetched_at")  # fmt: skip
HEADLINE_POOL = 20_000  # distinct stories; items draw from them (wires repeat stories too)


def _build_news(connection, year: Year, rng: random.Random, columns, news_per_day: int) -> None:
    """Items as tuples, stories from a pool, times formatted by hand: 3M items in about a
    minute of Python instead of ten (``datetime.strftime`` and fresh headlines per item were
    most of it)."""
    headlines = Headlines(year.entries, rng)
    symbols = [ticker for ticker, _ in year.entries]
    weights = [1 / rank for rank in range(1, len(symbols) + 1)]  # Zipf: SBER most, then down
    cumulative = [sum(weights[: index + 1]) for index in range(len(weights))]
    stories = []
    for _ in range(HEADLINE_POOL):
        count = rng.choices((0, 1, 2, 3), (35, 45, 15, 5))[0]
        chosen = tuple(dict.fromkeys(rng.choices(symbols, cum_weights=cumulative, k=count)))
        stories.append((chosen, *headlines.draw(list(chosen))))
    end_s = int(year.news_end.timestamp())
    step_s = 86_400 / news_per_day
    tag_time = "published_at" in columns["news_item_tickers"]
    tag_sql = "INSERT INTO news_item_tickers (item_id, ticker{}) VALUES (?, ?{})".format(
        ", published_at" if tag_time else "", ", ?" if tag_time else ""
    )
    item_sql = f"INSERT INTO news_items ({', '.join(NEWS_COLUMNS)}) VALUES ({', '.join('?' * 11)})"
    days: dict[int, str] = {}
    items, tags = [], []
    for index in range(year.items):
        moment_s = end_s - int((year.items - 1 - index) * step_s) - int(rng.random() * 120)
        published, fetched = _fast_stamp(moment_s, days), _fast_stamp(moment_s + 300, days)
        chosen, title, summary = stories[int(rng.random() * HEADLINE_POOL)]
        feed = int(rng.random() * len(FEEDS))
        link = f"https://{FEEDS[feed]}.example/news/{index}"
        items.append((index + 1, item_key(index), feed + 1, FEEDS[feed], link, title, summary,
                      link, published, 0, fetched))  # fmt: skip
        for ticker in chosen:
            tags.append((index + 1, ticker, published) if tag_time else (index + 1, ticker))
        if len(items) >= 50_000:
            connection.executemany(item_sql, items)
            connection.executemany(tag_sql, tags)
            items, tags = [], []
    connection.executemany(item_sql, items)
    connection.executemany(tag_sql, tags)


def _fast_stamp(epoch_s: int, days: dict[int, str]) -> str:
    day, second = divmod(epoch_s, 86_400)
    prefix = days.get(day)
    if prefix is None:
        prefix = days[day] = time.strftime("%Y-%m-%dT", time.gmtime(day * 86_400))
    hours, rest = divmod(second, 3600)
    return f"{prefix}{hours:02d}:{rest // 60:02d}:{rest % 60:02d}Z"


def _item_index_at(year: Year, moment: datetime, news_per_day: int) -> int:
    behind = (year.news_end - moment).total_seconds() * news_per_day / 86_400
    return max(0, min(year.items - 1, int(year.items - 1 - behind)))


def _build_forecasts(connection, year: Year, rng: random.Random, columns, news_per_day) -> None:
    headlines = Headlines(year.entries, rng)
    pool = [" ".join(headlines.draw([ticker])) for ticker, _ in year.entries for _ in range(10)]
    token_pool = [json.dumps([rng.randrange(128_000) for _ in range(200)]) for _ in range(200)]
    combos = [(template, ticker) for ticker, _ in year.entries for template in TEMPLATES]
    combos.append(("morning_brief_ru", None))
    per_night, extra = divmod(year.forecasts, len(year.nights))
    model_hash, code = "m" * 64, "bench-year"
    run_id, generation_id = 0, 0
    for night_index, night in enumerate(year.nights):
        count = per_night + (night_index < extra)
        as_of = night.date().isoformat()
        runs = []
        for kind, hour in (("ingest", 0), ("render", 1), ("generate", 2)):
            run_id += 1
            runs.append({"id": run_id, "kind": kind, "status": "ok",
                         "started_at": stamp(night + timedelta(hours=hour)),
                         "finished_at": stamp(night + timedelta(hours=hour, minutes=50)),
                         "details_json": "{}", "code_version": code})  # fmt: skip
        _insert(connection, "runs", runs, columns["runs"])
        render_run, generate_run = run_id - 1, run_id
        newest = _item_index_at(year, night, news_per_day)
        oldest = _item_index_at(year, night - timedelta(days=1), news_per_day)
        prompts, generations = [], []
        for slot in range(count):
            template, ticker = combos[slot % len(combos)]
            key = hashlib.sha256(f"bench\nprompt\n{as_of}\n{slot}".encode()).hexdigest()
            keys = [item_key(rng.randint(oldest, newest)) for _ in range(20)]
            status = "failed" if rng.random() < 0.01 else "done"
            created = night + timedelta(hours=1, seconds=slot)
            text = f"Утренний обзор аналитика, {as_of}. Компания: {ticker}.\n" + "\n- ".join(
                rng.sample(pool, 12)
            )
            prompts.append({
                "key": key, "template_name": template, "template_version": 1,
                "template_hash": "h" * 64, "language": template[-2:], "scope":
                "ticker" if ticker else "market", "ticker": ticker, "as_of": as_of, "text": text,
                "token_count": 700, "max_new_tokens": 200,
                "sampling_json": '{"max_new_tokens":200,"temperature":0.6}',
                "item_keys_json": json.dumps(keys), "items_dropped": 0, "status": status,
                "error": "CUDA out of memory" if status == "failed" else None, "run_id": render_run,
                "created_at": stamp(created), "updated_at": stamp(created),
                "claimed_by": "gpu-host:0",
            })  # fmt: skip
            if status != "done":
                continue
            generation_id += 1
            generated = night + timedelta(hours=2, seconds=slot * 15)
            generations.append({
                "id": generation_id, "prompt_key": key, "run_id": generate_run,
                "text": " ".join(rng.sample(pool, 4)), "token_ids_json": rng.choice(token_pool),
                "prompt_tokens": 700, "new_tokens": 200, "finish_reason": "length",
                "model_manifest_hash": model_hash, "template_name": template,
                "template_version": 1, "template_hash": "h" * 64,
                "sampling_json": '{"max_new_tokens":200,"temperature":0.6}',
                "timings_json": '{"decode_s":80.0,"prefill_s":6.0}', "tokens_per_s": 2.5,
                "code_version": code, "created_at": stamp(generated),
            })  # fmt: skip
        _insert(connection, "prompts", prompts, columns["prompts"])
        _insert(connection, "generations", generations, columns["generations"])
        if night_index == len(year.nights) // 2 and generations:
            year.sample_forecast_id = generations[len(generations) // 2]["id"]


# ---- measuring ---------------------------------------------------------------------------------


class RecordingConnection(sqlite3.Connection):
    """A read-only sqlite3 connection that remembers the last statement and its parameters."""

    last: tuple[str, tuple] = ("", ())

    def execute(self, sql, parameters=(), /):
        self.last = (sql, tuple(parameters))
        return super().execute(sql, parameters)


def open_recording(path: Path) -> RecordingConnection:
    uri = f"file:{path.resolve()}?mode=ro"
    return sqlite3.connect(uri, uri=True, factory=RecordingConnection)


def drop_page_cache(path: Path) -> None:
    """Evict the database's pages from the OS page cache (clean pages only; we sync first)."""
    for name in (path, Path(f"{path}-wal")):
        if name.exists():
            descriptor = os.open(name, os.O_RDONLY)
            try:
                os.fsync(descriptor)
                os.posix_fadvise(descriptor, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(descriptor)


def robot_reads(year: Year) -> list[tuple[str, object]]:
    latest = max(year.nights) + timedelta(hours=2)
    yesterday_noon = max(year.nights) - timedelta(hours=12)  # the last night's forecasts
    columns = ", ".join(COLUMNS)
    by_id = f"SELECT {columns} FROM {VIEW} WHERE forecast_id = ?"
    return [
        ("latest 100", lambda db: read_forecasts(db, limit=100)),
        ("one ticker, newest 100", lambda db: read_forecasts(db, ticker="SBER", limit=100)),
        ("since yesterday noon", lambda db: read_forecasts(db, since=yesterday_noon)),
        ("one ticker since a date",
         lambda db: read_forecasts(db, ticker="SBER", since=latest - timedelta(days=30))),
        ("one forecast by id",
         lambda db: db.execute(by_id, (year.sample_forecast_id,)).fetchall()),
    ]  # fmt: skip


def query_plan(connection: sqlite3.Connection, sql: str, parameters: tuple) -> str:
    rows = connection.execute(f"EXPLAIN QUERY PLAN {sql}", parameters).fetchall()
    return "; ".join(row[-1] for row in rows)


def measure_reads(year: Year) -> list[dict]:
    results = []
    for name, read in robot_reads(year):
        connection = open_recording(year.path)
        rows = len(read(connection))
        plan = query_plan(connection, *connection.last)
        warm = []
        for _ in range(WARM_REPEATS):
            started = time.perf_counter()
            read(connection)
            warm.append(time.perf_counter() - started)
        connection.close()
        cold = []
        for _ in range(COLD_REPEATS):
            drop_page_cache(year.path)
            started = time.perf_counter()
            fresh = connect_readonly(year.path)
            read(fresh)
            fresh.close()
            cold.append(time.perf_counter() - started)
        results.append({"read": name, "rows": rows, "warm_ms": statistics.median(warm) * 1e3,
                        "cold_ms": statistics.median(cold) * 1e3, "plan": plan})  # fmt: skip
    return results


def news_plan(year: Year) -> str:
    """The plan of render's per-ticker ``list_news`` query, as SQLAlchemy sends it."""
    with open_store(f"sqlite:///{year.path}", migrate=False) as store:
        seen: list[tuple[str, tuple]] = []

        def remember(conn, cursor, statement, parameters, context, executemany):
            seen.append((statement, tuple(parameters)))

        from sqlalchemy import event

        event.listen(store.engine, "before_cursor_execute", remember)
        as_of = year.news_end
        list_news(store, since=as_of - timedelta(hours=24), until=as_of, ticker="SBER", limit=25)
        statement, parameters = next(item for item in seen if "news_items" in item[0])
        with store.engine.connect() as connection:
            raw = connection.connection.driver_connection
            return query_plan(raw, statement, parameters)


def write_config(directory: Path, year: Year, feeds: list[dict], tokenizer: Path | None) -> Path:
    document = {
        "database": str(year.path),
        "feeds": feeds,
        "feed_defaults": {"timeout_s": 30, "retries": 0},
        "watchlist": [{"ticker": ticker, "aliases": aliases} for ticker, aliases in year.entries],
        "templates": list(TEMPLATES),
        "schedule": {"cron": "0 6 * * 1-5", "timezone": "Europe/Moscow"},
    }
    if tokenizer:
        document["tokenizer"] = str(tokenizer)
    path = directory / "year.yaml"
    path.write_text(yaml.safe_dump(document, allow_unicode=True), encoding="utf-8")
    return path


def measure_render(year: Year, directory: Path, tokenizer: Path | None) -> dict:
    config = load_config(write_config(directory, year, [], tokenizer))
    if tokenizer:
        from yalm_runner.tokenizer import Tokenizer

        vocabulary = Tokenizer(tokenizer)

        def count_tokens(text: str) -> int:
            return len(vocabulary.encode(text))
    else:

        def count_tokens(text: str) -> int:
            return 2 * len(text.split())

    as_of = year.news_end + timedelta(minutes=1)
    with PollingRobot(year.path) as robot, open_store(config.database_url) as store:
        started = time.perf_counter()
        found = [
            len(list_news(store, since=as_of - timedelta(hours=24), until=as_of,
                          ticker=ticker, limit=25))
            for ticker, _ in year.entries
        ]  # fmt: skip
        list_news_s = time.perf_counter() - started
        started = time.perf_counter()
        outcomes = render_run(config, store, count_tokens=count_tokens, as_of=as_of)
        render_s = time.perf_counter() - started
        store.close()
        wal_bytes = _size(Path(f"{year.path}-wal"))  # the robot is still connected
    return {"list_news_ms_per_ticker": list_news_s * 1e3 / len(year.entries),
            "items_found": sum(found), "render_s": render_s, "prompts": len(outcomes),
            "wal_bytes": wal_bytes, "robot_reads": robot.reads}  # fmt: skip


def rss(name: str, entries: list[tuple[str, str, str, datetime]]) -> bytes:
    parts = [
        f'<?xml version="1.0" encoding="utf-8"?><rss version="2.0"><channel><title>{name}'
        "</title><link>https://example.test/</link><description>bench</description>"
    ]
    for guid, title, summary, moment in entries:
        parts.append(
            f"<item><title>{escape(title)}</title><link>{guid}</link><guid>{guid}</guid>"
            f"<description>{escape(summary)}</description>"
            f"<pubDate>{moment.strftime('%a, %d %b %Y %H:%M:%S +0000')}</pubDate></item>"
        )
    parts.append("</channel></rss>")
    return "".join(parts).encode("utf-8")


class FeedServer:
    """Loopback HTTP serving fixed bodies by path (no validators: every fetch is a full one)."""

    def __init__(self, bodies: dict[str, bytes]):
        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                body = bodies.get(self.path)
                if body is None:
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Type", "application/rss+xml; charset=utf-8")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> FeedServer:
        self.thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.httpd.server_port}{path}"


def measure_ingest(year: Year, directory: Path, items: int, seed: int) -> dict:
    rng = random.Random(seed + 1)
    headlines = Headlines(year.entries, rng)
    symbols = [ticker for ticker, _ in year.entries]
    feeds, bodies = 4, {}
    start = year.news_end + timedelta(hours=1)
    for feed in range(feeds):
        entries = []
        for index in range(items // feeds):
            count = rng.choices((0, 1, 2, 3), (35, 45, 15, 5))[0]
            title, summary = headlines.draw(rng.sample(symbols, count))
            guid = f"https://wire{feed}.example/{index}"
            entries.append((guid, title, summary, start + timedelta(seconds=index)))
        bodies[f"/wire{feed}"] = rss(f"wire{feed}", entries)
    with FeedServer(bodies) as server, PollingRobot(year.path):
        feed_list = [{"name": f"wire{feed}", "url": server.url(f"/wire{feed}")}
                     for feed in range(feeds)]  # fmt: skip
        config = load_config(write_config(directory, year, feed_list, None))
        timings = {}
        for label in ("new", "duplicate"):
            with open_store(config.database_url) as store:
                started = time.perf_counter()
                report = ingest_feeds(config, store)
                timings[label] = time.perf_counter() - started
            seen = sum(feed.items_seen for feed in report.feeds)
            new = sum(feed.items_new for feed in report.feeds)
            assert seen == items // feeds * feeds, report.feeds
            assert new == (seen if label == "new" else 0), report.feeds
        wal_after = _size(Path(f"{year.path}-wal"))
    fetched_at = datetime.now(timezone.utc)
    started = time.perf_counter()
    for body in bodies.values():
        parse_feed(body, source="x", fetched_at=fetched_at)
    parse_s = time.perf_counter() - started
    per_item = items // feeds * feeds
    return {"new_ms_per_item": timings["new"] * 1e3 / per_item,
            "duplicate_ms_per_item": timings["duplicate"] * 1e3 / per_item,
            "feedparser_ms_per_item": parse_s * 1e3 / per_item, "wal_bytes": wal_after}  # fmt: skip


class PollingRobot:
    """A robot that stays connected and reads one forecast by id every ``every_s`` (a short read
    transaction each time) while the pipeline writes. It is there to be connected, not to load
    the machine: with a reader connected, closing the writer does not remove the WAL."""

    def __init__(self, path: Path, every_s: float = 0.5):
        self.path, self.every_s = path, every_s
        self.stop = threading.Event()
        self.reads = 0
        self.thread = threading.Thread(target=self._poll, daemon=True)

    def _poll(self) -> None:
        connection = connect_readonly(self.path)  # in this thread: sqlite3 wants its own
        query = f"SELECT {', '.join(COLUMNS)} FROM {VIEW} WHERE forecast_id = ?"
        try:
            while not self.stop.wait(self.every_s):
                connection.execute(query, (self.reads % 1000 + 1,)).fetchall()
                self.reads += 1
        finally:
            connection.close()  # only at __exit__: the WAL is measured while it is open

    def __enter__(self) -> PollingRobot:
        self.thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop.set()
        self.thread.join()


def _size(path: Path) -> int:
    return path.stat().st_size if path.exists() else 0


def measure(args, forecasts: int, items: int, directory: Path) -> dict:
    path = directory / f"year-{forecasts}-{items}.sqlite"
    for stale in (path, Path(f"{path}-wal"), Path(f"{path}-shm")):
        stale.unlink(missing_ok=True)
    print(f"building {forecasts} forecasts, {items} news items in {path} ...", file=sys.stderr)
    year = build_year(path, forecasts=forecasts, items=items, tickers=args.tickers,
                      news_per_day=args.news_per_day, seed=args.seed)  # fmt: skip
    size = _size(path)
    print(f"  built in {year.build_s:.0f} s, {size / 2**20:.0f} MiB", file=sys.stderr)
    started = time.perf_counter()
    with open_store(f"sqlite:///{path}") as store:  # what the next real run does first: migrate
        migrate_s = time.perf_counter() - started
        # ... and what every run leaves behind when it ends, in the code that has it: a year of
        # runs leaves their store like this; rows inserted in bulk skipped those runs' ends.
        tidy = getattr(database, "tidy_after_run", None)
        started = time.perf_counter()
        if tidy is not None:
            tidy(store)
        tidy_s = time.perf_counter() - started if tidy else None
    reads = measure_reads(year)
    plan = news_plan(year)
    render = measure_render(year, directory, args.tokenizer)
    ingest = measure_ingest(year, directory, args.ingest_items, args.seed)
    result = {"forecasts": forecasts, "items": items, "build_s": year.build_s,
              "migrate_s": migrate_s, "tidy_s": tidy_s, "db_bytes": size,
              "bytes_per_night": size / NIGHTS,
              "reads": reads, "news_plan": plan, "render": render, "ingest": ingest}  # fmt: skip
    if not args.keep:
        for stale in (path, Path(f"{path}-wal"), Path(f"{path}-shm")):
            stale.unlink(missing_ok=True)
    return result


def print_tables(results: list[dict], tokenizer: Path | None) -> None:
    sizes = [f"{r['forecasts'] // 1000}k fc / {r['items'] // 1000}k items" for r in results]
    print("\n### Robot reads (ms; warm = median of 15 on one connection, cold = page cache "
          "dropped with posix_fadvise + fresh connection, median of 3)\n")  # fmt: skip
    print("| read | " + " | ".join(f"{s}: warm / cold (rows)" for s in sizes) + " |")
    print("| --- |" + " --- |" * len(sizes))
    for index, read in enumerate(results[0]["reads"]):
        cells = []
        for result in results:
            row = result["reads"][index]
            cells.append(f"{row['warm_ms']:.1f} / {row['cold_ms']:.1f} ({row['rows']})")
        print(f"| {read['read']} | " + " | ".join(cells) + " |")
    print("\n### Query plans (SQLite EXPLAIN QUERY PLAN)\n")
    for result, label in zip(results, sizes, strict=True):
        print(f"{label}:")
        for row in result["reads"]:
            print(f"- {row['read']}: `{row['plan']}`")
        print(f"- render's list_news (one ticker, 24 h): `{result['news_plan']}`")
    counting = "the YaLM tokenizer" if tokenizer else "a word count (no --tokenizer)"
    print(f"\n### Render, ingest, size (token counting: {counting})\n")
    print("| measure | " + " | ".join(sizes) + " |")
    print("| --- |" + " --- |" * len(sizes))
    lines = [
        ("build the year (s)", lambda r: f"{r['build_s']:.0f}"),
        ("open + migrate the year's store (s)", lambda r: f"{r['migrate_s']:.2f}"),
        ("end-of-run tidy: ANALYZE + WAL truncate (s)",
         lambda r: "-" if r["tidy_s"] is None else f"{r['tidy_s']:.2f}"),
        ("database size (MiB)", lambda r: f"{r['db_bytes'] / 2**20:.0f}"),
        ("size per night (MiB)", lambda r: f"{r['bytes_per_night'] / 2**20:.2f}"),
        ("list_news per ticker, 24 h window (ms)",
         lambda r: f"{r['render']['list_news_ms_per_ticker']:.2f}"),
        ("items in the window, all tickers", lambda r: f"{r['render']['items_found']}"),
        ("render_run, 400 prompts (s)", lambda r: f"{r['render']['render_s']:.2f}"),
        ("WAL left after render (MiB)", lambda r: f"{r['render']['wal_bytes'] / 2**20:.1f}"),
        ("ingest, new items (ms/item)", lambda r: f"{r['ingest']['new_ms_per_item']:.3f}"),
        ("ingest, duplicates (ms/item)",
         lambda r: f"{r['ingest']['duplicate_ms_per_item']:.3f}"),
        ("feedparser alone (ms/item)", lambda r: f"{r['ingest']['feedparser_ms_per_item']:.3f}"),
        ("WAL left after ingest (MiB)", lambda r: f"{r['ingest']['wal_bytes'] / 2**20:.1f}"),
    ]  # fmt: skip
    for label, cell in lines:
        print(f"| {label} | " + " | ".join(cell(result) for result in results) + " |")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--sizes", default="10k:100k,100k:100k,100k:3M",
        help="FORECASTS:ITEMS pairs, comma separated (default %(default)s)",
    )  # fmt: skip
    parser.add_argument("--tickers", type=int, default=200, help="watchlist size (default 200)")
    parser.add_argument(
        "--news-per-day", type=int, default=8_000,
        help="news items a day; more items = a longer history (default 8000)",
    )  # fmt: skip
    parser.add_argument(
        "--ingest-items", type=int, default=2_000, help="items served to ingest (default 2000)"
    )
    parser.add_argument(
        "--tokenizer", type=Path, default=os.environ.get("YALM_VOCAB") or None,
        help="voc_100b.sp for render's token counts [env YALM_VOCAB]",
    )  # fmt: skip
    parser.add_argument("--dir", type=Path, help="where to build (default a temp dir)")
    parser.add_argument("--keep", action="store_true", help="keep the built databases")
    parser.add_argument("--seed", type=int, default=20)
    parser.add_argument("--json", type=Path, help="also write the raw results here")
    args = parser.parse_args(argv)
    pairs = [tuple(parse_count(part) for part in pair.split(":")) for pair in args.sizes.split(",")]
    with tempfile.TemporaryDirectory(dir=args.dir) as scratch:
        directory = args.dir if args.keep and args.dir else Path(scratch)
        results = [measure(args, forecasts, items, directory) for forecasts, items in pairs]
    if args.json:
        args.json.write_text(json.dumps(results, indent=1), encoding="utf-8")
    print_tables(results, args.tokenizer)
    return 0


if __name__ == "__main__":
    sys.exit(main())
