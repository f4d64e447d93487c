"""Ingesting the configured feeds into the store: fetch, parse, save, one feed at a time.

Glue between ``flows.sources.fetcher``, ``flows.sources.feeds`` and ``flows.store.database``.
Owns the per-feed outcome
(ok, partial, not_modified, failed) and the rule that one bad feed is recorded with its reason
and never stops the others. Each feed is saved in its own transaction, its stored items
recognised before any ticker matching. With ``retention.news_days`` set, the run ends by
pruning older news. It does not schedule or retry whole runs; the caller (CLI, a Prefect
flow) does.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from datetime import timedelta

from flows.config import FeedConfig, PipelineConfig
from flows.errors import FeedError
from flows.sources.feeds import TickerMatcher, parse_feed
from flows.sources.fetcher import FetchError, fetch
from flows.store.database import (
    FetchRecord,
    Store,
    feed_validators,
    finish_run,
    save_fetch,
    start_run,
    stored_keys,
    utc_now,
)
from flows.store.retention import PruneReport, prune_news


@dataclass(frozen=True)
class FeedReport:
    feed: str
    status: str  # ok | partial | not_modified | failed
    reason: str | None
    http_status: int | None
    items_seen: int
    items_new: int


@dataclass(frozen=True)
class IngestReport:
    run_id: int
    feeds: tuple[FeedReport, ...]
    pruned: PruneReport | None = None  # with ``retention.news_days`` set

    @property
    def failed(self) -> tuple[FeedReport, ...]:
        return tuple(report for report in self.feeds if report.status == "failed")

    @property
    def partial(self) -> tuple[FeedReport, ...]:
        return tuple(report for report in self.feeds if report.status == "partial")

    def rows(self) -> list[dict]:
        return [asdict(report) for report in self.feeds]


def ingest_feeds(
    config: PipelineConfig, store: Store, *, only: Sequence[str] | None = None
) -> IngestReport:
    """Fetch every enabled feed (or those named in ``only``) and store what they hold."""
    feeds = [feed for feed in config.feeds if feed.enabled and (not only or feed.name in only)]
    unknown = sorted(set(only or ()) - {feed.name for feed in config.feeds})
    if unknown:
        raise FeedError(f"no feed named {unknown[0]!r} in the config")
    matcher = TickerMatcher(config.watchlist)
    run_id = start_run(store, "ingest", {"feeds": [feed.name for feed in feeds]})
    reports = tuple(ingest_feed(feed, store, matcher, run_id=run_id) for feed in feeds)
    pruned = None
    if config.retention.news_days is not None:
        pruned = prune_news(store, utc_now() - timedelta(days=config.retention.news_days))
    failed = sum(report.status == "failed" for report in reports)
    status = "ok" if not failed else ("failed" if failed == len(reports) else "partial")
    details = {"feeds": [asdict(report) for report in reports]}
    if pruned is not None:
        details["pruned"] = {**asdict(pruned), "older_than": pruned.older_than.isoformat()}
    finish_run(store, run_id, status, details)
    return IngestReport(run_id=run_id, feeds=reports, pruned=pruned)


def ingest_feed(
    feed: FeedConfig, store: Store, matcher: TickerMatcher, *, run_id: int | None = None
) -> FeedReport:
    """Fetch, parse and save one feed; any ``FeedError`` becomes a recorded failure."""
    etag, last_modified = feed_validators(store, feed.name)
    fetched_at = utc_now()
    try:
        response = fetch(
            feed.url,
            etag=etag,
            last_modified=last_modified,
            timeout_s=feed.timeout_s,
            max_bytes=feed.max_bytes,
            retries=feed.retries,
            backoff_s=feed.backoff_s,
        )
    except FetchError as error:
        record = FetchRecord(
            feed.name, feed.url, "failed", str(error), error.http_status, attempts=error.attempts
        )
        return _save(store, record, (), fetched_at, run_id)
    base = {
        "http_status": response.http_status,
        "etag": response.etag,
        "last_modified": response.last_modified,
        "bytes_received": len(response.body),
        "attempts": response.attempts,
        "duration_s": round(response.duration_s, 3),
    }
    if response.not_modified:
        record = FetchRecord(feed.name, feed.url, "not_modified", None, **base)
        return _save(store, record, (), fetched_at, run_id)
    try:
        parsed = parse_feed(
            response.body,
            source=feed.name,
            fetched_at=fetched_at,
            content_type=response.content_type,
            matcher=matcher,
            base_url=response.base_url,
            encoding=feed.encoding,
            stored=lambda keys: stored_keys(store, keys),  # duplicates are never matched
        )
    except FeedError as error:
        # Keep the old validators: the next run must fetch this feed in full again.
        base.update(etag=None, last_modified=None)
        record = FetchRecord(feed.name, feed.url, "failed", str(error), **base)
        return _save(store, record, (), fetched_at, run_id)
    if parsed.text_untrusted:
        # Nothing was stored: the next run must fetch in full again (after the config is fixed).
        base.update(etag=None, last_modified=None)
    status = "partial" if parsed.problem else "ok"
    record = FetchRecord(feed.name, feed.url, status, parsed.problem, **base)
    return _save(store, record, parsed.items, fetched_at, run_id)


def _save(store, record: FetchRecord, items, fetched_at, run_id) -> FeedReport:
    record = FetchRecord(**{**asdict(record), "fetched_at": fetched_at})
    new = save_fetch(store, record, items, run_id=run_id)
    return FeedReport(
        record.feed_name, record.status, record.reason, record.http_status, len(items), new
    )
