"""What a person sees of a run: progress bars on a terminal, a plain log file, a summary table.

Owns presentation only: a rich progress bar when stderr is a terminal (plain log lines every
tenth of the way otherwise, so a cron log stays readable), the logging set-up of the long
commands (timestamped lines to stderr and to the config's ``log_file``), and the markdown
summary of one pipeline run. It knows nothing of Prefect or the model.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

LOG_FORMAT = "%(asctime)s %(levelname)-7s %(message)s"
LOG_DATE_FORMAT = "%Y-%m-%d %H:%M:%S"
log = logging.getLogger("flows")


def configure_logging(log_file: Path | None, *, verbose: bool = False) -> None:
    """INFO lines from the pipeline to stderr and, when given, appended to ``log_file``."""
    for handler in list(log.handlers):
        if getattr(handler, "_yalm_forecast", None) is not None:
            log.removeHandler(handler)
            handler.close()
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(LOG_FORMAT, LOG_DATE_FORMAT))
    handler._yalm_forecast = "stderr"
    log.addHandler(handler)
    log.setLevel(logging.DEBUG if verbose else logging.INFO)
    log.propagate = False
    if log_file is not None:
        attach_log_file(log_file)


def attach_log_file(log_file: Path) -> None:
    """Append the pipeline's lines to ``log_file`` too (once, however often it is called).

    The flow calls this itself, so that runs a Prefect worker or ``serve`` starts in processes
    of their own write the log file as well.
    """
    target = str(Path(log_file).resolve())
    if any(getattr(handler, "_yalm_forecast", None) == target for handler in log.handlers):
        return
    Path(target).parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(target, encoding="utf-8")
    handler.setFormatter(logging.Formatter(LOG_FORMAT, LOG_DATE_FORMAT))
    handler._yalm_forecast = target
    log.addHandler(handler)
    if log.level == logging.NOTSET or log.level > logging.INFO:
        log.setLevel(logging.INFO)


@contextmanager
def progress(description: str) -> Iterator[Callable[[int, int], None]]:
    """A ``(done, total)`` callback: a rich bar on a terminal, else a log line per 10%."""
    if sys.stderr.isatty():
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        columns = (
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
        )
        with Progress(*columns, console=Console(stderr=True)) as bar:
            task = bar.add_task(description, total=None)
            yield lambda done, total: bar.update(task, completed=done, total=total)
        return
    reported = {"tenth": -1}

    def report(done: int, total: int) -> None:
        tenth = done * 10 // max(total, 1)
        if tenth > reported["tenth"]:
            reported["tenth"] = tenth
            log.info("%s: %d/%d", description, done, total)

    yield report


def _cell(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def run_markdown(summary: Mapping[str, Any]) -> str:
    """The per-run table: ingested, rendered, generated, signals, failed, tokens/s (and any
    error)."""
    ingest = summary.get("ingest") or {}
    render = summary.get("render") or {}
    generate = summary.get("generate") or {}
    failed_feeds = ingest.get("failed", [])
    failed_prompts = generate.get("failures", [])
    failed_signals = generate.get("signal_failures", [])
    rows = [
        (
            "ingested",
            ingest.get("new_items", "-"),
            f"new items from {ingest.get('feeds', 0)} feeds",
        ),
        (
            "rendered",
            render.get("new", "-"),
            f"new prompts ({render.get('existing', 0)} already queued, "
            f"{render.get('skipped', 0)} skipped for lack of news)",
        ),
        (
            "generated",
            generate.get("generated", "-"),
            f"forecasts stored ({generate.get('resumed', 0)} resumed from saved ids, "
            f"{generate.get('new_tokens', 0)} new tokens)",
        ),
        (
            "signals",
            generate.get("signals", "-"),
            f"answer probabilities stored in signals_v1 ({len(failed_signals)} failed), scored "
            f"in {generate.get('scoring_s', 0)} s "
            f"(batch {generate.get('score_batch_size') or '-'})",
        ),
        (
            "failed",
            len(failed_feeds) + len(failed_prompts),
            f"{len(failed_feeds)} feeds, {len(failed_prompts)} prompts",
        ),
        (
            "tokens/s",
            generate.get("tokens_per_s", "-"),
            f"batch size {generate.get('batch_size') or '-'} on {generate.get('device') or '-'}",
        ),
    ]
    lines = [
        f"# news-to-forecast run, as of {summary.get('as_of') or 'now'}",
        "",
        "| step | count | detail |",
        "| --- | ---: | --- |",
        *(f"| {step} | {_cell(count)} | {_cell(detail)} |" for step, count, detail in rows),
    ]
    problems = [f"- feed `{item['feed']}`: {item['reason']}" for item in failed_feeds]
    problems += [f"- prompt `{key[:12]}`: {reason}" for key, reason in failed_prompts]
    problems += [f"- signal `{key[:12]}`: {reason}" for key, reason in failed_signals]
    if summary.get("error"):
        problems.append(f"- run stopped: {summary['error']}")
    if problems:
        lines += ["", "Problems:", "", *problems]
    return "\n".join(lines) + "\n"
