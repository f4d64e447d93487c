"""The pipeline's YAML config: where it is, what it says, and whether it makes sense.

This module owns finding the config file (``--config``, else ``$YALM_FORECAST_CONFIG``, else
``./yalm-forecast.yaml``), reading it into frozen records, and validating every key with an
error that names the key at fault (``feeds[2].timeout_s: expected a number, got 'soon'``).
The records are pydantic dataclasses: types, bounds, choices and unknown keys are declared on
the fields, checked strictly (a YAML ``"16"`` is not a number, ``yes`` is not an integer), and
a refusal is worded by ``yalm_runner.settings.explain``. The ``generation:`` section *is* the
runner's settings (``yalm_runner.settings.RunnerSettings``, the same definitions as the
``yalm-runner`` flags) plus the pipeline's own keys. Relative paths in the file are relative to
the file's own directory. It does not fetch feeds, open databases or load templates; it only
checks that the template files it names exist.
"""

from __future__ import annotations

import codecs
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import yaml
from pydantic import AfterValidator, Field, model_validator
from pydantic.dataclasses import dataclass as settings_record

from flows.errors import PipelineConfigError, StoreError
from yalm_runner.settings import (
    SAMPLING_KEYS,
    SETTINGS_CONFIG,
    InvalidSettings,
    MaxNewTokens,
    RunnerSettings,
    SamplingSettings,
    SettingError,
    Temperature,
    build,
    check,
    explain,
)
from yalm_runner.settings import ValidationError as SettingsValidationError

ENV_VAR = "YALM_FORECAST_CONFIG"
DEFAULT_CONFIG_NAME = "yalm-forecast.yaml"
DEFAULT_LOG_NAME = "yalm-forecast.log"
DEFAULT_STATE_NAME = "yalm-forecast.state"  # beside the config, for a PostgreSQL store
FEED_URL_SCHEMES = ("http://", "https://", "file://")
# The checkout's prompts/ (an editable install), else the copy a wheel carries.
BUNDLED_PROMPTS_DIR = next(
    (
        folder
        for folder in (
            Path(__file__).resolve().parent.parent / "prompts",
            Path(__file__).resolve().parent / "bundled_prompts",
        )
        if folder.is_dir()
    ),
    Path(__file__).resolve().parent.parent / "prompts",
)
STARTER_CONFIG_PATH = Path(__file__).resolve().parent / "starter_config.yaml"

__all__ = ["SAMPLING_KEYS"]  # re-exported: the sampling keys a template may override
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_TICKER_RE = re.compile(r"[A-Z0-9.\-]{1,12}")
_FEED_DEFAULT_KEYS = ("enabled", "timeout_s", "max_bytes", "retries", "backoff_s")


def _text(value: str) -> str:
    if not value.strip():
        raise ValueError("must not be empty")
    return value


def _matching(pattern: re.Pattern, label: str):
    def check_value(value: str) -> str:
        if not pattern.fullmatch(value):
            raise ValueError(f"{label}, got {value!r}")
        return value

    return check_value


def _feed_url(value: str) -> str:
    if not value.startswith(FEED_URL_SCHEMES):
        raise ValueError(f"an http(s) or file:// URL, got {value!r}")
    return value


def _encoding(value: str) -> str:
    try:
        codecs.lookup(value)
    except LookupError:
        raise ValueError(f"unknown encoding {value!r} (e.g. windows-1251, koi8-r, utf-8)") from None
    return value


def _cron(value: str) -> str:
    if len(value.split()) != 5:
        raise ValueError(f"five fields, got {value!r}")
    return value


def _timezone(value: str) -> str:
    try:
        ZoneInfo(value)
    except (ZoneInfoNotFoundError, ValueError):
        raise ValueError(f"unknown time zone {value!r}") from None
    return value


Text = Annotated[str, AfterValidator(_text)]
Name = Annotated[str, AfterValidator(_matching(_NAME_RE, "letters, digits and _.- only"))]
Alias = Annotated[str, AfterValidator(_text), AfterValidator(str.strip)]


@settings_record(frozen=True, config=SETTINGS_CONFIG)
class FeedConfig:
    """One feed to fetch; the per-feed settings default to ``feed_defaults``."""

    name: Name
    url: Annotated[str, AfterValidator(_feed_url)]
    enabled: bool = True
    timeout_s: Annotated[float, Field(ge=0.01)] = 10.0
    max_bytes: Annotated[int, Field(ge=1)] = 5_000_000
    retries: Annotated[int, Field(ge=0)] = 2
    backoff_s: Annotated[float, Field(ge=0.0)] = 1.0
    encoding: Annotated[str, AfterValidator(_encoding)] | None = None  # read the bytes as this


@settings_record(frozen=True, config=SETTINGS_CONFIG)
class WatchlistEntry:
    """A ticker and the names news uses for it, in Russian and English."""

    ticker: Annotated[str, AfterValidator(_matching(_TICKER_RE, "a ticker like SBER"))]
    # A YAML list (lax: a list becomes the tuple); each alias stays a strict, non-empty string.
    aliases: Annotated[tuple[Alias, ...], Field(strict=False)] = ()


@dataclass(frozen=True)
class TemplateSelection:
    """A template to run, with optional per-template overrides of sampling settings."""

    name: str
    generation: Mapping[str, Any] = field(default_factory=dict)


@settings_record(frozen=True, config=SETTINGS_CONFIG)
class GenerationSettings(RunnerSettings):
    """The runner's settings (device, dtype, budgets, KV, sampling: ``RunnerSettings``, one
    definition for the YAML and the ``yalm-runner`` flags) plus the pipeline's own keys."""

    # The pipeline's forecasts are longer and cooler than the runner's plain default; the
    # setting (type, bounds, help) is the runner's, only the default differs here.
    max_new_tokens: MaxNewTokens = 200
    temperature: Temperature = 0.7
    max_positions: Annotated[int, Field(ge=2)] = 1024
    # Scale-out: with shards > 1 and a deployment, the nightly flow splits the pending prompts
    # into that many shards and starts one run of the deployment per shard (docs/postgres.md).
    shards: Annotated[int, Field(ge=1)] = 1
    # "generate-shard/gpu": the shard flow deployed to a pool
    deployment: Annotated[str, AfterValidator(_matching(re.compile(r"[^/]+/[^/]+"),
                          "FLOW/DEPLOYMENT, e.g. generate-shard/gpu"))] | None = None  # fmt: skip
    lease_s: Annotated[float, Field(ge=1.0)] = 1800.0  # a claim's lease; renewed at checkpoints
    # Under Prefect: the most often a job's progress artifact is updated (docs/night.md).
    progress_every_s: Annotated[float, Field(ge=0.0)] = 5.0

    @model_validator(mode="after")
    def _pipeline_rules(self) -> GenerationSettings:
        if self.shards > 1 and not self.deployment:
            raise SettingError(
                "deployment",
                "required with shards > 1 (the shard flow's deployment, e.g. generate-shard/gpu)",
            )
        if self.max_new_tokens >= self.max_positions:
            raise SettingError(
                "max_new_tokens",
                f"{self.max_new_tokens} leaves no room for a prompt in {self.max_positions} "
                "positions",
            )
        return self


@settings_record(frozen=True, config=SETTINGS_CONFIG)
class ScheduleSettings:
    cron: Annotated[str, AfterValidator(_cron)] = "0 6 * * 1-5"
    timezone: Annotated[str, AfterValidator(_timezone)] = "Europe/Moscow"


@settings_record(frozen=True, config=SETTINGS_CONFIG)
class RetentionSettings:
    """How long news items are kept (None: for ever). Forecasts are never pruned."""

    news_days: Annotated[int, Field(ge=1)] | None = None


@dataclass(frozen=True)
class PipelineConfig:
    path: Path | None
    database_url: str
    model: Path | None
    tokenizer: Path | None
    prompts_dir: Path
    theses: Path | None
    feeds: tuple[FeedConfig, ...]
    watchlist: tuple[WatchlistEntry, ...]
    templates: tuple[TemplateSelection, ...]
    generation: GenerationSettings = field(default_factory=GenerationSettings)
    schedule: ScheduleSettings = field(default_factory=ScheduleSettings)
    log_file: Path | None = None
    retention: RetentionSettings = field(default_factory=RetentionSettings)
    # Where a generation job keeps its batch plan and the live batch's KV checkpoints (one
    # folder per worker); removed as the job completes.
    state_dir: Path | None = None

    @property
    def database_path(self) -> Path:
        """The SQLite file (only for a SQLite store; readers take ``database_url``)."""
        if not self.database_url.startswith("sqlite:///"):
            raise PipelineConfigError("database: not a SQLite file; use the URL")
        return Path(self.database_url.removeprefix("sqlite:///"))


@settings_record(frozen=True, config=SETTINGS_CONFIG)
class _Document:
    """The file's top level; each section is checked by its own record, so that its errors
    carry its position (``feeds[2].timeout_s``)."""

    database: Text = "yalm-forecast.sqlite"
    model: Text | None = None
    tokenizer: Text | None = None
    prompts_dir: Text | None = None
    theses: Text | None = None
    log_file: Text | None = None
    state_dir: Text | None = None
    feed_defaults: dict = Field(default_factory=dict)
    feeds: list = Field(default_factory=list)
    watchlist: list = Field(default_factory=list)
    templates: list = Field(default_factory=list)
    generation: dict = Field(default_factory=dict)
    schedule: dict = Field(default_factory=dict)
    retention: dict = Field(default_factory=dict)


def resolve_config_path(cli_value: str | os.PathLike | None, environ=None) -> Path:
    """``--config`` if given, else ``$YALM_FORECAST_CONFIG``, else ``./yalm-forecast.yaml``."""
    environ = os.environ if environ is None else environ
    if cli_value:
        return Path(cli_value)
    if environ.get(ENV_VAR):
        return Path(environ[ENV_VAR])
    return Path(DEFAULT_CONFIG_NAME)


def load_config(path: str | os.PathLike) -> PipelineConfig:
    path = Path(path)
    if not path.is_file():
        raise PipelineConfigError(
            f"config file not found: {path} (write a starter one with `yalm-forecast init`)"
        )
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise PipelineConfigError(f"{path}: not valid YAML: {exc}") from exc
    try:
        return parse_config(
            data if data is not None else {}, base_dir=path.resolve().parent, path=path
        )
    except PipelineConfigError as exc:
        raise PipelineConfigError(f"{path}: {exc}") from None


def parse_config(data: Any, *, base_dir: Path, path: Path | None = None) -> PipelineConfig:
    """Validate an already-parsed YAML document; errors name the key (``feeds[0].url: ...``)."""
    try:
        return _parse(data, base_dir, path)
    except InvalidSettings as exc:
        raise PipelineConfigError(str(exc)) from None


def _parse(data: Any, base_dir: Path, path: Path | None) -> PipelineConfig:
    top = _record(_Document, data, "")

    def resolve(value: str | None) -> Path | None:
        if value is None:
            return None
        candidate = Path(value).expanduser()
        return candidate if candidate.is_absolute() else base_dir / candidate

    prompts_dir = resolve(top.prompts_dir) or BUNDLED_PROMPTS_DIR
    database_url = _database_url(top.database, base_dir)
    return PipelineConfig(
        path=path,
        database_url=database_url,
        model=resolve(top.model),
        tokenizer=resolve(top.tokenizer),
        prompts_dir=prompts_dir,
        theses=resolve(top.theses),
        feeds=_feeds(top.feeds, _feed_defaults(top.feed_defaults)),
        watchlist=_watchlist(top.watchlist),
        templates=_templates(top.templates, prompts_dir),
        generation=_record(GenerationSettings, top.generation, "generation"),
        schedule=_record(ScheduleSettings, top.schedule, "schedule"),
        log_file=resolve(top.log_file) or base_dir / DEFAULT_LOG_NAME,
        retention=_record(RetentionSettings, top.retention, "retention"),
        state_dir=resolve(top.state_dir) or _default_state_dir(database_url, base_dir),
    )


def _default_state_dir(database_url: str, base_dir: Path) -> Path:
    """Beside the SQLite file (``<database>.state``), else beside the config file."""
    if database_url.startswith("sqlite:///"):
        database = Path(database_url.removeprefix("sqlite:///"))
        return database.with_name(database.name + ".state")
    return base_dir / DEFAULT_STATE_NAME


def _record(kind: type, data: Any, where: str):
    """``kind`` from one YAML mapping; a key set to nothing (``key:``) means its default."""
    if not isinstance(data, Mapping):
        raise PipelineConfigError(f"{where or 'config'}: expected a mapping, got {data!r}")
    return build(kind, {key: value for key, value in data.items() if value is not None}, where)


def _database_url(value: str, base_dir: Path) -> str:
    """A ``sqlite:///`` URL with an absolute path, or a ``postgresql+psycopg://`` URL."""
    if "://" in value and not value.startswith("sqlite:///"):
        # Parsing is not opening: the URL is checked here, the server only when a store opens.
        from flows.store.database import parse_database_url

        try:
            url = parse_database_url(value)
        except StoreError as exc:
            raise PipelineConfigError(f"database: {exc}") from None
        if url.get_backend_name() != "postgresql":
            raise PipelineConfigError("database: a SQLite file path or a postgresql:// URL")
        return url.render_as_string(hide_password=False)
    value = value.removeprefix("sqlite:///")
    if not value or value == ":memory:":
        raise PipelineConfigError("database: needs a file path (readers open it separately)")
    candidate = Path(value).expanduser()
    return "sqlite:///" + str(candidate if candidate.is_absolute() else base_dir / candidate)


def _feed_defaults(data: dict) -> dict[str, Any]:
    """The per-feed settings every feed starts from, checked as a feed's would be."""
    for key in ("name", "url"):
        if key in data:
            raise PipelineConfigError(f"feed_defaults.{key}: unknown key")
    placeholder = {"name": "defaults", "url": "https://defaults/"}
    base = _record(FeedConfig, {**placeholder, **data}, "feed_defaults")
    return {key: getattr(base, key) for key in _FEED_DEFAULT_KEYS}


def _feeds(entries: list, defaults: dict[str, Any]) -> tuple[FeedConfig, ...]:
    feeds: list[FeedConfig] = []
    for index, value in enumerate(entries):
        where = f"feeds[{index}]"
        given = value if isinstance(value, Mapping) else {}
        feed = _record(FeedConfig, {**defaults, **given} if given else value, where)
        if feed.name in {other.name for other in feeds}:
            raise PipelineConfigError(f"{where}.name: duplicate feed name {feed.name!r}")
        feeds.append(feed)
    return tuple(feeds)


def _watchlist(entries: list) -> tuple[WatchlistEntry, ...]:
    watchlist: list[WatchlistEntry] = []
    for index, value in enumerate(entries):
        where = f"watchlist[{index}]"
        entry = _record(WatchlistEntry, value, where)
        if entry.ticker in {other.ticker for other in watchlist}:
            raise PipelineConfigError(f"{where}.ticker: duplicate ticker {entry.ticker!r}")
        watchlist.append(entry)
    return tuple(watchlist)


def _templates(entries: list, prompts_dir: Path) -> tuple[TemplateSelection, ...]:
    selections = []
    for index, value in enumerate(entries):
        where = f"templates[{index}]"
        overrides: dict[str, Any] = {}
        if isinstance(value, str):
            name = value
        else:
            entry = _record(_TemplateEntry, value, where)
            name, where = entry.name, f"{where}.name"
            overrides = _sampling_overrides(entry.generation, f"templates[{index}].generation")
        if not name or not _NAME_RE.match(name):
            raise PipelineConfigError(f"{where}: expected a template name, got {name!r}")
        if not (prompts_dir / f"{name}.yaml").is_file():
            raise PipelineConfigError(f"{where}: no template {name!r} in {prompts_dir}")
        selections.append(TemplateSelection(name=name, generation=overrides))
    return tuple(selections)


@settings_record(frozen=True, config=SETTINGS_CONFIG)
class _TemplateEntry:
    name: Text
    generation: dict = Field(default_factory=dict)


def _sampling_overrides(data: dict, where: str) -> dict[str, Any]:
    """Per-template sampling settings: each checked alone by its setting's own rules (the
    merged settings are checked when the prompt is generated)."""
    overrides = {}
    for key, value in data.items():
        if key not in SAMPLING_KEYS:
            raise PipelineConfigError(
                f"{where}.{key}: only sampling settings ({', '.join(SAMPLING_KEYS)}) may be "
                "overridden per template"
            )
        try:
            overrides[key] = check(SamplingSettings, key, value)
        except SettingsValidationError as exc:
            raise PipelineConfigError(explain(exc, f"{where}.{key}")) from None
    return overrides


def write_starter_config(path: str | os.PathLike) -> Path:
    """Write the commented starter config; never overwrites an existing file."""
    path = Path(path)
    try:
        with path.open("x", encoding="utf-8") as handle:
            handle.write(STARTER_CONFIG_PATH.read_text(encoding="utf-8"))
    except FileExistsError:
        raise PipelineConfigError(f"{path}: already exists; not overwriting it") from None
    except OSError as exc:
        raise PipelineConfigError(f"{path}: cannot write: {exc.strerror}") from exc
    return path
