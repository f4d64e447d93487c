"""The pipeline's YAML config: where it is, what it says, and whether it makes sense.

This module owns finding the config file (``--config``, else ``$YALM_FORECAST_CONFIG``, else
``./yalm-forecast.yaml``), reading it into frozen dataclasses, and validating every key with an
error that names the key at fault (``feeds[2].timeout_s: expected a number, got 'soon'``).
Relative paths in the file are relative to the file's own directory. It does not fetch feeds,
open databases or load templates; it only checks that the template files it names exist.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import yaml

from flows.errors import PipelineConfigError, StoreError

ENV_VAR = "YALM_FORECAST_CONFIG"
DEFAULT_CONFIG_NAME = "yalm-forecast.yaml"
DEFAULT_LOG_NAME = "yalm-forecast.log"
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

SAMPLING_KEYS = ("max_new_tokens", "temperature", "top_p", "top_k", "greedy", "seed")
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_MEMORY_RE = re.compile(r"^\d+(\.\d+)?\s*([KMGT]i?B|B)?$", re.IGNORECASE)
_DTYPES = ("auto", "float16", "bfloat16", "float32")
_CHOICES = {  # offload settings the runner takes as words
    "weights_on": ("auto", "gpu", "cpu", "disk"),
    "kv_on": ("auto", "gpu", "cpu"),
}


@dataclass(frozen=True)
class FeedConfig:
    """One feed to fetch; the per-feed settings default to ``feed_defaults``."""

    name: str
    url: str
    enabled: bool = True
    timeout_s: float = 10.0
    max_bytes: int = 5_000_000
    retries: int = 2
    backoff_s: float = 1.0


@dataclass(frozen=True)
class WatchlistEntry:
    """A ticker and the names news uses for it, in Russian and English."""

    ticker: str
    aliases: tuple[str, ...] = ()


@dataclass(frozen=True)
class TemplateSelection:
    """A template to run, with optional per-template overrides of sampling settings."""

    name: str
    generation: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class GenerationSettings:
    """Sampling and offload settings handed to the model runner (which validates them again)."""

    max_new_tokens: int = 200
    temperature: float = 0.7
    top_p: float = 0.9
    top_k: int = 0
    greedy: bool = False
    seed: int = 1234
    batch_size: int | None = None  # None (``auto``): the largest batch the memory budgets allow
    device: str = "auto"  # the first CUDA device when there is one, else the CPU; or several
    dtype: str = "auto"  # fp32 on the CPU, the store's 16-bit dtype on a GPU
    gpu_memory: str | None = None
    cpu_memory: str | None = None
    weights_on: str = "auto"  # where streamed layers live: auto, gpu, cpu (pinned RAM), disk
    kv_on: str = "auto"  # where the KV cache lives between layers: auto, gpu, cpu
    kv_bits: int = 16  # 8 or 4: a KV cache in pinned RAM kept compressed (more rows, lossy)
    checkpoint_every: int = 16
    max_positions: int = 1024
    # Scale-out: with shards > 1 and a deployment, the nightly flow splits the pending prompts
    # into that many shards and starts one run of the deployment per shard (README, PostgreSQL).
    shards: int = 1
    deployment: str | None = None  # "generate-shard/gpu": the shard flow deployed to a pool
    lease_s: float = 1800.0  # a claim's lease; renewed at every checkpoint

    def sampling(self) -> dict[str, Any]:
        return {key: getattr(self, key) for key in SAMPLING_KEYS}


@dataclass(frozen=True)
class ScheduleSettings:
    cron: str = "0 6 * * 1-5"
    timezone: str = "Europe/Moscow"


@dataclass(frozen=True)
class RetentionSettings:
    """How long news items are kept (None: for ever). Forecasts are never pruned."""

    news_days: int | None = None


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
    generation: GenerationSettings = GenerationSettings()
    schedule: ScheduleSettings = ScheduleSettings()
    log_file: Path | None = None
    retention: RetentionSettings = RetentionSettings()

    @property
    def database_path(self) -> Path:
        """The SQLite file (only for a SQLite store; readers take ``database_url``)."""
        if not self.database_url.startswith("sqlite:///"):
            raise PipelineConfigError("database: not a SQLite file; use the URL")
        return Path(self.database_url.removeprefix("sqlite:///"))


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
    top = _Section(data, "")
    prompts_dir = top.path("prompts_dir", base_dir) or BUNDLED_PROMPTS_DIR
    feed_defaults = _feed_defaults(top.section("feed_defaults"))
    config = PipelineConfig(
        path=path,
        database_url=_database_url(top.text("database", "yalm-forecast.sqlite"), base_dir),
        model=top.path("model", base_dir),
        tokenizer=top.path("tokenizer", base_dir),
        prompts_dir=prompts_dir,
        theses=top.path("theses", base_dir),
        feeds=_feeds(top.items("feeds"), feed_defaults),
        watchlist=_watchlist(top.items("watchlist")),
        templates=_templates(top.items("templates"), prompts_dir),
        generation=_generation(top.section("generation"), "generation"),
        schedule=_schedule(top.section("schedule")),
        log_file=top.path("log_file", base_dir) or base_dir / DEFAULT_LOG_NAME,
        retention=_retention(top.section("retention")),
    )
    top.finish()
    return config


class _Section:
    """Typed access to one mapping of the YAML; remembers which keys were read."""

    def __init__(self, data: Any, where: str):
        if not isinstance(data, Mapping):
            raise PipelineConfigError(f"{where or 'config'}: expected a mapping, got {data!r}")
        self.data, self.where, self.seen = data, where, set()

    def key(self, name: str) -> str:
        return f"{self.where}.{name}" if self.where else name

    def _get(self, name: str, kinds: tuple[type, ...], label: str, default: Any) -> Any:
        self.seen.add(name)
        value = self.data.get(name)
        if value is None:
            return default
        # YAML booleans are ints in Python; a number key must not accept `yes`.
        if isinstance(value, bool) and bool not in kinds:
            kinds = ()
        if not isinstance(value, kinds):
            raise PipelineConfigError(f"{self.key(name)}: expected {label}, got {value!r}")
        return value

    def text(self, name: str, default: str | None = None) -> str | None:
        value = self._get(name, (str,), "a string", default)
        if value is not None and not value.strip():
            raise PipelineConfigError(f"{self.key(name)}: must not be empty")
        return value

    def integer(self, name: str, default: int | None, minimum: int | None = 0) -> int | None:
        value = self._get(name, (int,), "an integer", default)
        if value is not None and minimum is not None and value < minimum:
            raise PipelineConfigError(f"{self.key(name)}: must be >= {minimum}, got {value}")
        return value

    def number(self, name: str, default: float | None, minimum: float = 0.0) -> float | None:
        value = self._get(name, (int, float), "a number", default)
        if value is not None and value < minimum:
            raise PipelineConfigError(f"{self.key(name)}: must be >= {minimum}, got {value}")
        return None if value is None else float(value)

    def flag(self, name: str, default: bool) -> bool:
        return self._get(name, (bool,), "true or false", default)

    def path(self, name: str, base_dir: Path) -> Path | None:
        value = self.text(name)
        if value is None:
            return None
        candidate = Path(value).expanduser()
        return candidate if candidate.is_absolute() else base_dir / candidate

    def items(self, name: str) -> list[tuple[str, Any]]:
        values = self._get(name, (list,), "a list", [])
        return [(f"{self.key(name)}[{index}]", value) for index, value in enumerate(values)]

    def section(self, name: str) -> _Section:
        return _Section(self._get(name, (Mapping,), "a mapping", {}), self.key(name))

    def finish(self) -> None:
        unknown = sorted(str(key) for key in self.data if key not in self.seen)
        if unknown:
            raise PipelineConfigError(f"{self.key(unknown[0])}: unknown key")


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


def _feed_defaults(section: _Section) -> dict[str, Any]:
    base = FeedConfig(name="-", url="-")
    defaults = {
        "enabled": section.flag("enabled", base.enabled),
        "timeout_s": section.number("timeout_s", base.timeout_s, minimum=0.01),
        "max_bytes": section.integer("max_bytes", base.max_bytes, minimum=1),
        "retries": section.integer("retries", base.retries),
        "backoff_s": section.number("backoff_s", base.backoff_s),
    }
    section.finish()
    return defaults


def _feeds(entries: list[tuple[str, Any]], defaults: dict[str, Any]) -> tuple[FeedConfig, ...]:
    feeds, names = [], set()
    for where, value in entries:
        section = _Section(value, where)
        name, url = section.text("name"), section.text("url")
        if name is None or not _NAME_RE.match(name):
            raise PipelineConfigError(f"{section.key('name')}: required; letters, digits, _.-")
        if name in names:
            raise PipelineConfigError(f"{section.key('name')}: duplicate feed name {name!r}")
        if url is None or not url.startswith(FEED_URL_SCHEMES):
            raise PipelineConfigError(
                f"{section.key('url')}: required http(s) or file:// URL, got {url!r}"
            )
        names.add(name)
        feeds.append(
            FeedConfig(
                name=name,
                url=url,
                enabled=section.flag("enabled", defaults["enabled"]),
                timeout_s=section.number("timeout_s", defaults["timeout_s"], minimum=0.01),
                max_bytes=section.integer("max_bytes", defaults["max_bytes"], minimum=1),
                retries=section.integer("retries", defaults["retries"]),
                backoff_s=section.number("backoff_s", defaults["backoff_s"]),
            )
        )
        section.finish()
    return tuple(feeds)


def _watchlist(entries: list[tuple[str, Any]]) -> tuple[WatchlistEntry, ...]:
    watchlist, tickers = [], set()
    for where, value in entries:
        section = _Section(value, where)
        ticker = section.text("ticker")
        if ticker is None or not re.fullmatch(r"[A-Z0-9.\-]{1,12}", ticker):
            raise PipelineConfigError(
                f"{section.key('ticker')}: required, like SBER, got {ticker!r}"
            )
        if ticker in tickers:
            raise PipelineConfigError(f"{section.key('ticker')}: duplicate ticker {ticker!r}")
        tickers.add(ticker)
        aliases = []
        for alias_where, alias in section.items("aliases"):
            if not isinstance(alias, str) or not alias.strip():
                raise PipelineConfigError(f"{alias_where}: expected a non-empty string")
            aliases.append(alias.strip())
        watchlist.append(WatchlistEntry(ticker=ticker, aliases=tuple(aliases)))
        section.finish()
    return tuple(watchlist)


def _templates(entries: list[tuple[str, Any]], prompts_dir: Path) -> tuple[TemplateSelection, ...]:
    selections = []
    for where, value in entries:
        overrides: dict[str, Any] = {}
        if isinstance(value, str):
            name = value
        else:
            section = _Section(value, where)
            name = section.text("name")
            overrides_section = section.section("generation")
            parsed = _generation(overrides_section, overrides_section.where)
            overrides = {key: getattr(parsed, key) for key in overrides_section.data}
            bad = sorted(set(overrides) - set(SAMPLING_KEYS))
            if bad:
                raise PipelineConfigError(
                    f"{overrides_section.key(bad[0])}: only sampling settings "
                    f"({', '.join(SAMPLING_KEYS)}) may be overridden per template"
                )
            section.finish()
            where = section.key("name")
        if not name or not _NAME_RE.match(name):
            raise PipelineConfigError(f"{where}: expected a template name, got {name!r}")
        if not (prompts_dir / f"{name}.yaml").is_file():
            raise PipelineConfigError(f"{where}: no template {name!r} in {prompts_dir}")
        selections.append(TemplateSelection(name=name, generation=overrides))
    return tuple(selections)


def _generation(section: _Section, where: str) -> GenerationSettings:
    base = GenerationSettings()
    settings = GenerationSettings(
        max_new_tokens=section.integer("max_new_tokens", base.max_new_tokens, minimum=1),
        temperature=section.number("temperature", base.temperature),
        top_p=section.number("top_p", base.top_p),
        top_k=section.integer("top_k", base.top_k),
        greedy=section.flag("greedy", base.greedy),
        seed=section.integer("seed", base.seed, minimum=None),
        batch_size=_batch_size(section),
        device=section.text("device", base.device),
        dtype=section.text("dtype", base.dtype),
        gpu_memory=section.text("gpu_memory"),
        cpu_memory=section.text("cpu_memory"),
        weights_on=section.text("weights_on", base.weights_on),
        kv_on=section.text("kv_on", base.kv_on),
        kv_bits=section.integer("kv_bits", base.kv_bits, minimum=1),
        checkpoint_every=section.integer("checkpoint_every", base.checkpoint_every, minimum=1),
        max_positions=section.integer("max_positions", base.max_positions, minimum=2),
        shards=section.integer("shards", base.shards, minimum=1),
        deployment=section.text("deployment"),
        lease_s=section.number("lease_s", base.lease_s, minimum=1.0),
    )
    section.finish()
    if settings.shards > 1 and not settings.deployment:
        raise PipelineConfigError(
            f"{section.key('deployment')}: required with shards > 1 (the shard flow's "
            "deployment, e.g. generate-shard/gpu)"
        )
    if settings.deployment is not None and not re.fullmatch(r"[^/]+/[^/]+", settings.deployment):
        raise PipelineConfigError(
            f"{section.key('deployment')}: FLOW/DEPLOYMENT, e.g. generate-shard/gpu, "
            f"got {settings.deployment!r}"
        )
    if settings.top_p > 1.0:
        raise PipelineConfigError(
            f"{section.key('top_p')}: must be in [0, 1], got {settings.top_p}"
        )
    if settings.dtype not in _DTYPES:
        raise PipelineConfigError(
            f"{section.key('dtype')}: one of {_DTYPES}, got {settings.dtype!r}"
        )
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?|cuda:all|cuda:\d+(,cuda:\d+)+", settings.device):
        raise PipelineConfigError(
            f"{section.key('device')}: auto, cpu, cuda, cuda:N, cuda:all or cuda:0,cuda:1"
        )
    for key, choices in _CHOICES.items():
        if getattr(settings, key) not in choices:
            raise PipelineConfigError(
                f"{section.key(key)}: one of {', '.join(choices)}, got {getattr(settings, key)!r}"
            )
    if settings.kv_bits not in (16, 8, 4):
        raise PipelineConfigError(f"{section.key('kv_bits')}: 16, 8 or 4, got {settings.kv_bits}")
    if settings.kv_bits != 16 and settings.kv_on == "gpu":
        raise PipelineConfigError(
            f"{section.key('kv_bits')}: {settings.kv_bits}-bit KV is for a cache in pinned RAM; "
            "set kv_on to auto or cpu"
        )
    for key in ("gpu_memory", "cpu_memory"):
        value = getattr(settings, key)
        if value is not None and not _MEMORY_RE.match(value):
            raise PipelineConfigError(f"{section.key(key)}: a size like 8GiB, got {value!r}")
    if settings.max_new_tokens >= settings.max_positions:
        raise PipelineConfigError(
            f"{section.key('max_new_tokens')}: {settings.max_new_tokens} leaves no room for a "
            f"prompt in {settings.max_positions} positions"
        )
    return settings


def _batch_size(section: _Section) -> int | None:
    """``auto`` (or unset): chosen from the memory budgets; else a positive integer."""
    if section.data.get("batch_size") == "auto":
        section.seen.add("batch_size")
        return None
    value = section._get("batch_size", (int,), "a positive integer or auto", None)
    if value is not None and value < 1:
        raise PipelineConfigError(f"{section.key('batch_size')}: must be >= 1, got {value}")
    return value


def _schedule(section: _Section) -> ScheduleSettings:
    base = ScheduleSettings()
    schedule = ScheduleSettings(
        cron=section.text("cron", base.cron), timezone=section.text("timezone", base.timezone)
    )
    section.finish()
    if len(schedule.cron.split()) != 5:
        raise PipelineConfigError(f"{section.key('cron')}: five fields, got {schedule.cron!r}")
    try:
        ZoneInfo(schedule.timezone)
    except (ZoneInfoNotFoundError, ValueError) as exc:
        raise PipelineConfigError(
            f"{section.key('timezone')}: unknown time zone {schedule.timezone!r}"
        ) from exc
    return schedule


def _retention(section: _Section) -> RetentionSettings:
    retention = RetentionSettings(news_days=section.integer("news_days", None, minimum=1))
    section.finish()
    return retention


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
