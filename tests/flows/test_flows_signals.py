"""Signals in the pipeline: templates declare them, the night scores them first, the robot reads
them from ``signals_v1`` through a read-only connection.

Real Prefect (a temporary server), real HTTP on loopback, a real SQLite file, the tiny model of
the YaLM architecture converted by the real converter; killed runs are real ``yalm-forecast run``
processes that SIGKILL themselves right after a chosen commit (``score_kill_child.py``).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from flows_testkit import sample, write_config

from flows.commands.cli import main
from flows.config import BUNDLED_PROMPTS_DIR, load_config
from flows.errors import TemplateError
from flows.generation.signals import calibrate
from flows.prompting.templates import load_template, parse_template
from flows.store.robot import SIGNAL_COLUMNS, read_signals

AS_OF = "2024-05-14T06:00:00Z"
KILL_CHILD = Path(__file__).resolve().parent / "score_kill_child.py"
LABELS = ["up", "down", "flat"]
SIGNALS = (
    "SELECT prompt_key, label, logprob, answer_tokens, raw_probability, content_free_logprob, "
    "content_free_probability, probability FROM signals ORDER BY prompt_key, label"
)


@pytest.fixture(autouse=True)
def private_lock_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("YALM_FORECAST_LOCK_DIR", str(tmp_path / "locks"))


def signals_config(directory: Path, feed_server, model: Path, **overrides) -> Path:
    directory.mkdir(exist_ok=True)
    settings = dict(
        feeds=[{"name": n, "url": feed_server.url(f"/{n}")} for n in ("rss", "atom")],
        templates=[
            {"name": "ticker_outlook_ru", "generation": {"max_new_tokens": 6}},
            {"name": "ticker_outlook_en", "generation": {"max_new_tokens": 6}},
            {"name": "morning_brief_ru", "generation": {"max_new_tokens": 6}},
        ],
        model=str(model),
        generation={"device": "cpu", "checkpoint_every": 3},
    )
    return write_config(directory, **{**settings, **overrides})


def readonly_rows(database: Path, query: str) -> list[tuple]:
    with contextlib.closing(sqlite3.connect(f"file:{database}?mode=ro", uri=True)) as connection:
        return connection.execute(query).fetchall()


# ---- templates and calibration ---------------------------------------------------------------


@pytest.mark.parametrize("name", ["ticker_outlook_ru", "ticker_outlook_en", "morning_brief_ru"])
def test_bundled_templates_declare_up_down_flat(name):
    template = load_template(BUNDLED_PROMPTS_DIR / f"{name}.yaml")
    assert template.version == 2 and list(template.signal.answers) == LABELS
    assert all(answer.startswith(" ") for answer in template.signal.answers.values())


def test_the_signal_prefix_is_the_body_then_the_question_in_the_same_context():
    template = load_template(BUNDLED_PROMPTS_DIR / "ticker_outlook_en.yaml")
    context = {"as_of": "2024-05-14", "language": "en", "theses": "", "watchlist": [],
               "ticker": {"symbol": "AAPL", "name": "Apple", "aliases": ["Apple"]}}  # fmt: skip
    item = {"published_at": "2024-05-14T01:00:00Z", "source": "wire", "title": "Apple beats",
            "summary": "", "tickers": ["AAPL"]}  # fmt: skip
    body = template.render({**context, "items": [item]})
    prefix = template.signal_prefix(body, {**context, "items": [item]})
    assert prefix.startswith(body) and "Apple beats" in prefix
    assert prefix.endswith("\nBottom line: in the next trading session AAPL shares will")
    empty = template.signal_prefix(
        template.render({**context, "items": []}), context | {"items": []}
    )
    assert "Apple beats" not in empty and empty.endswith("AAPL shares will")


@pytest.mark.parametrize(
    "signal, message",
    [
        ({"question": "Q"}, "signal: a mapping of question and answers"),
        ({"question": " ", "answers": {"a": " x", "b": " y"}}, "signal.question"),
        ({"question": "Q", "answers": {"a": " x"}}, "at least two labels"),
        ({"question": "Q", "answers": {"a": " x", "b": ""}}, "signal.answers.b"),
        ({"question": "{% if %}", "answers": {"a": " x", "b": " y"}}, "signal.question line 1"),
    ],
)
def test_a_bad_signal_block_is_named(signal, message):
    document = {"name": "t", "version": 1, "language": "en", "body": "x", "signal": signal}
    with pytest.raises(TemplateError, match=message):
        parse_template(document, raw_text=yaml.safe_dump(document))


def test_calibration_divides_out_the_content_free_probabilities():
    raw_logprobs, free_logprobs = [-1.0, -2.5, -4.0], [-0.5, -3.0, -2.0]
    raw, free, calibrated = calibrate(raw_logprobs, free_logprobs)
    expected_raw = [math.exp(x) / sum(math.exp(y) for y in raw_logprobs) for x in raw_logprobs]
    expected_free = [math.exp(x) / sum(math.exp(y) for y in free_logprobs) for x in free_logprobs]
    ratio = [r / f for r, f in zip(expected_raw, expected_free, strict=True)]
    assert raw == pytest.approx(expected_raw) and free == pytest.approx(expected_free)
    assert calibrated == pytest.approx([value / sum(ratio) for value in ratio])
    assert sum(calibrated) == pytest.approx(1.0)
    # Huge log-likelihood sums (long answers) neither overflow nor underflow to nothing.
    assert sum(calibrate([-900.0, -905.0], [-800.0, -801.0])[2]) == pytest.approx(1.0)


# ---- the night -------------------------------------------------------------------------------


def test_the_night_stores_signals_that_sum_to_one_and_the_robot_reads_them(
    prefect_harness, feed_server, tiny_store, tmp_path, capsys
):
    from flows.pipeline import news_to_forecast

    feed_server.add("/rss", body=sample("markets_ru.rss.xml"))
    feed_server.add("/atom", body=sample("global_markets_en.atom.xml"))
    path = signals_config(tmp_path / "night", feed_server, tiny_store)
    database = load_config(path).database_path

    first = news_to_forecast(config_path=str(path), as_of=AS_OF)
    generated = first.generate
    prompts = first.render.new
    assert generated.signals == generated.generated == prompts > 0
    assert generated.failures == () and generated.scoring_s > 0
    assert f"| signals | {prompts} |" in first.markdown

    # The robot's side: the view through a read-only connection, and the reader.
    rows = readonly_rows(database, f"SELECT {', '.join(SIGNAL_COLUMNS)} FROM signals_v1")
    assert len(rows) == 3 * prompts
    signals = read_signals(database)
    assert sorted(tuple(vars(signal).values()) for signal in signals) == sorted(rows)
    by_prompt: dict[str, list] = {}
    for each in signals:
        by_prompt.setdefault(each.prompt_key, []).append(each)
    assert len(by_prompt) == prompts
    for labelled in by_prompt.values():
        assert sorted(each.label for each in labelled) == sorted(LABELS)
        for column in ("probability", "raw_probability", "content_free_probability"):
            assert sum(getattr(each, column) for each in labelled) == pytest.approx(1.0)
        assert all(each.logprob < 0 and each.answer_tokens >= 1 for each in labelled)
        assert all(each.run_id == generated.run_id for each in labelled)
    assert {each.ticker for each in signals} >= {"", "SBER"}  # market-wide has an empty ticker
    readonly = sqlite3.connect(f"file:{database}?mode=ro", uri=True)
    with pytest.raises(sqlite3.OperationalError, match="readonly"), contextlib.closing(readonly):
        readonly.execute("DELETE FROM signals")

    # Signals go first: every one was committed no later than the first forecast.
    first_forecast = readonly_rows(database, "SELECT min(created_at) FROM generations")[0][0]
    last_signal = readonly_rows(database, "SELECT max(created_at) FROM signals")[0][0]
    assert last_signal <= first_forecast

    # Each forecast beside its signal; the signals command.
    capsys.readouterr()
    assert main(["results", "--config", str(path), "--format", "json"]) == 0
    results = json.loads(capsys.readouterr().out)
    for row in results:
        expected = {each.label: each.probability for each in by_prompt[row["prompt_key"]]}
        assert row["signal"] == expected
    assert main(["signals", "--config", str(path), "--ticker", "SBER", "--format", "csv"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split(",") == list(SIGNAL_COLUMNS)
    assert len(lines) == 1 + 3 * 2  # SBER's Russian and English outlooks

    # A second night has nothing to score.
    again = news_to_forecast(config_path=str(path), as_of=AS_OF)
    assert again.generate.signals == 0 and again.generate.signals_pending == 0
    assert len(readonly_rows(database, "SELECT id FROM signals")) == 3 * prompts


def test_a_signal_that_cannot_be_scored_fails_alone_and_the_night_is_partial(
    prefect_harness, feed_server, tiny_store, tmp_path, capsys
):
    feed_server.add("/rss", body=sample("markets_ru.rss.xml"))
    feed_server.add("/atom", body=sample("global_markets_en.atom.xml"))
    prompts_dir = tmp_path / "prompts"
    prompts_dir.mkdir()
    for name in ("ticker_outlook_ru", "morning_brief_ru"):
        document = yaml.safe_load((BUNDLED_PROMPTS_DIR / f"{name}.yaml").read_text("utf-8"))
        if name == "morning_brief_ru":  # an answer far longer than the model's positions
            document["signal"]["answers"]["flat"] = " без изменений" * 600
        (prompts_dir / f"{name}.yaml").write_text(
            yaml.safe_dump(document, allow_unicode=True, sort_keys=False)
        )
    path = signals_config(
        tmp_path / "night", feed_server, tiny_store, prompts_dir=str(prompts_dir),
        templates=[{"name": "ticker_outlook_ru", "generation": {"max_new_tokens": 4}},
                   {"name": "morning_brief_ru", "generation": {"max_new_tokens": 4}}],
    )  # fmt: skip
    code = main(["run", "--config", str(path), "--as-of", AS_OF])
    assert code == 3
    out = capsys.readouterr().out
    assert "| failed | 1 | 0 feeds, 0 templates, 0 prompts, 1 signals |" in out
    assert "| signals | 6 | answer probabilities stored in signals_v1 (1 failed)" in out
    assert "over the model's" in out  # the reason, in the summary's problems
    database = load_config(path).database_path
    failed = readonly_rows(database, "SELECT error FROM signal_prompts WHERE status = 'failed'")
    assert len(failed) == 1 and "candidate 3" in failed[0][0]
    tickers = readonly_rows(database, "SELECT DISTINCT ticker FROM signals_v1")
    assert ("",) not in tickers and len(tickers) == 6  # every ticker's signal, no market one
    forecasts = readonly_rows(database, "SELECT count(*) FROM forecasts_v1")[0][0]
    assert forecasts == 7  # generation went on for every prompt


# ---- kill and resume -------------------------------------------------------------------------


def run_child(config_path: Path, kill_after: int, tmp_path: Path) -> tuple[int, str]:
    """``yalm-forecast run`` in its own process group, SIGKILLed after ``kill_after`` signal
    commits (0: never); returns (exit status, stderr)."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("PREFECT_API")}
    env.update(
        OMP_NUM_THREADS="1",
        PREFECT_HOME=str(tmp_path / "prefect-home"),
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="120",
        YALM_FORECAST_LOCK_DIR=str(tmp_path / "locks"),
    )
    command = [sys.executable, str(KILL_CHILD), str(kill_after)]
    command += ["run", "--config", str(config_path), "--as-of", AS_OF]
    err_path = tmp_path / f"child-{kill_after}.err"
    with err_path.open("wb") as err:
        child = subprocess.Popen(
            command, env=env, stdout=subprocess.DEVNULL, stderr=err, start_new_session=True
        )
        try:
            status = child.wait(timeout=600)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(child.pid, signal.SIGKILL)  # its orphaned ephemeral Prefect server
    return status, err_path.read_text()


def test_a_scoring_step_killed_mid_way_resumes_without_redoing_stored_scores(
    prefect_harness, feed_server, tiny_store, tmp_path
):
    from flows.pipeline import news_to_forecast

    feed_server.add("/rss", body=sample("markets_ru.rss.xml"))
    feed_server.add("/atom", body=sample("global_markets_en.atom.xml"))
    reference_path = signals_config(tmp_path / "reference", feed_server, tiny_store)
    news_to_forecast(config_path=str(reference_path), as_of=AS_OF)
    reference = readonly_rows(load_config(reference_path).database_path, SIGNALS)

    path = signals_config(tmp_path / "killed", feed_server, tiny_store)
    database = load_config(path).database_path
    # Killed right after the third prompt's commit: prompts scored, and prompts not.
    status, _ = run_child(path, 3, tmp_path)
    assert status == -signal.SIGKILL
    kept = readonly_rows(database, "SELECT id, prompt_key, label, created_at, probability "
                                   "FROM signals ORDER BY id")  # fmt: skip
    assert len({row[1] for row in kept}) == 3  # three prompts committed, whole
    assert readonly_rows(database, "SELECT count(*) FROM generations")[0][0] == 0  # not begun

    status, err = run_child(path, 0, tmp_path)
    assert status == 0, err
    after = readonly_rows(database, "SELECT id, prompt_key, label, created_at, probability "
                                    "FROM signals ORDER BY id")  # fmt: skip
    assert after[: len(kept)] == kept  # stored scores were not redone
    assert len(after) == len(reference)
    finished = readonly_rows(database, SIGNALS)
    for got, want in zip(finished, reference, strict=True):
        assert got[:2] == want[:2] and got[3] == want[3]
        assert got[2:] == pytest.approx(want[2:], abs=1e-5)  # other batches, same numbers
