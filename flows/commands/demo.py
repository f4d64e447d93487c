"""The offline demo: a tiny YaLM-architecture model, the bundled sample feeds, a local SQLite file.

Owns setting the demo up in a folder (default ``./yalm-forecast-demo``): on first use it makes a
tiny random checkpoint in the release layout, on the real YaLM vocabulary shipped with the
package (so prompts are counted and cut exactly as for YaLM-100B), and converts it with the real
converter (the same path the real YaLM-100B takes), and it writes a config whose feeds are the
bundled sample files (``file://``), whose database and log live in the folder, and whose prompts
are dated like the sample news. The config goes to ``./yalm-forecast.yaml`` unless a file that
the demo did not write is there already, so ``yalm-forecast results`` right after the demo shows
its forecasts; someone's own config is never touched: the demo's then lives in its folder, where
``demo_beside`` finds it for a ``results`` whose own database does not exist yet. The model is
tiny and random: its forecasts are noise drawn from YaLM's 128,000 pieces, not predictions.
Running the flow is the caller's job; this module knows nothing of Prefect.
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

import yaml

from flows.config import DEFAULT_CONFIG_NAME

SAMPLE_FEEDS_DIR = Path(__file__).resolve().parents[1] / "sample_feeds"
SAMPLE_FEEDS = {
    "markets-ru": "markets_ru.rss.xml",
    "birzha-cp1251": "birzha_cp1251.rss.xml",
    "global-markets-en": "global_markets_en.atom.xml",
}
# The sample news is dated 13-14 May 2024; the demo renders as of that morning.
DEMO_AS_OF = "2024-05-14T06:00:00Z"
DEMO_MARKER = "# written by `yalm-forecast demo`"
DEMO_DIR = "yalm-forecast-demo"  # the demo's folder, in the current one, unless --dir says
# Sampling over the real 128,000-piece vocabulary (a sort per row per step) dominates the demo on
# a CPU; 32 tokens a forecast keep it quick and are plenty to show the pipeline.
DEMO_MAX_NEW_TOKENS = 32
WATCHLIST = [
    {"ticker": "SBER", "aliases": ["Сбербанк", "Сбер", "Sberbank"]},
    {"ticker": "GAZP", "aliases": ["Газпром", "Gazprom"]},
    {"ticker": "LKOH", "aliases": ["Лукойл", "Lukoil"]},
    {"ticker": "YDEX", "aliases": ["Яндекс", "Yandex", "YNDX"]},
    {"ticker": "AAPL", "aliases": ["Apple"]},
    {"ticker": "NVDA", "aliases": ["Nvidia"]},
]
TEMPLATES = ("ticker_outlook_ru", "ticker_outlook_en", "morning_brief_ru")
log = logging.getLogger("flows.commands.demo")


@dataclass(frozen=True)
class DemoSetup:
    folder: Path
    model: Path
    config_path: Path
    database: Path
    config_written: bool


def ensure_tiny_model(folder: Path) -> Path:
    """The demo's converted tiny store, made (release, then converter) on first use."""
    from yalm_runner.convert import convert_release
    from yalm_runner.tiny import make_tiny
    from yalm_runner.vocab import bundled_vocab_path

    store = folder / "tiny-store"
    if (store / "manifest.json").is_file():
        return store
    release = folder / "tiny-release"
    shutil.rmtree(release, ignore_errors=True)  # a half-made one from an interrupted demo
    shutil.rmtree(store, ignore_errors=True)
    log.info("demo: making a tiny random YaLM-architecture model in %s (first use only)", release)
    make_tiny(release, vocab=bundled_vocab_path())
    log.info("demo: converting it with the real converter into %s", store)
    convert_release(release, store, num_heads=4)
    shutil.rmtree(release)
    return store


def demo_config(folder: Path, config_dir: Path) -> dict:
    def rel(path: Path) -> str:
        try:
            return str(path.resolve().relative_to(config_dir.resolve()))
        except ValueError:
            return str(path.resolve())

    return {
        "database": rel(folder / "forecast.sqlite"),
        "model": rel(folder / "tiny-store"),
        "log_file": rel(folder / "yalm-forecast.log"),
        "feed_defaults": {"timeout_s": 5, "retries": 0},
        "feeds": [
            {"name": name, "url": (SAMPLE_FEEDS_DIR / file).resolve().as_uri()}
            for name, file in SAMPLE_FEEDS.items()
        ],
        "watchlist": WATCHLIST,
        "templates": [
            {"name": name, "generation": {"max_new_tokens": DEMO_MAX_NEW_TOKENS}}
            for name in TEMPLATES
        ],
        "generation": {"device": "auto", "dtype": "auto", "checkpoint_every": 8},
        "schedule": {"cron": "0 6 * * 1-5", "timezone": "Europe/Moscow"},
    }


def write_demo_config(path: Path, folder: Path) -> None:
    text = yaml.safe_dump(demo_config(folder, path.parent), allow_unicode=True, sort_keys=False)
    header = (
        f"{DEMO_MARKER}: a tiny random model and the bundled sample feeds.\n"
        "# For real forecasts write your own config with `yalm-forecast init`.\n"
    )
    path.write_text(header + text, encoding="utf-8")


def is_demo_config(path: Path) -> bool:
    try:
        return path.read_text(encoding="utf-8").startswith(DEMO_MARKER)
    except (OSError, UnicodeDecodeError):
        return False


def demo_beside(cwd: Path) -> Path | None:
    """The config a demo run in ``cwd`` left in its default folder, if there is one."""
    path = cwd / DEMO_DIR / DEFAULT_CONFIG_NAME
    return path if is_demo_config(path) else None


def prepare_demo(folder: Path, cwd: Path) -> DemoSetup:
    """Make the model if needed and pick (writing if needed) the config the demo runs with."""
    folder.mkdir(parents=True, exist_ok=True)
    model = ensure_tiny_model(folder)
    main_config = cwd / DEFAULT_CONFIG_NAME
    if main_config.exists() and not is_demo_config(main_config):
        # Someone's own config: never touched; the demo runs with one in its folder.
        config_path, written = folder / DEFAULT_CONFIG_NAME, False
    else:
        config_path, written = main_config, True
    write_demo_config(config_path, folder)
    return DemoSetup(folder, model, config_path, folder / "forecast.sqlite", written)
