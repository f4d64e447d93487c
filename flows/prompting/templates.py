"""Prompt templates: loading them from ``prompts/*.yaml``, rendering, and fitting the model.

A template is data: name, version, language, which news items feed it, sampling settings and a
Jinja2 body rendered in a sandbox with ``StrictUndefined``. Feed text only ever enters as
*values* of variables, so ``{{ ... }}`` inside a headline stays literal. Prompts are cut to fit
the model's positions by dropping the oldest items first, counting tokens with a function the
caller passes in: this module never imports the model or the tokenizer, and knows nothing of
the database.

A template may declare a ``signal``: a question (Jinja, the body's context) appended after the
rendered body, and a mapping of labels to answer texts. The model's probability of each answer
after the question is the robot's number (docs/signals.md); this module renders the question
and, for calibration, the content-free prompt (the body rendered with no news items).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jinja2
import yaml
from jinja2.sandbox import SandboxedEnvironment

from flows.errors import TemplateError

SCOPES = ("ticker", "market")
SAMPLING_KEYS = ("max_new_tokens", "temperature", "top_p", "top_k", "greedy", "seed")
DEFAULT_MAX_POSITIONS = 1024
_TEMPLATE_KEYS = {
    "name",
    "version",
    "language",
    "description",
    "scope",
    "items",
    "generation",
    "body",
    "signal",
}
_SIGNAL_KEYS = {"question", "answers"}
LABEL_CHARS = 32  # signals.label
_ITEM_KEYS = {"window_h", "max_items", "sources", "max_summary_chars"}

_ENVIRONMENT = SandboxedEnvironment(
    undefined=jinja2.StrictUndefined,
    autoescape=False,
    trim_blocks=True,
    lstrip_blocks=True,
    keep_trailing_newline=False,
)


@dataclass(frozen=True)
class ItemSelection:
    """Which news items feed a template: a time window, sources, a maximum count."""

    window_h: float = 24.0
    max_items: int = 30
    sources: tuple[str, ...] = ()
    max_summary_chars: int = 400


@dataclass(frozen=True)
class SignalSpec:
    """A template's signal: the question after the body, and label -> answer text (in order)."""

    question: str
    answers: Mapping[str, str]
    _compiled: jinja2.Template | None = field(default=None, repr=False, compare=False)


@dataclass(frozen=True)
class PromptTemplate:
    name: str
    version: int
    language: str
    description: str
    scope: str
    items: ItemSelection
    generation: Mapping[str, Any]
    body: str
    template_hash: str
    path: Path | None = None
    signal: SignalSpec | None = None
    _compiled: jinja2.Template | None = field(default=None, repr=False, compare=False)

    def render(self, context: Mapping[str, Any]) -> str:
        """Render with exactly ``context``; a variable it lacks is a ``TemplateError``."""
        return self._render(self._compiled, context).strip() + "\n"

    def signal_prefix(self, body: str, context: Mapping[str, Any]) -> str:
        """The text the signal's answers are scored after: the rendered ``body``, then the
        question rendered with the same ``context`` (no trailing whitespace: each answer starts
        with its own space)."""
        if self.signal is None:
            raise TemplateError(f"template {self.name!r} declares no signal")
        return body + self._render(self.signal._compiled, context).strip()

    def _render(self, compiled: jinja2.Template, context: Mapping[str, Any]) -> str:
        try:
            return compiled.render(**context)
        except jinja2.UndefinedError as exc:
            raise TemplateError(f"template {self.name!r}{_body_line(exc)}: {exc.message}") from exc
        except jinja2.exceptions.SecurityError as exc:
            raise TemplateError(f"template {self.name!r}: unsafe operation: {exc}") from exc
        except jinja2.TemplateError as exc:
            raise TemplateError(f"template {self.name!r}: {exc}") from exc


def _body_line(exc: BaseException) -> str:
    """`` line N`` of the body where rendering failed (Jinja puts the template's own frames in
    the traceback under the name ``<template>``), or nothing when it cannot tell."""
    line, frame = None, exc.__traceback__
    while frame is not None:
        if frame.tb_frame.f_code.co_filename == "<template>":
            line = frame.tb_lineno
        frame = frame.tb_next
    return f" body line {line}" if line else ""


@dataclass(frozen=True)
class FittedPrompt:
    text: str
    token_count: int
    items_used: tuple[Mapping[str, Any], ...]
    items_dropped: int


@dataclass(frozen=True)
class RenderedPrompt:
    """A prompt ready for the store; ``key`` hashes everything that went into it."""

    key: str
    template_name: str
    template_version: int
    template_hash: str
    language: str
    scope: str
    ticker: str | None
    as_of: str
    text: str
    token_count: int
    max_new_tokens: int
    sampling: Mapping[str, Any]
    item_keys: tuple[str, ...]
    items_dropped: int
    # The template's signal: {"prefix", "content_free_prefix", "answers": {label: text}}.
    signal: Mapping[str, Any] | None = None


def load_template(path: str | Path) -> PromptTemplate:
    path = Path(path)
    try:
        raw = path.read_text(encoding="utf-8")
        data = yaml.safe_load(raw)
    except OSError as exc:
        raise TemplateError(f"{path}: cannot read template: {exc.strerror}") from exc
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise TemplateError(f"{path}: not valid YAML: {exc}") from exc
    return parse_template(data, raw_text=raw, path=path)


def parse_template(data: Any, *, raw_text: str, path: Path | None = None) -> PromptTemplate:
    where = str(path) if path else "template"
    if not isinstance(data, Mapping):
        raise TemplateError(f"{where}: expected a mapping of template fields")
    unknown = sorted(set(map(str, data)) - _TEMPLATE_KEYS)
    if unknown:
        raise TemplateError(f"{where}: unknown key {unknown[0]!r}")

    def require(key: str, kind: type, label: str) -> Any:
        value = data.get(key)
        if not isinstance(value, kind) or isinstance(value, bool) or value in ("", None):
            raise TemplateError(f"{where}: {key}: expected {label}, got {value!r}")
        return value

    name = require("name", str, "a name")
    if path is not None and path.stem != name:
        raise TemplateError(f"{where}: name {name!r} must match the file name {path.stem!r}")
    version = require("version", int, "an integer version")
    language = require("language", str, "a language code like ru")
    body = require("body", str, "the Jinja2 template text")
    scope = data.get("scope", "ticker")
    if scope not in SCOPES:
        raise TemplateError(f"{where}: scope: one of {SCOPES}, got {scope!r}")
    generation = data.get("generation") or {}
    if not isinstance(generation, Mapping) or set(generation) - set(SAMPLING_KEYS):
        raise TemplateError(f"{where}: generation: only {', '.join(SAMPLING_KEYS)} are allowed")
    try:
        compiled = _ENVIRONMENT.from_string(body)
    except jinja2.TemplateSyntaxError as exc:
        raise TemplateError(f"{where}: body line {exc.lineno}: {exc.message}") from exc
    return PromptTemplate(
        signal=_signal(data.get("signal"), where),
        name=name,
        version=version,
        language=language,
        description=str(data.get("description") or "").strip(),
        scope=scope,
        items=_item_selection(data.get("items") or {}, where),
        generation=dict(generation),
        body=body,
        template_hash=hashlib.sha256(raw_text.encode("utf-8")).hexdigest(),
        path=path,
        _compiled=compiled,
    )


def _signal(data: Any, where: str) -> SignalSpec | None:
    if data is None:
        return None
    if not isinstance(data, Mapping) or set(data) != _SIGNAL_KEYS:
        raise TemplateError(f"{where}: signal: a mapping of question and answers")
    question, answers = data["question"], data["answers"]
    if not isinstance(question, str) or not question.strip():
        raise TemplateError(f"{where}: signal.question: the Jinja2 text of the question")
    if not isinstance(answers, Mapping) or len(answers) < 2:
        raise TemplateError(f"{where}: signal.answers: at least two labels, each with its answer")
    for label, answer in answers.items():
        if not isinstance(label, str) or not label.strip() or len(label) > LABEL_CHARS:
            raise TemplateError(
                f"{where}: signal.answers: label {label!r} must be a name of 1 to {LABEL_CHARS} "
                "characters"
            )
        if not isinstance(answer, str) or not answer.strip():
            raise TemplateError(f"{where}: signal.answers.{label}: a non-empty answer text")
    try:
        compiled = _ENVIRONMENT.from_string(question)
    except jinja2.TemplateSyntaxError as exc:
        raise TemplateError(f"{where}: signal.question line {exc.lineno}: {exc.message}") from exc
    return SignalSpec(question, dict(answers), compiled)


def _item_selection(data: Any, where: str) -> ItemSelection:
    if not isinstance(data, Mapping) or set(data) - _ITEM_KEYS:
        raise TemplateError(f"{where}: items: a mapping of {', '.join(sorted(_ITEM_KEYS))}")
    base = ItemSelection()
    window_h = data.get("window_h", base.window_h)
    max_items = data.get("max_items", base.max_items)
    max_chars = data.get("max_summary_chars", base.max_summary_chars)
    sources = data.get("sources") or []
    if not isinstance(window_h, int | float) or isinstance(window_h, bool) or window_h <= 0:
        raise TemplateError(f"{where}: items.window_h: a positive number of hours")
    for key, value in (("max_items", max_items), ("max_summary_chars", max_chars)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise TemplateError(f"{where}: items.{key}: a positive integer, got {value!r}")
    if not isinstance(sources, list) or not all(isinstance(item, str) for item in sources):
        raise TemplateError(f"{where}: items.sources: a list of feed names")
    return ItemSelection(float(window_h), max_items, tuple(sources), max_chars)


def load_templates(prompts_dir: str | Path, names: Sequence[str]) -> list[PromptTemplate]:
    return [load_template(Path(prompts_dir) / f"{name}.yaml") for name in names]


def fit_to_budget(
    template: PromptTemplate,
    context: Mapping[str, Any],
    items: Sequence[Mapping[str, Any]],
    *,
    count_tokens: Callable[[str], int],
    max_new_tokens: int,
    max_positions: int = DEFAULT_MAX_POSITIONS,
) -> FittedPrompt:
    """Render with as many of the newest ``items`` as fit beside ``max_new_tokens``.

    ``items`` are ordered oldest first; the oldest are dropped first. ``count_tokens`` returns
    the number of positions a text takes (with BOS, as the model sees it). The prompt and
    ``max_new_tokens`` together must fit ``max_positions``.
    """
    budget = max_positions - max_new_tokens
    if budget <= 0:
        raise TemplateError(
            f"template {template.name!r}: max_new_tokens={max_new_tokens} leaves no room for a "
            f"prompt in {max_positions} positions"
        )
    items = list(items)
    cache: dict[int, tuple[str, int]] = {}

    def measure(keep: int) -> tuple[str, int]:
        if keep not in cache:
            kept = items[len(items) - keep :] if keep else []
            text = template.render({**context, "items": kept})
            cache[keep] = (text, count_tokens(text))
        return cache[keep]

    if measure(len(items))[1] <= budget:
        best = len(items)
    elif measure(0)[1] > budget:
        raise TemplateError(
            f"template {template.name!r}: {measure(0)[1]} tokens even without news items, over "
            f"the budget of {budget} ({max_positions} positions - {max_new_tokens} new tokens)"
        )
    else:
        # The largest `keep` that fits; token count grows with each item kept.
        low, high = 0, len(items)
        while high - low > 1:
            middle = (low + high) // 2
            if measure(middle)[1] <= budget:
                low = middle
            else:
                high = middle
        best = low
    text, token_count = measure(best)
    kept = tuple(items[len(items) - best :]) if best else ()
    return FittedPrompt(text, token_count, kept, len(items) - best)
