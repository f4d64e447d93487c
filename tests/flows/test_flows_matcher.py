"""The one-pass ticker matcher finds exactly what the matcher before it found.

``ReferenceMatcher`` is that matcher's code as it was (one regular expression per ticker, every
one run over every text). The corpus is real-looking Russian and English headlines naming the
watchlist's companies in their inflected forms, with the near misses that must stay misses.
"""

from __future__ import annotations

import itertools
import random
import re
from collections.abc import Sequence

from flows.config import WatchlistEntry
from flows.sources.feeds import TickerMatcher


class ReferenceMatcher:
    """``flows.sources.feeds.TickerMatcher`` before the one-pass lookup, unchanged."""

    def __init__(self, watchlist: Sequence[WatchlistEntry]):
        self._patterns = []
        for entry in watchlist:
            parts = [rf"(?<![\w$])\$?{re.escape(entry.ticker)}(?!\w)"]
            for alias in entry.aliases:
                suffix = r"[а-яё]{0,3}" if re.search(r"[а-яё]", alias, re.IGNORECASE) else ""
                parts.append(rf"(?i:(?<!\w){re.escape(alias)}{suffix}(?!\w))")
            self._patterns.append((entry.ticker, re.compile("|".join(parts))))

    def match(self, text: str) -> tuple[str, ...]:
        return tuple(ticker for ticker, pattern in self._patterns if pattern.search(text))


WATCHLIST = [
    WatchlistEntry("SBER", ("Сбербанк", "Сбер", "Sberbank")),
    WatchlistEntry("GAZP", ("Газпром", "Gazprom")),
    WatchlistEntry("LKOH", ("Лукойл", "Lukoil")),
    WatchlistEntry("YDEX", ("Яндекс", "Yandex", "YNDX")),
    WatchlistEntry("ROSN", ("Роснефть", "Rosneft")),
    WatchlistEntry("GMKN", ("Норникель", "Норильский никель", "Nornickel")),
    WatchlistEntry("MOEX", ("Мосбиржа", "Московская биржа", "Moscow Exchange")),
    WatchlistEntry("MTSS", ("МТС", "MTS")),
    WatchlistEntry("T", ("Т-Банк", "Тинькофф", "Tinkoff")),
    WatchlistEntry("MVID", ("М.Видео", "M.Video")),
    WatchlistEntry("FIVE", ("X5", "Пятерочка")),
    WatchlistEntry("ALRS", ("Алроса", "Alrosa")),
    WatchlistEntry("AAPL", ("Apple",)),
    WatchlistEntry("NVDA", ("Nvidia",)),
    WatchlistEntry("BRK.B", ("Berkshire Hathaway", "Berkshire")),
    WatchlistEntry("KO", ("Coca-Cola",)),
    WatchlistEntry("AT", ("AT&T",)),
    WatchlistEntry("GLE", ("Société Générale",)),
    WatchlistEntry("NESN", ("Nestlé",)),
    WatchlistEntry("ISCTR", ("İş Bankası",)),  # a Turkish capital dotted I: the plain scan
    WatchlistEntry("KSPI", ("Kaspi",)),
]

HEADLINES = [
    "Акции Сбербанка выросли на 2% после отчета по МСФО",
    "Сбербанк увеличил чистую прибыль на 5%; Сбер ждет рекордных дивидендов",
    "Греф: Сбербанку не нужны госгарантии",
    "Клиенты Сбербанком довольны, считают аналитики",
    "СБЕРБАНКА акции в лидерах роста",
    "Сбербанковский холдинг реорганизуют",  # more than three extra letters: not Sberbank
    "Сберегательный сертификат подорожал",  # shares only a prefix
    "Газпромнефть отчиталась о росте добычи",  # another company, not an inflection
    "Совет директоров Газпрома не рекомендовал дивиденды",
    "ФАС одобрила сделку с газпромом и GAZP",
    "Лукойлу разрешили выкуп акций у нерезидентов",
    "Роснефти и Лукойлу продлили льготы",  # ь -> и is not a suffix: Rosneft is missed
    "Яндекс.Маркет запустил доставку; YNDX и YDEX в плюсе",
    "Норильский никель сократил производство палладия",
    "Норильского никеля акционеры одобрили выплату",  # the first word inflected: missed
    "Норникелем заинтересовались китайские инвесторы",
    "Мосбиржа продлит торги; Московская биржа запускает вечернюю сессию",
    "Московской биржи индекс снизился на 1,2%",
    "МТС и МТС-Банк объявили о допэмиссии",
    "Т-Банк и Тинькофф: одно и то же? T-Bank, $T в центре внимания",
    "М.Видео и M.Video отчитались, М.Видеоэльдорадо нет",
    "X5 Group и Пятерочки: выручка выросла; X50 — не тикер",
    "Алросе разрешили продажу алмазов в Индии",
    "$AAPL and apple pie: Apple's iPhone sales slip",
    "Pineapple sales surge; SBERBANKING is not a word",
    "Nvidia beats estimates, NVDA jumps 8% after hours",
    "nvidia-backed startup raises $1bn; NVIDIAS stock? no",
    "Berkshire Hathaway buys more Occidental; BRK.B hits record",
    "Berkshire's annual meeting draws crowds; BRK.A unchanged",
    "Coca-Cola raises guidance, KO up 2%; Coca-Colas sold out",
    "AT&T cuts jobs; AT&Tx is not it; at&t lower case",
    "Société Générale cuts staff; SOCIÉTÉ GÉNÉRALE shares fall",
    "Nestlé and NESTLÉ: both spellings; Nestle without accent",
    "İş Bankası kârını artırdı; iş bankası küçük harfle",
    "Iş Bankası with a plain I; ISCTR on Borsa Istanbul",
    "Kelvin sign in SBER\u212a text and ſberbank long s",
    "the long s alone: ſberbank",  # re.IGNORECASE takes ſ for s; str.lower does not
    "\u212aaspi.kz with a Kelvin sign for its K",
    "ЦБ сохранил ключевую ставку на уровне 16%",
    "Sber_bank and Сбер_банк are not words; Sberbank-backed fund is",
    "",
    "$$SBER double dollar; $SBER$ dollar after; (SBER) in brackets; SBER.",
    "Ёлки: ЁЛКИ и ёлки; Сбербанкё тоже",
]

TEMPLATES_RU = [
    "Акции {name} выросли на {pct}%",
    "{name} отчитался о прибыли",
    "Сделка с {name} одобрена",
    "О {name} пишут аналитики",
]
TEMPLATES_EN = ["{name} shares rise {pct}%", "Analysts like {name}'s outlook", "{name}: ${ticker}"]
ENDINGS = ["", "а", "у", "ом", "е", "ы", "ой", "ами", "овский", "и", "ь", "ю"]


def generated_headlines(count: int, seed: int = 20) -> list[str]:
    """Headlines naming the watchlist in every case ending (right and wrong) and letter case."""
    rng = random.Random(seed)
    names = [(entry.ticker, alias) for entry in WATCHLIST for alias in entry.aliases]
    names += [(entry.ticker, entry.ticker) for entry in WATCHLIST]
    lines = []
    for _ in range(count):
        ticker, name = rng.choice(names)
        name += rng.choice(ENDINGS)
        name = rng.choice([name, name.upper(), name.lower(), name.capitalize()])
        other = rng.choice(names)[1]
        template = rng.choice(TEMPLATES_RU + TEMPLATES_EN)
        text = template.format(name=name, pct=rng.randrange(1, 20), ticker=ticker)
        lines.append(f"{text}; {other}{rng.choice(ENDINGS)}")
    return lines


def test_the_one_pass_matcher_finds_exactly_what_the_reference_finds():
    new, reference = TickerMatcher(WATCHLIST), ReferenceMatcher(WATCHLIST)
    corpus = HEADLINES + generated_headlines(3000)
    corpus += [f"{title}\n{body}" for title, body in itertools.pairwise(HEADLINES)]
    differences = [
        (text, new.match(text), reference.match(text))
        for text in corpus
        if new.match(text) != reference.match(text)
    ]
    assert differences == []
    found = [reference.match(text) for text in corpus]
    # The corpus exercises the rules: many texts match, several tickers at once, many none.
    assert sum(bool(tickers) for tickers in found) > len(corpus) // 2
    assert sum(len(tickers) > 1 for tickers in found) > 100
    assert sum(not tickers for tickers in found) > 100


def test_inflections_and_near_misses_are_kept():
    matcher = TickerMatcher(WATCHLIST)
    assert matcher.match("Акции Сбербанка выросли") == ("SBER",)
    assert matcher.match("Клиенты Сбербанком довольны") == ("SBER",)
    assert matcher.match("Сбербанковский холдинг") == ()
    assert matcher.match("Газпромнефть отчиталась") == ()
    assert matcher.match("газпромом и GAZP") == ("GAZP",)
    assert matcher.match("Роснефти продлили льготы") == ()  # as before: ь -> и is not a suffix
    assert matcher.match("$AAPL and apple pie; Pineapple") == ("AAPL",)
    assert matcher.match("Berkshire Hathaway; BRK.B") == ("BRK.B",)
    assert matcher.match("İş Bankası kârını artırdı") == ("ISCTR",)
    assert matcher.match("the long s alone: ſberbank") == ("SBER",)


def test_a_large_watchlist_matches_the_same_as_the_reference():
    stems = ["Урал", "Сибир", "Волг", "Балт", "Амур", "Север", "Енисей", "Алтай", "Кам", "Дон"]
    ends = ["нефть", "газ", "энерго", "хим", "сталь", "транс", "банк", "агро", "телеком", "фарм"]
    watchlist = list(WATCHLIST)
    for index, (stem, end) in enumerate(itertools.product(stems, ends)):
        watchlist.append(WatchlistEntry(f"R{index:03d}", (stem + end, f"{stem} {end}")))
    rng = random.Random(7)
    corpus = [
        f"Акции {rng.choice(stems)}{rng.choice(ends)}{rng.choice(ENDINGS)} и "
        f"{rng.choice(stems)} {rng.choice(ends)}{rng.choice(ENDINGS)} выросли"
        for _ in range(2000)
    ] + HEADLINES
    new, reference = TickerMatcher(watchlist), ReferenceMatcher(watchlist)
    assert [new.match(text) for text in corpus] == [reference.match(text) for text in corpus]
