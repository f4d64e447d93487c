"""Initial schema: runs, feeds, fetch history, news, prompts, generations, resume state.

Also creates ``forecasts_v1``, the view the trading robot reads (see docs/robot.md). The view is a
contract: change it only by adding a new view (``forecasts_v2``), never by editing this one.
Its SQL is written once with one dialect-specific expression (the JSON array length of the
prompt's item keys); SQLite databases get exactly the SQL they always had.

Revision ID: 0001_initial
Revises:
"""

import sqlalchemy as sa
from alembic import op

revision = "0001_initial"
down_revision = None
branch_labels = None
depends_on = None

ts = sa.String(20)  # ISO 8601 UTC text, see flows.store.models.UtcTimestamp

# {news_count}: the number of items in prompts.item_keys_json (a JSON array kept as text).
NEWS_COUNT = {
    "sqlite": "json_array_length(p.item_keys_json)",
    "postgresql": "json_array_length(p.item_keys_json::json)",
}

FORECASTS_V1 = """
CREATE VIEW forecasts_v1 AS
SELECT
    g.id                  AS forecast_id,
    g.created_at          AS generated_at,
    p.as_of               AS as_of,
    p.ticker              AS ticker,
    p.template_name       AS template,
    p.template_version    AS template_version,
    p.language            AS language,
    g.text                AS forecast,
    g.finish_reason       AS finish_reason,
    g.new_tokens          AS new_tokens,
    {news_count} AS news_count,
    g.model_manifest_hash AS model_hash,
    g.prompt_key          AS prompt_key,
    g.run_id              AS run_id
FROM generations AS g
JOIN prompts AS p ON p.key = g.prompt_key
WHERE p.status = 'done'
"""


def upgrade() -> None:
    op.create_table(
        "runs",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("kind", sa.String(32), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("started_at", ts, nullable=False),
        sa.Column("finished_at", ts),
        sa.Column("details_json", sa.Text, nullable=False),
        sa.Column("code_version", sa.String(64), nullable=False),
    )
    op.create_table(
        "feeds",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("name", sa.String(128), nullable=False, unique=True),
        sa.Column("url", sa.Text, nullable=False),
        sa.Column("etag", sa.Text),
        sa.Column("last_modified", sa.Text),
        sa.Column("last_status", sa.String(16)),
        sa.Column("last_fetched_at", ts),
        sa.Column("last_ok_at", ts),
    )
    op.create_table(
        "fetches",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("feed_id", sa.Integer, sa.ForeignKey("feeds.id"), nullable=False, index=True),
        sa.Column("run_id", sa.Integer, sa.ForeignKey("runs.id")),
        sa.Column("fetched_at", ts, nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("reason", sa.Text),
        sa.Column("http_status", sa.Integer),
        sa.Column("etag", sa.Text),
        sa.Column("last_modified", sa.Text),
        sa.Column("bytes_received", sa.Integer, nullable=False),
        sa.Column("attempts", sa.Integer, nullable=False),
        sa.Column("duration_s", sa.Float, nullable=False),
        sa.Column("items_seen", sa.Integer, nullable=False),
        sa.Column("items_new", sa.Integer, nullable=False),
    )
    op.create_table(
        "news_items",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("dedup_key", sa.String(64), nullable=False, unique=True),
        sa.Column("feed_id", sa.Integer, sa.ForeignKey("feeds.id"), nullable=False, index=True),
        sa.Column("source", sa.String(128), nullable=False),
        sa.Column("guid", sa.Text),
        sa.Column("title", sa.Text, nullable=False),
        sa.Column("summary", sa.Text, nullable=False),
        sa.Column("link", sa.Text),
        sa.Column("published_at", ts, nullable=False, index=True),
        sa.Column("published_estimated", sa.Boolean, nullable=False),
        sa.Column("fetched_at", ts, nullable=False),
    )
    op.create_table(
        "news_item_tickers",
        sa.Column("item_id", sa.Integer, sa.ForeignKey("news_items.id"), primary_key=True),
        sa.Column("ticker", sa.String(16), primary_key=True, index=True),
    )
    op.create_table(
        "prompts",
        sa.Column("key", sa.String(64), primary_key=True),
        sa.Column("template_name", sa.String(128), nullable=False),
        sa.Column("template_version", sa.Integer, nullable=False),
        sa.Column("template_hash", sa.String(64), nullable=False),
        sa.Column("language", sa.String(16), nullable=False),
        sa.Column("scope", sa.String(16), nullable=False),
        sa.Column("ticker", sa.String(16)),
        sa.Column("as_of", sa.String(10), nullable=False),
        sa.Column("text", sa.Text, nullable=False),
        sa.Column("token_count", sa.Integer, nullable=False),
        sa.Column("max_new_tokens", sa.Integer, nullable=False),
        sa.Column("sampling_json", sa.Text, nullable=False),
        sa.Column("item_keys_json", sa.Text, nullable=False),
        sa.Column("items_dropped", sa.Integer, nullable=False),
        sa.Column("status", sa.String(16), nullable=False, index=True),
        sa.Column("error", sa.Text),
        sa.Column("run_id", sa.Integer, sa.ForeignKey("runs.id")),
        sa.Column("created_at", ts, nullable=False),
        sa.Column("updated_at", ts, nullable=False),
    )
    op.create_table(
        "generations",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column(
            "prompt_key", sa.String(64), sa.ForeignKey("prompts.key"), nullable=False, unique=True
        ),
        sa.Column("run_id", sa.Integer, sa.ForeignKey("runs.id")),
        sa.Column("text", sa.Text, nullable=False),
        sa.Column("token_ids_json", sa.Text, nullable=False),
        sa.Column("prompt_tokens", sa.Integer, nullable=False),
        sa.Column("new_tokens", sa.Integer, nullable=False),
        sa.Column("finish_reason", sa.String(32), nullable=False),
        sa.Column("model_manifest_hash", sa.String(64), nullable=False),
        sa.Column("template_name", sa.String(128), nullable=False),
        sa.Column("template_version", sa.Integer, nullable=False),
        sa.Column("template_hash", sa.String(64), nullable=False),
        sa.Column("sampling_json", sa.Text, nullable=False),
        sa.Column("timings_json", sa.Text, nullable=False),
        sa.Column("tokens_per_s", sa.Float),
        sa.Column("code_version", sa.String(64), nullable=False),
        sa.Column("created_at", ts, nullable=False, index=True),
    )
    op.create_table(
        "generation_state",
        sa.Column("prompt_key", sa.String(64), sa.ForeignKey("prompts.key"), primary_key=True),
        sa.Column("token_ids_json", sa.Text, nullable=False),
        sa.Column("updated_at", ts, nullable=False),
    )
    dialect = op.get_bind().dialect.name
    if dialect not in NEWS_COUNT:
        raise NotImplementedError(f"forecasts_v1 has no SQL for {dialect}: {sorted(NEWS_COUNT)}")
    op.execute(FORECASTS_V1.format(news_count=NEWS_COUNT[dialect]))


def downgrade() -> None:
    op.execute("DROP VIEW IF EXISTS forecasts_v1")
    for table in (
        "generation_state",
        "generations",
        "prompts",
        "news_item_tickers",
        "news_items",
        "fetches",
        "feeds",
        "runs",
    ):
        op.drop_table(table)
