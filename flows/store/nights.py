"""The nights table: one row per run of the whole pipeline, and what failed on its own in it.

Owns the writes behind ``runs_v1`` (migration ``0005_nights``): a night starts ``running``,
gets the feeds, templates and prompts that failed on their own as they are known, and ends with
its outcome, counts and one-line cause. A night SIGKILLed before it could write its end stays
``running``; the next night that starts marks such rows ``interrupted`` (nothing else can be
running them: a night on this store holds the device lock while it generates, and rows older
than a day are never still running). It knows nothing of the steps or of Prefect.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime, timedelta

from sqlalchemy import select

from flows.errors import StoreError
from flows.store.database import Store, utc_now
from flows.store.models import Night, NightFailure
from flows.store.provenance import code_version

OUTCOMES = ("running", "done", "partial", "interrupted", "failed")
STALE_AFTER = timedelta(days=1)


def start_night(store: Store, as_of: datetime) -> int:
    """A new ``running`` night; nights left ``running`` for a day are marked ``interrupted``."""
    now = utc_now()
    with store.transaction() as session:
        stale = session.scalars(
            select(Night).where(Night.outcome == "running", Night.started_at < now - STALE_AFTER)
        )
        for night in stale:
            night.outcome, night.cause = "interrupted", "the process ended without a word"
        night = Night(as_of=as_of, started_at=now, outcome="running", code_version=code_version())
        session.add(night)
        session.flush()
        return night.id


def record_failures(
    store: Store,
    night_id: int,
    as_of: datetime,
    failures: Iterable[tuple[str, str, int | None, str]],
) -> None:
    """Each ``(kind, name, version, cause)``: a feed, template or prompt that failed tonight."""
    with store.transaction() as session:
        for kind, name, version, cause in failures:
            session.add(
                NightFailure(
                    night_id=night_id, kind=kind, name=name[:128], version=version, as_of=as_of,
                    cause=cause,
                )
            )  # fmt: skip


def finish_night(
    store: Store, night_id: int, outcome: str, *, stored: int, failed: int, cause: str | None
) -> None:
    if outcome not in OUTCOMES:
        raise ValueError(f"unknown outcome {outcome!r}; one of {OUTCOMES}")
    with store.transaction() as session:
        night = session.get(Night, night_id)
        if night is None:
            raise StoreError(f"no night with id {night_id}")
        night.outcome, night.finished_at = outcome, utc_now()
        night.forecasts_stored, night.forecasts_failed, night.cause = stored, failed, cause or None


def night_failures(store: Store, night_id: int) -> list[NightFailure]:
    with store.reading() as session:
        return list(
            session.scalars(
                select(NightFailure)
                .where(NightFailure.night_id == night_id)
                .order_by(NightFailure.id)
            )
        )
