"""What a person sees of a run: progress bars on a terminal, a plain log file, a summary table.

Owns presentation only: a rich progress bar when stderr is a terminal (plain log lines every
tenth of the way otherwise, so a cron log stays readable), the logging set-up of the long
commands (timestamped lines to stderr and to the config's ``log_file``), and the markdown
summary of one night (read from its typed summary). It knows nothing of Prefect or the model.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from flows.night.summaries import GenerateSummary, IngestSummary, NightSummary, RenderSummary

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
    formatter = logging.Formatter if verbose else _OneLineFormatter
    handler.setFormatter(formatter(LOG_FORMAT, LOG_DATE_FORMAT))
    handler._yalm_forecast = "stderr"
    log.addHandler(handler)
    log.setLevel(logging.DEBUG if verbose else logging.INFO)
    log.propagate = False
    if log_file is not None:
        attach_log_file(log_file)


class _OneLineFormatter(logging.Formatter):
    """Without --verbose a terminal gets the message, never the traceback (the log file does)."""

    def format(self, record: logging.LogRecord) -> str:
        return super().formatMessage(_message_only(record, self))

    def formatException(self, ei) -> str:
        return ""


def _message_only(record: logging.LogRecord, formatter: logging.Formatter) -> logging.LogRecord:
    record.message = record.getMessage()
    if formatter.usesTime():
        record.asctime = formatter.formatTime(record, formatter.datefmt)
    return record


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


def to_log_file(message: str, exc: BaseException | None = None) -> None:
    """``message`` as an ERROR line in the log file alone, with ``exc``'s traceback (stderr
    gets the line from the caller): a command's last word is in the log as well."""
    info = (type(exc), exc, exc.__traceback__) if exc is not None else None
    record = log.makeRecord(log.name, logging.ERROR, __file__, 0, message, (), info)
    for handler in log.handlers:
        if getattr(handler, "_yalm_forecast", "stderr") != "stderr":
            handler.handle(record)


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


def run_markdown(summary: NightSummary) -> str:
    """The per-night table: ingested, rendered, generated, signals, failed, tokens/s; then every
    failure with its cause, and how the night ended."""
    ingest = summary.ingest or IngestSummary()
    render = summary.render or RenderSummary()
    generate = summary.generate or GenerateSummary()
    failures = summary.failures
    kinds = {
        kind: sum(each.kind == kind for each in failures)
        for kind in ("feed", "template", "prompt", "signal")
    }
    rows = [
        (
            "ingested",
            ingest.new_items if summary.ingest else "-",
            f"new items from {ingest.feeds} feeds",
        ),
        (
            "rendered",
            render.new if summary.render else "-",
            f"new prompts ({render.existing} still queued, {render.done} done before, "
            f"{render.skipped} skipped for lack of news)",
        ),
        (
            "generated",
            generate.generated if summary.generate else "-",
            f"forecasts stored ({generate.resumed} resumed from saved ids, "
            f"{generate.new_tokens} new tokens)",
        ),
        (
            "signals",
            generate.signals if summary.generate else "-",
            f"answer probabilities stored in signals_v1 ({kinds['signal']} failed), scored "
            f"in {generate.scoring_s} s (batch {generate.score_batch_size or '-'})",
        ),
        (
            "failed",
            len(failures),
            f"{kinds['feed']} feeds, {kinds['template']} templates, {kinds['prompt']} prompts, "
            f"{kinds['signal']} signals",
        ),
        (
            "tokens/s",
            generate.tokens_per_s if summary.generate else "-",
            f"batch size {generate.batch_size or '-'} on {generate.device or '-'}",
        ),
    ]
    lines = [
        f"# news-to-forecast night, as of {summary.as_of or 'now'}: {summary.outcome.word}",
        "",
        "| step | count | detail |",
        "| --- | ---: | --- |",
        *(f"| {step} | {_cell(count)} | {_cell(detail)} |" for step, count, detail in rows),
    ]
    problems = [f"- {each.kind} `{_cell(each.label)}`: {_cell(each.cause)}" for each in failures]
    if summary.stopped is not None:
        problems.append(
            f"- night stopped at {summary.stopped.step}: {_cell(summary.stopped.cause)}"
        )
    if problems:
        lines += ["", "Problems:", "", *problems]
    return "\n".join(lines) + "\n"
