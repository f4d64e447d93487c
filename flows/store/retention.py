"""Retention: pruning news items older than the config's ``retention.news_days``.

Owns what may be pruned (news items and their ticker rows, nothing else: forecasts, prompts,
runs and fetch history stay for ever), in batches of short transactions, and how the space
it frees is counted on each database. It knows nothing of feeds, the config file or when it
runs (``flows.sources.ingest`` calls it at the end of an ingest).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import delete, select, text
from sqlalchemy.orm import Session

from flows.store.database import Store
from flows.store.models import NewsItem, NewsTicker

# Items deleted per transaction: short transactions, so the WAL stays small and a reader's
# snapshot never holds a whole year of deletions.
PRUNE_BATCH_ITEMS = 5_000


@dataclass(frozen=True)
class PruneReport:
    """What pruning removed: items, their ticker rows, and the bytes it freed (SQLite: pages
    now free inside the file, which new rows reuse; the file itself shrinks only by
    ``VACUUM``. PostgreSQL: the size of the deleted rows, reclaimed by autovacuum)."""

    older_than: datetime
    items: int
    tickers: int
    bytes_freed: int


def prune_news(store: Store, older_than: datetime) -> PruneReport:
    """Delete news items published before ``older_than`` (with their ticker rows), a batch per
    transaction. Nothing else is touched: forecasts, prompts and signals are never pruned.

    Prompts name their items by dedup key inside ``item_keys_json`` (no foreign key): a pruned
    key no longer resolves to an item, while the prompt keeps the news as it was rendered.
    """
    items = tickers = row_bytes = 0
    free_before = _free_bytes(store)
    while True:
        with store.transaction() as session:
            batch = list(
                session.scalars(
                    select(NewsItem.id)
                    .where(NewsItem.published_at < older_than)
                    .order_by(NewsItem.published_at)
                    .limit(PRUNE_BATCH_ITEMS)
                )
            )
            if not batch:
                break
            if store.dialect == "postgresql":
                row_bytes += _postgres_row_bytes(session, batch)
            tickers += session.execute(
                delete(NewsTicker).where(NewsTicker.item_id.in_(batch))
            ).rowcount
            items += session.execute(delete(NewsItem).where(NewsItem.id.in_(batch))).rowcount
    freed = row_bytes if store.dialect == "postgresql" else _free_bytes(store) - free_before
    return PruneReport(older_than, items, tickers, max(freed, 0))


def _free_bytes(store: Store) -> int:
    if store.dialect != "sqlite":
        return 0
    with store.reading() as session:
        connection = session.connection()
        pages = connection.exec_driver_sql("PRAGMA freelist_count").scalar()
        return pages * connection.exec_driver_sql("PRAGMA page_size").scalar()


def _postgres_row_bytes(session: Session, item_ids: list[int]) -> int:
    size = 0
    for table, column in (("news_items", "id"), ("news_item_tickers", "item_id")):
        size += session.execute(
            text(
                f"SELECT coalesce(sum(pg_column_size(t.*)), 0) FROM {table} AS t "
                f"WHERE t.{column} = ANY(:ids)"
            ),
            {"ids": item_ids},
        ).scalar()
    return int(size)
