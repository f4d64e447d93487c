"""Turning a feed's bytes into text: which character encoding, and whether the text can be trusted.

Owns the choice of encoding and the plausibility measures behind it. In order: a byte order mark;
the feed's ``encoding:`` from the config; UTF-8 when the bytes are valid UTF-8 (a single-byte
text almost never is, so this beats any declaration); the declared charset (HTTP Content-Type,
else the XML declaration) unless it is a single-byte one that reads as implausible text while
another reading is plausible; detection when nothing is declared or the declaration fails.

Two measures judge a reading. For Cyrillic, a Russian letter-frequency score
(``russian_score``): short Russian texts are where general detectors guess wrong (a KOI8-R
title comes out as Shift-JIS), and the wrong Cyrillic single-byte readings are easy to tell
apart by letter frequencies and by letter case (KOI8-R read as windows-1251 swaps the case of
every letter). For everything else, charset-normalizer: its detector when nothing is declared,
and its mess ratio (accents and symbols in impossible places: ``ëÁË ÐÅÒÅÖÉÔØ``) to call a text
garbled. Text that is still garbled after all this is returned with a ``problem``.

It also repairs strings that an earlier version stored after decoding with the wrong charset
(``repair_mojibake``), where the round trip is detectable. It does not parse XML, and knows
nothing of HTTP or the store.
"""

from __future__ import annotations

import codecs
import math
import re
from dataclasses import dataclass

from charset_normalizer import from_bytes
from charset_normalizer.md import mess_ratio

# Russian letter frequencies (per cent of letters, lower case). Ukrainian/Belarusian letters get
# a small share so a Ukrainian text is not "implausible"; other Cyrillic letters are rare.
_RU_FREQ_PCT = {
    "о": 10.97, "е": 8.45, "а": 8.01, "и": 7.35, "н": 6.70, "т": 6.26, "с": 5.47,
    "р": 4.73, "в": 4.54, "л": 4.40, "к": 3.49, "м": 3.21, "д": 2.98, "п": 2.81,
    "у": 2.62, "я": 2.01, "ы": 1.90, "ь": 1.74, "г": 1.70, "з": 1.65, "б": 1.59,
    "ч": 1.44, "й": 1.21, "х": 0.97, "ж": 0.94, "ш": 0.73, "ю": 0.64, "ц": 0.48,
    "щ": 0.36, "э": 0.32, "ф": 0.26, "ъ": 0.04, "ё": 0.04,
    "і": 0.5, "ї": 0.1, "є": 0.1, "ґ": 0.02, "ў": 0.02,
}  # fmt: skip
_LOG_P = {letter: math.log(pct / 100) for letter, pct in _RU_FREQ_PCT.items()}
_LOG_RARE_CYRILLIC = math.log(0.0001)
# Punctuation Russian text uses outside ASCII: neutral, neither for nor against a reading.
_NEUTRAL = frozenset("«»—–…№“”„‘’•·°€₽\u00a0\u202f")
_LOG_NEUTRAL = math.log(0.03)
_LOG_FOREIGN = math.log(0.0005)  # a non-ASCII character that is neither: Latin-1 accents, boxes
# Case inside a word: "пЕРЕЖИТЬ" (lower then upper) is what a KOI8-R/windows-1251 mix-up makes.
_LOG_UPPER_AFTER_LOWER = math.log(0.01)
_LOG_UPPER_AFTER_UPPER = math.log(0.5)  # acronyms (ЦБ, МСФО) and capitalised headlines exist
_LOG_MIXED_SCRIPT = math.log(0.01)  # a Cyrillic letter touching a Latin one: "cafй"
# The letter pairs that make up 80% of the pairs in the Russian pieces of YaLM's vocabulary
# (weighted by merge rank). Russian text has about two thirds of its pairs here, a wrong
# single-byte reading a third or less; the log-likelihood ratios below score one pair.
_COMMON_PAIR_LIST = (
    "ст ра ен ни ро но ре ко по пр ов ер на то та те ан ка ет ос ор во ва ль ле ли го ри де ти "
    "од от ол не ны ме ла ве ес ом ть за ал тр об ат ин ел ск ло ит ар он до со мо да ед ог ки "
    "ма ия бо че ие ас ви ем тв ой ав ру ми ди ис пе ци ся ак аз сп вы им си ек нн ам се ик же "
    "сл ил ок ей па кр нт ьн из ку хо ча са чи вл ии ля оп ий ая аб бе га гр сс тс ад ив ту ых "
    "лу оз ые ый ше ое ры пл жи ус пи ож ду ще ги ев му кт бр су уд би ег зо ич ну ты лю ши це "
    "тн бл ур ир"
)
_COMMON_PAIRS = frozenset(_COMMON_PAIR_LIST.split(" "))
_LLR_COMMON_PAIR = math.log(0.65 / 0.25)
_LLR_RARE_PAIR = math.log(0.35 / 0.75)
_VOWELS = frozenset("аеёиоуыэюяіїє")
# Russian letters are 40-45% vowels; a Hebrew or Greek text read as windows-1251 has far fewer.
VOWEL_SHARE_RANGE = (0.28, 0.62)
MIN_LETTERS_FOR_VOWELS = 12
_LOG_IMPLAUSIBLE_VOWELS = math.log(0.05)
# Hebrew or Greek read as KOI8-R comes out all in capitals; a Russian feed rarely is.
MIN_LETTERS_FOR_CAPITALS = 20
MAX_CAPITALS = 0.7  # a share of the letters
_LOG_ALL_CAPITALS = math.log(0.1)
# Real Russian scores -2.6 to -3.3; a wrong Cyrillic reading -4.3 and below. A reading between
# the two thresholds is taken only when the general detector has no coherent answer.
PLAUSIBLE_RUSSIAN = -4.2
CONFIDENT_RUSSIAN = -3.6
# A detector answer is coherent when it recognised a language and found little mess.
MIN_COHERENCE = 0.2
MAX_CHAOS = 0.1
MIN_CYRILLIC_LETTERS = 3
# charset-normalizer's mess ratio of the non-ASCII words: correct text of any script stays near 0,
# Latin-1 mojibake of Cyrillic, Hebrew or Chinese is 0.5 and above.
GARBLED_MESS = 0.3
MIN_NON_ASCII_TO_JUDGE = 8  # fewer odd characters than this are no evidence either way
CYRILLIC_SINGLE_BYTE = ("windows-1251", "koi8-r")
_NON_ASCII_WORD = re.compile(r"\S*[^\x00-\x7f]\S*")
_XML_ENCODING = re.compile(rb"""^\s*<\?xml[^>]*?encoding\s*=\s*["']([A-Za-z0-9._:-]+)["']""")
_CHARSET = re.compile(r"""charset\s*=\s*["']?([A-Za-z0-9._:-]+)""", re.IGNORECASE)
_BOMS = (
    (codecs.BOM_UTF32_BE, "utf-32-be"),
    (codecs.BOM_UTF32_LE, "utf-32-le"),
    (codecs.BOM_UTF8, "utf-8"),
    (codecs.BOM_UTF16_BE, "utf-16-be"),
    (codecs.BOM_UTF16_LE, "utf-16-le"),
)
# "<?" in the wide encodings, for a document without a byte order mark (XML spec, appendix F).
_WIDE_MARKERS = (
    (b"\x00\x00\x00<", "utf-32-be"),
    (b"<\x00\x00\x00", "utf-32-le"),
    (b"\x00<\x00?", "utf-16-be"),
    (b"<\x00?\x00", "utf-16-le"),
)


@dataclass(frozen=True)
class DecodedFeed:
    text: str
    encoding: str  # the codec the text was read with (Python's name)
    how: str  # byte order mark | config | declared | detected | ascii
    declared: str | None  # the charset the feed declared, if any
    problem: str | None  # set when the text cannot be trusted


def codec_name(label: str) -> str | None:
    """Python's name for an encoding label (``cp1251`` for ``Windows-1251``), None if unknown."""
    try:
        return codecs.lookup(label).name
    except LookupError:
        return None


def decode_feed(body: bytes, *, content_type: str = "", override: str | None = None) -> DecodedFeed:
    """Decode a feed's bytes, choosing the encoding as the module docstring describes."""
    for mark, encoding in _BOMS:
        if body.startswith(mark):
            return _forced(body[len(mark) :], encoding, "byte order mark", None)
    declared = _declared(body, content_type)
    if override:
        return _forced(body, override, "config", declared)
    for marker, encoding in _WIDE_MARKERS:
        if body.startswith(marker):
            return _forced(body, encoding, "declared", declared)
    if body.isascii():
        return DecodedFeed(body.decode("ascii"), "ascii", "ascii", declared, None)
    utf8 = _strict(body, "utf-8")
    if utf8 is not None:
        how = "declared" if declared == "utf-8" else "detected"
        return _judged(utf8, "utf-8", how, declared)
    declared_text = _strict(body, declared) if declared else None
    if declared_text is not None and (not _single_byte(declared) or _is_plausible(declared_text)):
        return _judged(declared_text, declared, "declared", declared)
    # Nothing declared, the declaration does not fit the bytes, or it reads as nonsense.
    cyrillic = _best_cyrillic(body)
    guess = _detect(body)
    if cyrillic and (cyrillic[2] >= CONFIDENT_RUSSIAN or guess is None or not guess[2]):
        return _judged(cyrillic[1], cyrillic[0], "detected", declared)
    if guess is not None and (declared_text is None or not _garbled(guess[1])):
        return _judged(guess[1], guess[0], "detected", declared)
    if declared_text is not None:
        return _judged(declared_text, declared, "declared", declared)
    text = body.decode("windows-1252", errors="replace")
    problem = "encoding not declared and not recognised; read as windows-1252"
    if declared:
        problem = f"bytes are not valid {declared} and no other encoding fits"
    return DecodedFeed(text, "windows-1252", "detected", declared, problem)


def russian_score(text: str, *, capitals_suspect: bool = True) -> float | None:
    """Mean log-likelihood per non-ASCII character of ``text`` read as Russian.

    -2.6 to -3.3 for real Russian, -4.3 and below for a wrong single-byte reading; None when
    the text has fewer than ``MIN_CYRILLIC_LETTERS`` Cyrillic letters to judge by. With
    ``capitals_suspect`` a text almost all in capitals scores lower (it is what Hebrew or Greek
    read as KOI8-R looks like): right when choosing between readings, too harsh when judging the
    one reading left (a feed of capitalised headlines is rare, not wrong).
    """
    total, counted, letters, vowels, capitals, pairs_llr, pairs = 0.0, 0, 0, 0, 0, 0.0, 0
    previous = " "
    for index, char in enumerate(text):
        if char < "\x80":
            previous = char
            continue
        lower = char.lower()
        if "\u0400" <= lower <= "\u04ff":
            letters += 1
            vowels += lower in _VOWELS
            capitals += char != lower
            if "\u0400" <= previous.lower() <= "\u04ff":
                pair = previous.lower() + lower
                pairs_llr += _LLR_COMMON_PAIR if pair in _COMMON_PAIRS else _LLR_RARE_PAIR
                pairs += 1
            score = _LOG_P.get(lower, _LOG_RARE_CYRILLIC)
            if char != lower and previous.isalpha():
                score += _LOG_UPPER_AFTER_LOWER if previous.islower() else _LOG_UPPER_AFTER_UPPER
            following = text[index + 1 : index + 2]
            if _is_latin(previous) or _is_latin(following):
                score += _LOG_MIXED_SCRIPT
        elif char in _NEUTRAL:
            score = _LOG_NEUTRAL
        else:
            score = _LOG_FOREIGN
        total += score
        counted += 1
        previous = char
    if letters < MIN_CYRILLIC_LETTERS:
        return None
    score = total / counted + (pairs_llr / pairs if pairs else 0.0)
    low, high = VOWEL_SHARE_RANGE
    if letters >= MIN_LETTERS_FOR_VOWELS and not low <= vowels / letters <= high:
        score += _LOG_IMPLAUSIBLE_VOWELS
    if (
        capitals_suspect
        and letters >= MIN_LETTERS_FOR_CAPITALS
        and capitals > MAX_CAPITALS * letters
    ):
        score += _LOG_ALL_CAPITALS
    return score


def garbled_ratio(text: str) -> float:
    """charset-normalizer's mess ratio of the words that hold non-ASCII characters (0 = clean)."""
    words = " ".join(_NON_ASCII_WORD.findall(text))
    return mess_ratio(words, maximum_threshold=1.0) if words else 0.0


def repair_mojibake(text: str) -> tuple[str, str | None]:
    """Undo a wrong single-byte decode of a stored string, when the round trip shows it.

    Returns ``(text, verdict)``: verdict None for text that looks right, ``"repaired"`` with the
    fixed text when re-encoding it as Latin-1/windows-1252 gives bytes that read as valid UTF-8
    or plausible Russian, ``"garbled"`` (text unchanged) when it looks wrong but no round trip
    fits.
    """
    if text.isascii():
        return text, None
    score = russian_score(text)
    if (score is not None and score >= PLAUSIBLE_RUSSIAN) or not _garbled_string(text):
        return text, None
    for wrong in ("windows-1252", "latin-1", "windows-1251", "koi8-r"):
        try:
            raw = text.encode(wrong)
        except UnicodeEncodeError:
            continue
        fixed = _strict(raw, "utf-8")
        if fixed is not None and not fixed.isascii() and not _garbled_string(fixed):
            return fixed, "repaired"
        best = _best_cyrillic(raw)
        if best is not None and best[0] != codec_name(wrong) and best[2] >= CONFIDENT_RUSSIAN:
            return best[1], "repaired"
    return text, "garbled"


def _garbled_string(text: str) -> bool:
    score = russian_score(text)
    if score is not None and score < PLAUSIBLE_RUSSIAN:
        return True
    return _garbled(text)


def _forced(body: bytes, encoding: str, how: str, declared: str | None) -> DecodedFeed:
    """A reading nobody guessed (a byte order mark, the config): trusted if the bytes fit."""
    name = codec_name(encoding) or encoding
    text = _strict(body, name)
    if text is not None:
        return DecodedFeed(text, name, how, declared, None)
    error = _decode_error(body, name)
    text = body.decode(name, errors="replace")
    return DecodedFeed(text, name, how, declared, f"bytes are not valid {name}: {error}")


def _judged(text: str, encoding: str, how: str, declared: str | None) -> DecodedFeed:
    """The reading, with a problem when a single-byte reading still looks garbled.

    A strict multibyte reading (UTF-8, GB18030, Shift-JIS, ...) is trusted: wrong bytes do not
    survive it. A single-byte reading never fails, so only its text can tell.
    """
    problem = None
    if not _single_byte(encoding):
        return DecodedFeed(text, encoding, how, declared, None)
    score = russian_score(text, capitals_suspect=False)
    if score is not None and score < PLAUSIBLE_RUSSIAN:
        problem = f"text read as {encoding} ({how}) is not plausible Cyrillic; check the encoding"
    elif _garbled(text):
        problem = f"text read as {encoding} ({how}) looks garbled; check the encoding"
    return DecodedFeed(text, encoding, how, declared, problem)


def _declared(body: bytes, content_type: str) -> str | None:
    """The charset the HTTP header declares, else the XML declaration; None if none is usable."""
    labels = []
    header = _CHARSET.search(content_type or "")
    if header:
        labels.append(header.group(1))
    declaration = _XML_ENCODING.match(body[:512])
    if declaration:
        labels.append(declaration.group(1).decode("ascii"))
    for label in labels:
        name = codec_name(label)
        # A wide encoding declared in an ASCII-readable document is a mistake (the document
        # would start with a byte order mark or zero bytes): the declaration cannot be right.
        if name and not name.startswith(("utf-16", "utf-32")):
            return "gb18030" if name == "gb2312" else name  # gb18030 is gb2312's superset
    return None


def _single_byte(encoding: str) -> bool:
    try:
        return len(bytes(range(128, 256)).decode(encoding, errors="replace")) == 128
    except LookupError:
        return False


def _is_plausible(text: str) -> bool:
    score = russian_score(text, capitals_suspect=False)
    if score is not None:
        return score >= PLAUSIBLE_RUSSIAN
    return not _garbled(text)


def _best_cyrillic(body: bytes) -> tuple[str, str, float] | None:
    """The best Cyrillic single-byte reading if it is plausible Russian: (codec, text, score)."""
    best = None
    for encoding in CYRILLIC_SINGLE_BYTE:
        text = _strict(body, encoding)
        score = russian_score(text) if text is not None else None
        if score is not None and score >= PLAUSIBLE_RUSSIAN and (best is None or score > best[2]):
            best = (codec_name(encoding), text, score)
    return best


def _detect(body: bytes) -> tuple[str, str, bool] | None:
    """charset-normalizer's reading: (codec, text, coherent); None when it has no answer."""
    match = from_bytes(body).best()
    if match is None:
        return None
    encoding = codec_name(match.encoding) or match.encoding
    text = _strict(body, encoding)
    if text is None:
        return None
    return encoding, text, match.coherence >= MIN_COHERENCE and match.chaos <= MAX_CHAOS


def _garbled(text: str) -> bool:
    if len(text) - len(text.encode("ascii", errors="ignore")) < MIN_NON_ASCII_TO_JUDGE:
        return False
    return garbled_ratio(text) >= GARBLED_MESS


def _strict(body: bytes, encoding: str) -> str | None:
    try:
        return body.decode(encoding)
    except (UnicodeDecodeError, LookupError):
        return None


def _decode_error(body: bytes, encoding: str) -> str:
    try:
        body.decode(encoding)
    except UnicodeDecodeError as exc:
        return f"byte 0x{body[exc.start]:02x} at offset {exc.start}"
    except LookupError:
        return "unknown encoding"
    raise AssertionError("called only for bytes that did not decode")


def _is_latin(char: str) -> bool:
    return char.isascii() and char.isalpha()
