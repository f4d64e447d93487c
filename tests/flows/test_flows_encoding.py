"""Choosing a feed's encoding and judging its text (``flows.sources.encoding``), on bytes."""

from __future__ import annotations

import pytest

from flows.sources.encoding import (
    CONFIDENT_RUSSIAN,
    PLAUSIBLE_RUSSIAN,
    decode_feed,
    repair_mojibake,
    russian_score,
)

RUSSIAN = "Как пережить новогоднюю ночь. Сбербанк повысил ставки по вкладам"
SHORT_TITLES = ["Газпром", "ЦБ сохранил ставку", "Лукойл отчитался о прибыли"]


def feed(text: str, *, declare: str | None = None) -> str:
    declaration = f' encoding="{declare}"' if declare else ""
    return f'<?xml version="1.0"{declaration}?><rss><channel><title>{text}</title></channel></rss>'


def test_russian_scores_well_only_in_the_encoding_it_was_written_in():
    for text in [RUSSIAN, *SHORT_TITLES, "Україна отримала новий транш допомоги"]:
        assert russian_score(text) >= CONFIDENT_RUSSIAN, text
        for written, misread in (("koi8-r", "cp1251"), ("cp1251", "koi8-r")):
            wrong = text.encode(written, errors="replace").decode(misread)
            assert russian_score(wrong) < PLAUSIBLE_RUSSIAN, (text, written, misread)


def test_other_scripts_read_as_cyrillic_are_not_plausible_russian():
    samples = [
        ("שלום עולם זהו מבחן של קידוד ישראל היום", "cp1255"),
        ("Αυτή είναι μια δοκιμή της ελληνικής γλώσσας", "cp1253"),
        ("这是一个测试标题，关于市场的新闻", "gb2312"),
    ]
    for text, encoding in samples:
        for misread in ("koi8-r", "cp1251"):
            score = russian_score(text.encode(encoding).decode(misread, errors="replace"))
            assert score is None or score < PLAUSIBLE_RUSSIAN, (text, misread)


def test_too_little_cyrillic_is_not_judged():
    assert russian_score("Hello, world") is None
    assert russian_score("Ёж") is None


@pytest.mark.parametrize("encoding", ["koi8-r", "cp1251", "utf-8"])
@pytest.mark.parametrize("text", [RUSSIAN, *SHORT_TITLES])
def test_undeclared_russian_is_read_in_its_own_encoding(encoding, text):
    decoded = decode_feed(feed(text).encode(encoding))
    assert (decoded.encoding, decoded.problem) == (encoding, None)
    assert text in decoded.text


def test_a_declared_encoding_is_kept_when_its_text_is_plausible():
    body = feed("Le café de la gare est fermé à Noël", declare="iso-8859-1").encode("latin-1")
    decoded = decode_feed(body)
    assert (decoded.encoding, decoded.how, decoded.problem) == ("iso8859-1", "declared", None)
    body = feed("ЦБ", declare="koi8-r").encode("koi8-r")  # too short to doubt
    assert decode_feed(body).how == "declared"


def test_the_http_charset_comes_before_the_xml_declaration():
    body = feed(RUSSIAN, declare="koi8-r").encode("cp1251")
    decoded = decode_feed(body, content_type="application/rss+xml; charset=windows-1251")
    assert (decoded.encoding, decoded.how) == ("cp1251", "declared")


def test_valid_utf8_wins_over_a_single_byte_declaration():
    body = feed(RUSSIAN, declare="windows-1251").encode("utf-8")
    assert decode_feed(body).encoding == "utf-8"


def test_byte_order_marks_and_wide_encodings_are_honoured():
    text = feed(RUSSIAN)
    assert decode_feed(text.encode("utf-8-sig")).how == "byte order mark"
    assert decode_feed("\ufeff".encode("utf-16-le") + text.encode("utf-16-le")).text == text
    assert decode_feed(text.encode("utf-16-be")).encoding == "utf-16-be"


def test_a_wide_encoding_declared_in_an_ascii_document_is_ignored():
    body = feed(RUSSIAN, declare="utf-16").encode("utf-8")
    assert decode_feed(body).encoding == "utf-8"


def test_the_override_is_trusted_and_bytes_it_cannot_read_are_named():
    body = feed(RUSSIAN, declare="utf-8").encode("koi8-r")
    decoded = decode_feed(body, override="koi8-r")
    assert (decoded.encoding, decoded.how, decoded.problem) == ("koi8-r", "config", None)
    broken = decode_feed(b"<rss>\xff\xfe\xfa</rss>", override="utf-8")
    assert broken.problem == "bytes are not valid utf-8: byte 0xff at offset 5"


def test_other_undeclared_scripts_go_to_the_general_detector():
    body = feed("这是一个测试标题，关于市场的新闻。今天股市上涨了百分之二。").encode("gb18030")
    decoded = decode_feed(body)
    assert decoded.problem is None and "测试标题" in decoded.text


def test_text_nothing_reads_is_a_problem_not_a_guess_passed_off_as_right():
    decoded = decode_feed(b"<rss><title>" + bytes(range(0x80, 0x100)) + b"</title></rss>")
    assert decoded.problem == "encoding not declared and not recognised; read as windows-1252"


@pytest.mark.parametrize(
    ("written", "misread"),
    [("koi8-r", "latin-1"), ("cp1251", "cp1252"), ("utf-8", "latin-1"), ("koi8-r", "cp1251")],
)
def test_mojibake_is_repaired_when_the_round_trip_shows(written, misread):
    garbled = RUSSIAN.encode(written).decode(misread)
    assert repair_mojibake(garbled) == (RUSSIAN, "repaired")


def test_right_text_is_left_alone_and_unrepairable_text_is_flagged():
    assert repair_mojibake(RUSSIAN) == (RUSSIAN, None)
    assert repair_mojibake("Grüße aus München, café") == ("Grüße aus München, café", None)
    hebrew = "שלום עולם זהו מבחן של קידוד".encode("cp1255").decode("latin-1")
    assert repair_mojibake(hebrew) == (hebrew, "garbled")
