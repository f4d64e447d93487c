"""Config: found where the docs say, validated, and every error names the key at fault."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from flows_testkit import write_config

from flows.config import (
    BUNDLED_PROMPTS_DIR,
    DEFAULT_CONFIG_NAME,
    ENV_VAR,
    STARTER_CONFIG_PATH,
    load_config,
    resolve_config_path,
    write_starter_config,
)
from flows.errors import PipelineConfigError


def test_starter_config_is_valid_and_has_russian_and_international_feeds(tmp_path: Path):
    path = write_starter_config(tmp_path / "yalm-forecast.yaml")
    config = load_config(path)
    assert config.database_url == f"sqlite:///{tmp_path / 'yalm-forecast.sqlite'}"
    hosts = {feed.url.split("/")[2] for feed in config.feeds}
    assert {"www.interfax.ru", "www.cbr.ru"} <= hosts
    assert {"feeds.marketwatch.com", "www.federalreserve.gov"} <= hosts
    assert {entry.ticker for entry in config.watchlist} >= {"SBER", "GAZP", "AAPL", "NVDA"}
    assert [selection.name for selection in config.templates] == [
        "ticker_outlook_ru",
        "ticker_outlook_en",
        "morning_brief_ru",
    ]
    assert config.generation.max_positions == 1024
    assert "#" in path.read_text(encoding="utf-8")  # commented


def test_init_never_overwrites(tmp_path: Path):
    path = tmp_path / "yalm-forecast.yaml"
    path.write_text("mine: true\n")
    with pytest.raises(PipelineConfigError, match="already exists"):
        write_starter_config(path)
    assert path.read_text() == "mine: true\n"


def test_config_path_resolution_order(tmp_path: Path):
    environ = {ENV_VAR: str(tmp_path / "from-env.yaml")}
    assert resolve_config_path("given.yaml", environ) == Path("given.yaml")
    assert resolve_config_path(None, environ) == tmp_path / "from-env.yaml"
    assert resolve_config_path(None, {}) == Path(DEFAULT_CONFIG_NAME)


def test_relative_paths_are_relative_to_the_config_file(tmp_path: Path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "p.yaml").write_text("name: p\nversion: 1\nlanguage: en\nbody: x\n")
    path = write_config(
        tmp_path,
        database="data/f.sqlite",
        model="models/store",
        tokenizer="/abs/voc.sp",
        prompts_dir="mine",
        templates=["p"],
        theses="theses.md",
    )
    config = load_config(path)
    assert config.database_path == tmp_path / "data" / "f.sqlite"
    assert config.model == tmp_path / "models" / "store"
    assert config.tokenizer == Path("/abs/voc.sp")
    assert config.prompts_dir == tmp_path / "mine"
    assert config.theses == tmp_path / "theses.md"


def test_a_postgresql_url_is_taken_as_is_and_readers_use_it(tmp_path: Path):
    for given in (
        "postgresql://yalm@db.internal:5432/yalm",
        "postgres://yalm@db.internal:5432/yalm",
    ):
        config = load_config(write_config(tmp_path, database=given))
        assert config.database_url == "postgresql+psycopg://yalm@db.internal:5432/yalm"
    with pytest.raises(PipelineConfigError, match="database: not a SQLite file; use the URL"):
        config.database_path  # noqa: B018


def test_defaults(tmp_path: Path):
    config = load_config(write_config(tmp_path, feeds=[{"name": "a", "url": "https://a.test/"}]))
    assert config.prompts_dir == BUNDLED_PROMPTS_DIR
    assert config.feeds[0].timeout_s == 0.5  # from feed_defaults
    assert config.feeds[0].max_bytes == 5_000_000
    assert config.schedule.timezone == "Europe/Moscow"
    # Exact resume's files beside the database; its KV checkpoints every ten minutes.
    assert config.state_dir == config.database_path.with_name(config.database_path.name + ".state")
    assert config.generation.kv_checkpoint_interval == 600.0
    postgres = load_config(write_config(tmp_path, database="postgresql://yalm@db/yalm"))
    assert postgres.state_dir == tmp_path / "yalm-forecast.state"
    assert load_config(write_config(tmp_path, state_dir="runs/state")).state_dir == (
        tmp_path / "runs" / "state"
    )


@pytest.mark.parametrize("device", ["auto", "cpu", "cuda:1", "cuda:0,cuda:1", "cuda:all"])
def test_generation_devices_accept_several_gpus(tmp_path: Path, device: str):
    config = load_config(write_config(tmp_path, generation={"device": device}))
    assert config.generation.device == device


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"databse": "x.sqlite"}, r"^.*yalm-forecast.yaml: databse: unknown key$"),
        ({"database": "mysql://db/x"}, "database: unsupported database 'mysql'"),
        ({"database": "postgresql://yalm:secret@db"},
         r"database: postgresql://yalm:\*\*\*@db: the URL names no database$"),
        ({"database": "postgresql://yalm:secret@db:port/x"},
         r"database: not a database URL: 'postgresql://yalm:\*\*\*@db:port/x'$"),
        ({"generation": {"shards": 2}}, r"generation\.deployment: required with shards > 1"),
        ({"generation": {"shards": 2, "deployment": "gpu"}},
         r"generation\.deployment: FLOW/DEPLOYMENT"),
        ({"generation": {"shards": 0}}, r"generation\.shards: must be >= 1"),
        ({"feeds": [{"name": "a", "url": "https://a.test/", "timeout_s": "soon"}]},
         r"feeds\[0\]\.timeout_s: expected a number, got 'soon'"),
        ({"feeds": [{"name": "a", "url": "https://a.test/", "retries": True}]},
         r"feeds\[0\]\.retries: expected an integer, got True"),
        ({"feeds": [{"name": "a", "url": "https://a.test/"}, {"name": "a", "url": "https://b/"}]},
         r"feeds\[1\]\.name: duplicate feed name 'a'"),
        ({"feeds": [{"name": "a", "url": "ftp://a.test/"}]},
         r"feeds\[0\]\.url: an http\(s\) or file:// URL, got 'ftp://a.test/'$"),
        ({"feeds": [{"name": "a", "url": "https://a/", "max_bytes": 0}]},
         r"feeds\[0\]\.max_bytes: must be >= 1"),
        ({"feeds": {"name": "a"}}, "feeds: expected a list"),
        ({"watchlist": [{"aliases": ["Сбер"]}]}, r"watchlist\[0\]\.ticker: required"),
        ({"watchlist": [{"ticker": "SBER", "aliases": "Сбер"}]},
         r"watchlist\[0\]\.aliases: expected a list"),
        ({"watchlist": [{"ticker": "SBER", "alias": ["Сбер"]}]},
         r"watchlist\[0\]\.alias: unknown key"),
        ({"templates": ["no_such_template"]}, r"templates\[0\]: no template 'no_such_template'"),
        ({"templates": [{"name": "ticker_outlook_ru", "generation": {"device": "cpu"}}]},
         r"templates\[0\]\.generation\.device: only sampling settings"),
        ({"generation": {"dtype": "int4"}}, "generation.dtype: one of"),
        ({"generation": {"top_p": 1.5}}, r"generation\.top_p: must be in \[0, 1\], got 1\.5"),
        ({"generation": {"max_new_tokens": "many"}}, r"max_new_tokens: expected an int"),
        ({"generation": {"max_new_tokens": 1024}}, r"generation\.max_new_tokens: 1024 leaves no"),
        ({"generation": {"gpu_memory": "lots"}}, r"generation\.gpu_memory: a size like 8GiB"),
        ({"generation": {"device": "tpu"}}, r"generation\.device: auto, cpu, cuda, cuda:N"),
        ({"generation": {"kv_bits": 2}}, r"generation\.kv_bits: one of 16, 8, 4, got 2$"),
        ({"generation": {"kv_bits": 4, "kv_on": "gpu"}},
         r"generation\.kv_bits: 4-bit KV is for a cache in pinned RAM"),
        ({"generation": {"kv_on": "ram"}}, r"generation\.kv_on: one of auto, gpu, cpu, got 'ram'"),
        ({"generation": {"weights_on": "nvme"}}, r"generation\.weights_on: one of auto, gpu"),
        ({"generation": {"kv_checkpoint_interval": -5}},
         r"generation\.kv_checkpoint_interval: must be >= 0\.0, got -5$"),
        ({"generation": {"kv_checkpoint_interval": "10m"}},
         r"generation\.kv_checkpoint_interval: expected a number, got '10m'$"),
        ({"state_dir": 7}, r"state_dir: expected a string, got 7$"),
        ({"schedule": {"timezone": "Mars/Olympus"}}, r"schedule\.timezone: unknown time zone"),
        ({"schedule": {"cron": "every day"}}, r"schedule\.cron: five fields"),
    ],
)  # fmt: skip
def test_bad_key_is_named(tmp_path: Path, overrides: dict, message: str):
    with pytest.raises(PipelineConfigError, match=message):
        load_config(write_config(tmp_path, **overrides))


def test_missing_and_malformed_files(tmp_path: Path):
    with pytest.raises(PipelineConfigError, match=r"config file not found: .*yalm-forecast init"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("feeds: [unclosed\n")
    with pytest.raises(PipelineConfigError, match=r"bad\.yaml: not valid YAML"):
        load_config(bad)
    bad.write_text("- a list\n")
    with pytest.raises(PipelineConfigError, match="config: expected a mapping"):
        load_config(bad)


def test_per_template_sampling_override(tmp_path: Path):
    template = {"name": "ticker_outlook_ru", "generation": {"temperature": 0.2, "seed": 7}}
    config = load_config(write_config(tmp_path, templates=[template, "morning_brief_ru"]))
    assert config.templates[0].generation == {"temperature": 0.2, "seed": 7}
    assert config.templates[1].generation == {}


def test_starter_file_is_plain_yaml():
    assert isinstance(yaml.safe_load(STARTER_CONFIG_PATH.read_text(encoding="utf-8")), dict)
