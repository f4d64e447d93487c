"""Read indexes: the robot's reads and render's news query cost the same after a year of nights.

- ``prompts``: the index on ``status`` goes (nearly every row is ``done``, so it matched almost
  everything, yet the planner read ``forecasts_v1`` through it and sorted the result); in its
  place a partial index holds only the pending prompts, in the order claims take them. A new
  index on ``(ticker, status, as_of, key)`` and one on ``generations(prompt_key, created_at)``
  order one ticker's forecasts by time from index entries alone (``flows.store.robot``).
- ``news_item_tickers`` gets the item's ``published_at`` (filled in here from ``news_items``) and
  an index on ``(ticker, published_at, item_id)``, which replaces the one on ``ticker``: one
  ticker's news of a time window, newest first, is then a walk down one index instead of every
  item ever tagged with the ticker.
- ``ANALYZE`` gives the planner its first statistics; every run keeps them fresh afterwards
  (``flows.store.database.tidy_after_run``).

``forecasts_v1`` is untouched: the same SQL, the same rows, only faster.

Revision ID: 0004_read_indexes
Revises: 0003_feed_text
"""

import sqlalchemy as sa
from alembic import op

revision = "0004_read_indexes"
down_revision = "0003_feed_text"
branch_labels = None
depends_on = None

PENDING = "status = 'pending'"

BACKFILL = {
    "sqlite": """
        UPDATE news_item_tickers SET published_at = (
            SELECT n.published_at FROM news_items AS n WHERE n.id = news_item_tickers.item_id
        )""",
    "postgresql": """
        UPDATE news_item_tickers AS t SET published_at = n.published_at
        FROM news_items AS n WHERE n.id = t.item_id""",
}


def upgrade() -> None:
    dialect = op.get_bind().dialect.name
    if dialect not in BACKFILL:
        raise NotImplementedError(f"0004_read_indexes has no SQL for {dialect}: {sorted(BACKFILL)}")
    op.drop_index("ix_prompts_status", table_name="prompts")
    op.create_index(
        "ix_prompts_pending",
        "prompts",
        ["created_at", "key"],
        sqlite_where=sa.text(PENDING),
        postgresql_where=sa.text(PENDING),
    )
    op.create_index("ix_prompts_ticker", "prompts", ["ticker", "status", "as_of", "key"])
    op.create_index("ix_generations_prompt_created", "generations", ["prompt_key", "created_at"])

    # Added nullable, filled, then made NOT NULL: SQLite rebuilds this table for the last step
    # (no view reads it, so the rebuild is safe; see 0002 for the table that must not be).
    op.add_column("news_item_tickers", sa.Column("published_at", sa.String(20)))
    op.execute(BACKFILL[dialect])
    op.drop_index("ix_news_item_tickers_ticker", table_name="news_item_tickers")
    with op.batch_alter_table("news_item_tickers") as batch:
        batch.alter_column("published_at", existing_type=sa.String(20), nullable=False)
    op.create_index(
        "ix_news_item_tickers_ticker_published",
        "news_item_tickers",
        ["ticker", "published_at", "item_id"],
    )
    if dialect == "sqlite":  # estimates from 1000 entries per index: seconds, not minutes
        op.execute("PRAGMA analysis_limit = 1000")
    op.execute("ANALYZE")


def downgrade() -> None:
    op.drop_index("ix_news_item_tickers_ticker_published", table_name="news_item_tickers")
    with op.batch_alter_table("news_item_tickers") as batch:
        batch.drop_column("published_at")
    op.create_index("ix_news_item_tickers_ticker", "news_item_tickers", ["ticker"])
    op.drop_index("ix_generations_prompt_created", table_name="generations")
    op.drop_index("ix_prompts_ticker", table_name="prompts")
    op.drop_index("ix_prompts_pending", table_name="prompts")
    op.create_index("ix_prompts_status", "prompts", ["status"])
