"""The pipeline's tables as SQLAlchemy 2 models (internal: the robot reads the views
``forecasts_v1`` and ``signals_v1``).

Owns the Python side of the schema; the schema itself is created and changed only by the Alembic
migrations in ``flows/store/migrations`` (a test checks the two agree). Timestamps are stored as
ISO 8601 UTC text (``2024-05-01T06:00:00Z``) so that they compare correctly as strings in any
SQL client. This module knows nothing of feeds, templates or how the store is opened.
"""

from __future__ import annotations

from datetime import datetime, timezone

from sqlalchemy import (
    Boolean,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

TIMESTAMP_FORMAT = "%Y-%m-%dT%H:%M:%SZ"


def utc_text(moment: datetime) -> str:
    if moment.tzinfo is None:
        raise ValueError(f"naive datetime {moment!r}: the store keeps UTC times only")
    return moment.astimezone(timezone.utc).strftime(TIMESTAMP_FORMAT)


class UtcTimestamp(TypeDecorator):
    """An aware datetime in Python, ``YYYY-MM-DDTHH:MM:SSZ`` text in SQL."""

    impl = String(20)
    cache_ok = True

    def process_bind_param(self, value, dialect):
        return None if value is None else utc_text(value)

    def process_result_value(self, value, dialect):
        if value is None:
            return None
        return datetime.strptime(value, TIMESTAMP_FORMAT).replace(tzinfo=timezone.utc)


class Base(DeclarativeBase):
    pass


class Run(Base):
    __tablename__ = "runs"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    kind: Mapped[str] = mapped_column(String(32))
    status: Mapped[str] = mapped_column(String(16))  # running | ok | partial | failed | interrupted
    started_at: Mapped[datetime] = mapped_column(UtcTimestamp)
    finished_at: Mapped[datetime | None] = mapped_column(UtcTimestamp)
    details_json: Mapped[str] = mapped_column(Text, default="{}")
    code_version: Mapped[str] = mapped_column(String(64))


class Night(Base):
    """One run of the whole pipeline (migration 0005_nights; read by the robot as runs_v1)."""

    __tablename__ = "nights"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    as_of: Mapped[datetime] = mapped_column(UtcTimestamp, index=True)
    started_at: Mapped[datetime] = mapped_column(UtcTimestamp)
    finished_at: Mapped[datetime | None] = mapped_column(UtcTimestamp)
    # running | done | partial | interrupted | failed
    outcome: Mapped[str] = mapped_column(String(16))
    forecasts_stored: Mapped[int] = mapped_column(Integer, default=0)
    forecasts_failed: Mapped[int] = mapped_column(Integer, default=0)
    cause: Mapped[str | None] = mapped_column(Text)
    code_version: Mapped[str] = mapped_column(String(64))


class NightFailure(Base):
    """A feed, template or prompt that failed on its own in one night, with the cause."""

    __tablename__ = "night_failures"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    night_id: Mapped[int] = mapped_column(ForeignKey("nights.id"), index=True)
    kind: Mapped[str] = mapped_column(String(16))  # feed | template | prompt
    name: Mapped[str] = mapped_column(String(128))
    version: Mapped[int | None] = mapped_column(Integer)
    as_of: Mapped[datetime] = mapped_column(UtcTimestamp)
    cause: Mapped[str] = mapped_column(Text)


class Feed(Base):
    __tablename__ = "feeds"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(128), unique=True)
    url: Mapped[str] = mapped_column(Text)
    etag: Mapped[str | None] = mapped_column(Text)
    last_modified: Mapped[str | None] = mapped_column(Text)
    last_status: Mapped[str | None] = mapped_column(String(16))
    last_fetched_at: Mapped[datetime | None] = mapped_column(UtcTimestamp)
    last_ok_at: Mapped[datetime | None] = mapped_column(UtcTimestamp)


class Fetch(Base):
    """One attempt to fetch one feed: the fetch history."""

    __tablename__ = "fetches"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    feed_id: Mapped[int] = mapped_column(ForeignKey("feeds.id"), index=True)
    run_id: Mapped[int | None] = mapped_column(ForeignKey("runs.id"))
    fetched_at: Mapped[datetime] = mapped_column(UtcTimestamp)
    status: Mapped[str] = mapped_column(String(16))  # ok | partial | not_modified | failed
    reason: Mapped[str | None] = mapped_column(Text)
    http_status: Mapped[int | None] = mapped_column(Integer)
    etag: Mapped[str | None] = mapped_column(Text)
    last_modified: Mapped[str | None] = mapped_column(Text)
    bytes_received: Mapped[int] = mapped_column(Integer, default=0)
    attempts: Mapped[int] = mapped_column(Integer, default=1)
    duration_s: Mapped[float] = mapped_column(Float, default=0.0)
    items_seen: Mapped[int] = mapped_column(Integer, default=0)
    items_new: Mapped[int] = mapped_column(Integer, default=0)


class NewsItem(Base):
    __tablename__ = "news_items"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    dedup_key: Mapped[str] = mapped_column(String(64), unique=True)
    feed_id: Mapped[int] = mapped_column(ForeignKey("feeds.id"), index=True)
    source: Mapped[str] = mapped_column(String(128))
    guid: Mapped[str | None] = mapped_column(Text)
    title: Mapped[str] = mapped_column(Text)
    summary: Mapped[str] = mapped_column(Text)
    link: Mapped[str | None] = mapped_column(Text)
    published_at: Mapped[datetime] = mapped_column(UtcTimestamp, index=True)
    published_estimated: Mapped[bool] = mapped_column(Boolean, default=False)
    fetched_at: Mapped[datetime] = mapped_column(UtcTimestamp)
    # None, or what migration 0003 found: "repaired" (mojibake undone) or "garbled" (kept as
    # stored, out of prompts).
    text_status: Mapped[str | None] = mapped_column(String(16))


class NewsTicker(Base):
    """A ticker an item names. ``published_at`` repeats the item's, so that one index walks a
    ticker's news of a time window, newest first, however long the history behind it."""

    __tablename__ = "news_item_tickers"
    __table_args__ = (
        Index("ix_news_item_tickers_ticker_published", "ticker", "published_at", "item_id"),
    )
    item_id: Mapped[int] = mapped_column(ForeignKey("news_items.id"), primary_key=True)
    ticker: Mapped[str] = mapped_column(String(16), primary_key=True)
    published_at: Mapped[datetime] = mapped_column(UtcTimestamp)


# The queue's index holds only pending prompts: the few a night's work still needs, in the
# order claims take them. An index on status for every row would match nearly all of them
# ("done") and lure the planner into reading forecasts_v1 through it.
PENDING = "status = 'pending'"


class Prompt(Base):
    __tablename__ = "prompts"
    __table_args__ = (
        Index(
            "ix_prompts_pending",
            "created_at",
            "key",
            sqlite_where=text(PENDING),
            postgresql_where=text(PENDING),
        ),
        # One ticker's done prompts, and the key that finds their forecasts, without a row read.
        Index("ix_prompts_ticker", "ticker", "status", "as_of", "key"),
    )
    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    template_name: Mapped[str] = mapped_column(String(128))
    template_version: Mapped[int] = mapped_column(Integer)
    template_hash: Mapped[str] = mapped_column(String(64))
    language: Mapped[str] = mapped_column(String(16))
    scope: Mapped[str] = mapped_column(String(16))
    ticker: Mapped[str | None] = mapped_column(String(16))
    as_of: Mapped[str] = mapped_column(String(10))
    text: Mapped[str] = mapped_column(Text)
    token_count: Mapped[int] = mapped_column(Integer)
    max_new_tokens: Mapped[int] = mapped_column(Integer)
    sampling_json: Mapped[str] = mapped_column(Text)
    item_keys_json: Mapped[str] = mapped_column(Text)
    items_dropped: Mapped[int] = mapped_column(Integer, default=0)
    status: Mapped[str] = mapped_column(String(16))  # pending | done | failed
    error: Mapped[str | None] = mapped_column(Text)
    run_id: Mapped[int | None] = mapped_column(ForeignKey("runs.id"))
    created_at: Mapped[datetime] = mapped_column(UtcTimestamp)
    updated_at: Mapped[datetime] = mapped_column(UtcTimestamp)
    # The worker holding this prompt and the end of its lease (flows.store.claims); kept on a done
    # prompt as the name of the worker that finished it.
    claimed_by: Mapped[str | None] = mapped_column(String(128))
    claimed_until: Mapped[datetime | None] = mapped_column(UtcTimestamp)


class Generation(Base):
    """A finished forecast with everything needed to say how it was made."""

    __tablename__ = "generations"
    # With the unique key's own index this looks redundant; it is what lets one ticker's
    # forecasts be ordered by time from index entries alone (flows.store.robot).
    __table_args__ = (Index("ix_generations_prompt_created", "prompt_key", "created_at"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    prompt_key: Mapped[str] = mapped_column(ForeignKey("prompts.key"), unique=True)
    run_id: Mapped[int | None] = mapped_column(ForeignKey("runs.id"))
    text: Mapped[str] = mapped_column(Text)
    token_ids_json: Mapped[str] = mapped_column(Text)
    prompt_tokens: Mapped[int] = mapped_column(Integer)
    new_tokens: Mapped[int] = mapped_column(Integer)
    finish_reason: Mapped[str] = mapped_column(String(32))
    model_manifest_hash: Mapped[str] = mapped_column(String(64))
    template_name: Mapped[str] = mapped_column(String(128))
    template_version: Mapped[int] = mapped_column(Integer)
    template_hash: Mapped[str] = mapped_column(String(64))
    sampling_json: Mapped[str] = mapped_column(Text)
    timings_json: Mapped[str] = mapped_column(Text)
    tokens_per_s: Mapped[float | None] = mapped_column(Float)
    code_version: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(UtcTimestamp, index=True)


class GenerationState(Base):
    """Token ids generated so far for a prompt, so an interrupted run resumes."""

    __tablename__ = "generation_state"
    prompt_key: Mapped[str] = mapped_column(ForeignKey("prompts.key"), primary_key=True)
    token_ids_json: Mapped[str] = mapped_column(Text)
    updated_at: Mapped[datetime] = mapped_column(UtcTimestamp)


class SignalPrompt(Base):
    """A prompt whose template declares a signal: what to score, and whether it was."""

    __tablename__ = "signal_prompts"
    prompt_key: Mapped[str] = mapped_column(ForeignKey("prompts.key"), primary_key=True)
    prefix: Mapped[str] = mapped_column(Text)  # the prompt, then the signal's question
    content_free_prefix: Mapped[str] = mapped_column(Text)  # the same with no news items
    answers_json: Mapped[str] = mapped_column(Text)  # {label: answer text}, in order
    status: Mapped[str] = mapped_column(String(16), index=True)  # pending | done | failed
    error: Mapped[str | None] = mapped_column(Text)
    updated_at: Mapped[datetime] = mapped_column(UtcTimestamp)


class Signal(Base):
    """One answer of one scored prompt: its log-likelihood and probabilities, with provenance."""

    __tablename__ = "signals"
    __table_args__ = (UniqueConstraint("prompt_key", "label", name="uq_signals_prompt_label"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    prompt_key: Mapped[str] = mapped_column(ForeignKey("prompts.key"), index=True)
    label: Mapped[str] = mapped_column(String(32))
    answer: Mapped[str] = mapped_column(Text)
    logprob: Mapped[float] = mapped_column(Float)  # summed over the answer's tokens
    answer_tokens: Mapped[int] = mapped_column(Integer)
    raw_probability: Mapped[float] = mapped_column(Float)
    content_free_logprob: Mapped[float] = mapped_column(Float)
    content_free_tokens: Mapped[int] = mapped_column(Integer)
    content_free_probability: Mapped[float] = mapped_column(Float)
    probability: Mapped[float] = mapped_column(Float)  # calibrated
    model_manifest_hash: Mapped[str] = mapped_column(String(64))
    run_id: Mapped[int | None] = mapped_column(ForeignKey("runs.id"))
    code_version: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(UtcTimestamp, index=True)
