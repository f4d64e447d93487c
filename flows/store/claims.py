"""Which worker generates which pending prompt: leases kept in the ``prompts`` table.

Owns claiming: a worker takes up to ``limit`` free prompts for ``lease_seconds``, where free
means pending and unclaimed, or claimed under a lease that has run out, or claimed by this same
worker id before (so a re-run of a killed worker takes its shard back at once, and any other
worker takes it once the lease ends). On PostgreSQL a claim is one transaction around
``SELECT ... FOR UPDATE SKIP LOCKED``: workers claiming at the same moment lock disjoint rows
and none waits for another. On SQLite the store's write transaction (``BEGIN IMMEDIATE``)
already lets one claimer in at a time. Worker ids must be unique among live workers (say
``host:gpu0`` or a shard's name); reusing one means "I am that worker, re-run".

Exactly-once results do not rest on the leases: ``flows.store.generations.record_generation`` keeps
one generation per prompt (a unique key) and changes nothing when called again, and
``record_claimed_generation`` also settles two holders finishing the same prompt at the same
instant (one lease ran out while its worker was still busy) in favour of the first. This module
knows nothing of the model, Prefect or how shards are sized.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import or_, select, update

from flows.errors import StoreError
from flows.store.database import Store, utc_now
from flows.store.generations import record_generation
from flows.store.models import Generation, Prompt

MAX_WORKER_ID_CHARS = 128  # prompts.claimed_by


def _worker(worker_id: str) -> str:
    if not isinstance(worker_id, str) or not worker_id.strip():
        raise StoreError(f"worker id must be a non-empty string, got {worker_id!r}")
    if len(worker_id) > MAX_WORKER_ID_CHARS:
        raise StoreError(f"worker id longer than {MAX_WORKER_ID_CHARS} characters: {worker_id!r}")
    return worker_id


def _lease_end(now: datetime, lease_seconds: float) -> datetime:
    if not lease_seconds > 0:
        raise StoreError(f"lease_seconds must be positive, got {lease_seconds!r}")
    return now + timedelta(seconds=lease_seconds)


def claim_prompts(
    store: Store,
    worker_id: str,
    *,
    limit: int,
    lease_seconds: float,
    keys: Iterable[str] | None = None,
    template: str | None = None,
    now: datetime | None = None,
) -> list[str]:
    """Claim up to ``limit`` free pending prompts, oldest first; returns their keys.

    ``keys`` restricts the claim to one shard's prompts (as split by the caller); ``now`` is
    for tests. An empty list means nothing is free: the queue is done, or held by others.
    """
    worker_id = _worker(worker_id)
    if limit < 1:
        raise StoreError(f"limit must be at least 1, got {limit!r}")
    now = now or utc_now()
    until = _lease_end(now, lease_seconds)
    query = (
        select(Prompt.key)
        .where(
            Prompt.status == "pending",
            or_(
                Prompt.claimed_until.is_(None),
                Prompt.claimed_until < now,
                Prompt.claimed_by == worker_id,
            ),
        )
        .order_by(Prompt.created_at, Prompt.key)
        .limit(limit)
        .with_for_update(skip_locked=True)  # PostgreSQL; SQLite renders no locking clause
    )
    if keys is not None:
        query = query.where(Prompt.key.in_(list(keys)))
    if template:
        query = query.where(Prompt.template_name == template)
    with store.transaction() as session:
        claimed = list(session.scalars(query))
        if claimed:
            session.execute(
                update(Prompt)
                .where(Prompt.key.in_(claimed))
                .values(claimed_by=worker_id, claimed_until=until)
            )
        return claimed


def renew_claims(
    store: Store,
    worker_id: str,
    keys: Sequence[str],
    *,
    lease_seconds: float,
    now: datetime | None = None,
) -> list[str]:
    """Extend this worker's lease on ``keys``; returns the ones it still holds (still pending).

    A key missing from the answer was finished, failed, or taken over after the lease ran out:
    the worker should drop it.
    """
    worker_id = _worker(worker_id)
    until = _lease_end(now or utc_now(), lease_seconds)
    with store.transaction() as session:
        held = list(
            session.scalars(
                select(Prompt.key)
                .where(
                    Prompt.key.in_(list(keys)),
                    Prompt.status == "pending",
                    Prompt.claimed_by == worker_id,
                )
                .order_by(Prompt.created_at, Prompt.key)
                .with_for_update()
            )
        )
        if held:
            session.execute(update(Prompt).where(Prompt.key.in_(held)).values(claimed_until=until))
        return held


def release_claims(store: Store, worker_id: str, keys: Iterable[str] | None = None) -> int:
    """Give back this worker's pending prompts (all, or ``keys``) at once; returns how many."""
    worker_id = _worker(worker_id)
    statement = (
        update(Prompt)
        .where(Prompt.status == "pending", Prompt.claimed_by == worker_id)
        .values(claimed_by=None, claimed_until=None)
    )
    if keys is not None:
        statement = statement.where(Prompt.key.in_(list(keys)))
    with store.transaction() as session:
        return session.execute(statement).rowcount


def expire_claims(store: Store, *, now: datetime | None = None) -> int:
    """Clear the leases that have run out on pending prompts; returns how many.

    Claiming already treats such prompts as free; this only makes the table say so, for people
    and dashboards reading it.
    """
    now = now or utc_now()
    statement = (
        update(Prompt)
        .where(Prompt.status == "pending", Prompt.claimed_until < now)
        .values(claimed_by=None, claimed_until=None)
    )
    with store.transaction() as session:
        return session.execute(statement).rowcount


def claimed_keys(store: Store, worker_id: str) -> list[str]:
    """The pending prompts this worker holds, oldest first (what its re-run will take back)."""
    worker_id = _worker(worker_id)
    with store.reading() as session:
        return list(
            session.scalars(
                select(Prompt.key)
                .where(Prompt.status == "pending", Prompt.claimed_by == worker_id)
                .order_by(Prompt.created_at, Prompt.key)
            )
        )


def record_claimed_generation(store: Store, prompt_key: str, **result: Any) -> int:
    """Record a claimed prompt's forecast through ``record_generation``; returns its id.

    ``result`` is ``record_generation``'s keyword arguments. If another holder of the same
    prompt committed its forecast while this one was being written (PostgreSQL then refuses the
    second row by the unique key), the first forecast stands and its id is returned: one prompt,
    one forecast.
    """
    try:
        return record_generation(store, prompt_key, **result)
    except StoreError:
        with store.reading() as session:
            winner = session.scalar(
                select(Generation.id).where(Generation.prompt_key == prompt_key)
            )
        if winner is None:
            raise
        return winner
