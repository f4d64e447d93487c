"""The ``yalm-forecast`` command line: init, ingest, render, news, results; errors; README."""

from __future__ import annotations

import csv
import io
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from flows_testkit import sample, write_config

from flows.commands.cli import COMMANDS, main
from flows.config import load_config
from flows.store.database import open_store
from flows.store.generations import pending_prompts, record_generation

README = Path(__file__).resolve().parents[2] / "README.md"
SECTION = "## `yalm-forecast`: the pipeline"


def run(argv: list[str], capsys) -> tuple[int, str, str]:
    code = main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture
def served_config(feed_server, tmp_path: Path, yalm_vocab) -> Path:
    feed_server.add("/rss", body=sample("markets_ru.rss.xml"), etag='"1"')
    feed_server.add("/atom", body=sample("global_markets_en.atom.xml"))
    return write_config(
        tmp_path,
        feeds=[{"name": n, "url": feed_server.url(f"/{n}")} for n in ("rss", "atom")],
        templates=["ticker_outlook_ru", "morning_brief_ru"],
        tokenizer=str(yalm_vocab),
    )


def test_init_writes_once(tmp_path: Path, capsys):
    path = tmp_path / "conf.yaml"
    code, out, err = run(["init", "--config", str(path)], capsys)
    assert code == 0 and out.strip() == str(path) and "starter config" in err
    assert load_config(path).feeds
    code, _, err = run(["init", "--config", str(path)], capsys)
    assert code == 1
    assert err == f"yalm-forecast: error: {path}: already exists; not overwriting it\n"


def test_config_from_environment_then_current_directory(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("YALM_FORECAST_CONFIG", str(tmp_path / "env.yaml"))
    assert run(["init"], capsys)[0] == 0
    assert (tmp_path / "env.yaml").is_file()
    monkeypatch.delenv("YALM_FORECAST_CONFIG")
    assert run(["init"], capsys)[0] == 0
    assert (tmp_path / "yalm-forecast.yaml").is_file()


def test_ingest_news_render_results(served_config: Path, capsys):
    config = ["--config", str(served_config)]
    code, out, err = run(["ingest", *config, "--format", "json"], capsys)
    assert code == 0, err
    rows = json.loads(out)
    assert [(row["feed"], row["status"], row["items_new"]) for row in rows] == [
        ("rss", "ok", 5),
        ("atom", "ok", 4),
    ]
    assert "9 new items, 0 failed" in err

    code, out, _ = run(["news", *config, "--format", "json", "--source", "atom"], capsys)
    news = json.loads(out)
    assert code == 0 and len(news) == 4 and {row["source"] for row in news} == {"atom"}
    assert news[0]["title"].startswith("Oil steadies")  # newest first
    code, out, _ = run(["news", *config, "--format", "csv", "--ticker", "SBER"], capsys)
    table = list(csv.DictReader(io.StringIO(out)))
    assert [row["tickers"] for row in table] == ["SBER"]
    code, out, _ = run(["news", *config, "--since", "2024-05-13T18:00Z", "--limit", "3"], capsys)
    assert out.splitlines()[0].split() == [
        "published_at",
        "source",
        "tickers",
        "title",
        "summary",
        "link",
    ]
    assert len(out.splitlines()) == 2 + 3

    render = ["render", *config, "--as-of", "2024-05-14T06:00Z", "--format", "json"]
    code, out, err = run(render, capsys)
    assert code == 0, err
    outcomes = json.loads(out)
    assert [row["status"] for row in outcomes] == ["new"] * 7  # 6 tickers + the market brief
    again = json.loads(run(render, capsys)[1])
    assert again == [{**row, "status": "existing"} for row in outcomes]

    code, out, _ = run(["results", *config, "--format", "json"], capsys)
    assert code == 0 and json.loads(out) == []
    with open_store(load_config(served_config).database_url) as store:
        for prompt in pending_prompts(store):
            record_generation(
                store,
                prompt.key,
                text=f"Прогноз для {prompt.ticker or 'рынка'}: рост.\nРиски: ставка.",
                token_ids=[1, 2],
                prompt_tokens=prompt.token_count,
                finish_reason="eos",
                model_manifest_hash="m" * 64,
                timings_s={"total_s": 1.0},
            )
    code, out, _ = run(["results", *config, "--format", "json", "--ticker", "SBER"], capsys)
    results = json.loads(out)
    assert code == 0 and len(results) == 1
    assert results[0]["forecast"] == "Прогноз для SBER: рост.\nРиски: ставка."
    assert results[0]["template"] == "ticker_outlook_ru" and results[0]["as_of"] == "2024-05-14"
    code, out, _ = run(
        ["results", *config, "--format", "csv", "--template", "morning_brief_ru"], capsys
    )
    rows = list(csv.DictReader(io.StringIO(out)))
    assert len(rows) == 1 and rows[0]["ticker"] == "" and "рынка" in rows[0]["forecast"]
    code, out, _ = run(["results", *config, "--since", "1d"], capsys)
    lines = out.splitlines()
    assert lines[0].split() == ["generated_at", "ticker", "template", "signal", "forecast"]
    assert len(lines) == 2 + 7  # header, rule, one line per forecast (newlines folded)
    assert "Прогноз для SBER: рост. Риски: ставка." in out

    # A limit that cuts the list says so on stderr; one that does not, says nothing.
    code, out, err = run(["results", *config, "--format", "json", "--limit", "3"], capsys)
    assert code == 0 and len(json.loads(out)) == 3
    assert "showing the newest 3 forecasts; more match" in err
    code, out, err = run(["results", *config, "--format", "json", "--limit", "7"], capsys)
    assert len(json.loads(out)) == 7 and "showing" not in err
    code, out, err = run(["results", *config, "--format", "json", "--limit", "0"], capsys)
    assert len(json.loads(out)) == 7 and "showing" not in err
    code, out, err = run(["news", *config, "--format", "json", "--limit", "2"], capsys)
    assert len(json.loads(out)) == 2 and "showing the newest 2 news items" in err


def test_ingest_exit_code_says_some_feeds_failed(feed_server, tmp_path: Path, capsys):
    feed_server.add("/rss", body=sample("markets_ru.rss.xml"))
    feeds = [
        {"name": "rss", "url": feed_server.url("/rss")},
        {"name": "gone", "url": feed_server.url("/gone")},
    ]
    path = write_config(tmp_path, feeds=feeds)
    code, out, err = run(["ingest", "--config", str(path)], capsys)
    assert code == 3
    assert re.search(r"gone\s+failed\s+404\s+0\s+0\s+HTTP 404", out)
    assert "1 failed" in err


def test_library_errors_are_one_line_and_verbose_shows_traceback(tmp_path: Path, capsys):
    path = write_config(tmp_path, generation={"dtype": "int4"})
    code, out, err = run(["news", "--config", str(path)], capsys)
    assert code == 1 and out == ""
    assert err.count("\n") == 1 and "generation.dtype: one of" in err
    code, _, err = run(["--verbose", "news", "--config", str(path)], capsys)
    assert code == 1 and err.startswith("Traceback") and "PipelineConfigError" in err
    assert err.splitlines()[-1].startswith("yalm-forecast: error: ")


def test_render_without_a_tokenizer_or_a_store_counts_with_the_shipped_yalm_tokenizer(
    feed_server, tmp_path: Path, yalm_vocab, capsys
):
    feed_server.add("/rss", body=sample("markets_ru.rss.xml"))
    variants = {
        "explicit": {"tokenizer": str(yalm_vocab)},
        "nothing-set": {},
        "store-not-converted-yet": {"model": "models/yalm-100b-store"},
    }
    counts = {}
    for name, overrides in variants.items():
        (tmp_path / name).mkdir()
        path = write_config(
            tmp_path / name,
            feeds=[{"name": "rss", "url": feed_server.url("/rss")}],
            templates=["ticker_outlook_ru"],
            **overrides,
        )
        assert run(["ingest", "--config", str(path)], capsys)[0] == 0
        render = ["render", "--config", str(path), "--as-of", "2024-05-14T06:00Z", "-f", "json"]
        code, out, err = run(render, capsys)
        assert code == 0, err
        counts[name] = [
            (row["ticker"], row["token_count"]) for row in json.loads(out) if row["status"] == "new"
        ]
    assert len(counts["explicit"]) == 4 and all(count > 0 for _, count in counts["explicit"])
    assert counts["nothing-set"] == counts["explicit"]
    assert counts["store-not-converted-yet"] == counts["explicit"]


def test_a_tokenizer_key_naming_a_missing_file_is_a_config_error(tmp_path: Path, capsys):
    path = write_config(tmp_path, tokenizer="models/no-such.sp")
    code, _, err = run(["render", "--config", str(path)], capsys)
    assert code == 1
    assert "tokenizer: file not found" in err and "no-such.sp" in err


def test_bad_arguments_are_usage_errors(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["results", "--since", "yesterday-ish"])
    assert exit_info.value.code == 2
    assert "expected 24h, 7d, 30m or an ISO date" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["news", "--no-such-flag"])
    with pytest.raises(SystemExit) as exit_info:
        main(["results", "--limit", "-1"])
    assert exit_info.value.code == 2
    assert "'-1': expected a whole number >= 0" in capsys.readouterr().err


def test_console_entry_point_runs(tmp_path: Path):
    path = write_config(tmp_path)
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "flows.commands.cli",
            "--config",
            str(path),
            "results",
            "--format",
            "json",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 1
    assert result.stderr.startswith("yalm-forecast: error: database not found")
    help_text = subprocess.run(
        [sys.executable, "-m", "flows.commands.cli", "results", "--help"],
        capture_output=True,
        text=True,
    ).stdout
    assert "example: yalm-forecast results" in help_text and "YALM_FORECAST_CONFIG" in help_text


def test_every_command_has_a_row_in_the_readme_command_table():
    text = README.read_text(encoding="utf-8")
    assert SECTION in text
    section = text.split(SECTION, 1)[1].split("\n## ", 1)[0]
    for name in COMMANDS:
        row = re.compile(rf"^\| `yalm-forecast {re.escape(name)}( [^`]*)?` \|", re.MULTILINE)
        assert row.search(section), f"README's command table does not document `{name}`"


def test_render_takes_the_tokenizer_from_the_model_store(feed_server, tmp_path, tiny_store, capsys):
    feed_server.add("/rss", body=sample("markets_ru.rss.xml"))
    path = write_config(
        tmp_path,
        feeds=[{"name": "rss", "url": feed_server.url("/rss")}],
        templates=["ticker_outlook_ru"],
        model=str(tiny_store),
    )
    assert run(["ingest", "--config", str(path)], capsys)[0] == 0
    code, out, err = run(
        ["render", "--config", str(path), "--as-of", "2024-05-14T06:00Z", "-f", "json"], capsys
    )
    assert code == 0, err
    assert {row["ticker"] for row in json.loads(out) if row["status"] == "new"} == {
        "SBER",
        "GAZP",
        "LKOH",
        "YDEX",
    }
