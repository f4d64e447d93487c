"""The steps of a night as plain functions, in order: ingest, render, generate.

Each step takes the config's path and the night (``NightRef``: its id and ``as_of``) and
returns its typed summary (``flows.night.summaries``); things that fail on their own (a feed, a
template, a prompt) are in the summary's ``failures``, not raised. ``STEPS`` is the recipe: the
command line calls each directly, the Prefect flow wraps each in a task; a new step (scoring,
say) is one more function and one more entry. Knows nothing of Prefect.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime

from flows.config import load_config
from flows.generation.progress import PublisherFactory
from flows.night.summaries import (
    Failure,
    GenerateSummary,
    IngestSummary,
    RenderSummary,
)
from flows.store.database import open_store

log = logging.getLogger("flows.pipeline")


@dataclass(frozen=True)
class NightRef:
    """Which night a step runs for: small and plain, so a Prefect task can take it."""

    night_id: int | None
    as_of: str  # ISO 8601 UTC

    @property
    def moment(self) -> datetime:
        return datetime.fromisoformat(self.as_of.replace("Z", "+00:00"))


@dataclass(frozen=True)
class Step:
    name: str  # also the summary's attribute (or ``NightSummary.extra`` key)
    run: Callable[[str, NightRef], object]


def ingest_step(config_path: str, night: NightRef) -> IngestSummary:
    """Fetch every enabled feed and store the new items (a dead feed fails alone)."""
    from flows.sources.ingest import ingest_feeds

    config = load_config(config_path)
    with open_store(config.database_url) as store:
        report = ingest_feeds(config, store)
    failures = tuple(Failure("feed", feed.feed, feed.reason or "failed") for feed in report.failed)
    # A partial feed stored less than it holds (text in an encoding that cannot be trusted,
    # malformed XML): the night is partial too, with the reason.
    failures += tuple(
        Failure("feed", feed.feed, f"partial: {feed.reason}") for feed in report.partial
    )
    new_items = sum(feed.items_new for feed in report.feeds)
    log.info(
        "ingest: %d feeds, %d new items, %d failed", len(report.feeds), new_items, len(failures)
    )
    for failure in failures:
        log.warning("ingest: feed %s failed: %s", failure.name, failure.cause)
    if report.pruned is not None:  # retention is configured
        log.info(
            "ingest: pruned %d news items older than %s (%.1f MB freed)",
            report.pruned.items,
            report.pruned.older_than.date(),
            report.pruned.bytes_freed / 1e6,
        )
    return IngestSummary(report.run_id, len(report.feeds), new_items, failures)


def render_step(config_path: str, night: NightRef) -> RenderSummary:
    """Render the configured templates over stored news into pending prompts; a broken template
    fails its own prompts only."""
    from flows.generation.model import resolve_tokenizer_path
    from flows.prompting.rendering import render_run
    from yalm_runner.tokenizer import Tokenizer

    config = load_config(config_path)
    tokenizer = Tokenizer(resolve_tokenizer_path(config))
    with open_store(config.database_url) as store:
        outcomes = render_run(
            config, store, count_tokens=lambda text: len(tokenizer.encode(text)), as_of=night.moment
        )
    counts = {status: 0 for status in ("new", "existing", "done", "skipped", "failed")}
    failures: dict[tuple[str, str], Failure] = {}
    for outcome in outcomes:
        counts[outcome.status] += 1
        if outcome.status == "failed":
            # One line per template and cause, not one per ticker.
            failure = Failure("template", outcome.template, outcome.error or "failed",
                              outcome.template_version)  # fmt: skip
            failures.setdefault((outcome.template, failure.cause), failure)
    log.info(
        "render: %d new prompts, %d still queued, %d done before, %d skipped for lack of news, "
        "%d failed",
        counts["new"],
        counts["existing"],
        counts["done"],
        counts["skipped"],
        counts["failed"],
    )
    for failure in failures.values():
        log.error("render: template %s failed: %s", failure.name, failure.cause)
    return RenderSummary(counts["new"], counts["existing"], counts["done"], counts["skipped"],
                         tuple(failures.values()))  # fmt: skip


def generate_step(
    config_path: str,
    night: NightRef,
    keys: list[str] | None = None,
    worker_id: str | None = None,
    publish: PublisherFactory | None = None,
) -> GenerateSummary:
    """Claim and generate the pending prompts (only ``keys``, if given), one forecast committed
    at a time (resumable); ``worker_id`` defaults to this host and device. The terminal shows a
    progress bar; ``publish`` (the flow's) publishes the progress elsewhere too."""
    from flows.commands.console import progress
    from flows.generation.devicelock import device_locks
    from flows.generation.forecasting import generate_pending
    from yalm_runner.session import resolve_devices

    config = load_config(config_path)
    devices = [str(each) for each in resolve_devices(config.generation.device)]
    with (
        device_locks(devices),
        open_store(config.database_url) as store,
        progress("generating forecasts") as on_progress,
    ):
        report = generate_pending(
            config, store, on_progress=on_progress, keys=keys, worker_id=worker_id,
            publish=publish,
        )  # fmt: skip
    return log_generate(report.summary())


def log_generate(summary: GenerateSummary) -> GenerateSummary:
    log.info(
        "score (%s): %d signals stored, %d failed in %.1f s",
        summary.worker_id,
        summary.signals,
        sum(failure.kind == "signal" for failure in summary.failures),
        summary.scoring_s,
    )
    log.info(
        "generate (%s): %d forecasts stored, %d failed, %d resumed, %d held by other workers; "
        "%d new tokens at %.1f tokens/s",
        summary.worker_id,
        summary.generated,
        sum(failure.kind == "prompt" for failure in summary.failures),
        summary.resumed,
        summary.held,
        summary.new_tokens,
        summary.tokens_per_s,
    )
    for failure in summary.failures:
        log.warning("generate: %s %s failed: %s", failure.kind, failure.name[:12], failure.cause)
    return summary


STEPS: tuple[Step, ...] = (
    Step("ingest", ingest_step),
    Step("render", render_step),
    Step("generate", generate_step),
)
