"""Signals: the model's probability of each of a template's answers, for the robot.

``signal_prompts`` is the scoring queue: for each prompt whose template declares a signal, the
text its answers are scored after, the content-free version of it (the template rendered with no
news items, for calibration), the answers, and whether it has been scored. ``signals`` holds one
row per scored prompt and answer label: the raw log-likelihood sum and its token count, the raw,
content-free and calibrated probabilities, and the provenance.

Also creates ``signals_v1``, the view the trading robot reads (docs/signals.md). Like
``forecasts_v1`` it is a contract: change it only by adding a new view (``signals_v2``). Its SQL
is the same on SQLite and PostgreSQL.

Revision ID: 0006_signals
Revises: 0005_nights
"""

import sqlalchemy as sa
from alembic import op

revision = "0006_signals"
down_revision = "0005_nights"
branch_labels = None
depends_on = None

ts = sa.String(20)  # ISO 8601 UTC text, see flows.store.models.UtcTimestamp

SIGNALS_V1 = """
CREATE VIEW signals_v1 AS
SELECT
    s.id                       AS signal_id,
    s.created_at               AS scored_at,
    p.as_of                    AS as_of,
    COALESCE(p.ticker, '')     AS ticker,
    p.template_name            AS template,
    p.template_version         AS template_version,
    p.language                 AS language,
    s.label                    AS label,
    s.probability              AS probability,
    s.raw_probability          AS raw_probability,
    s.content_free_probability AS content_free_probability,
    s.logprob                  AS logprob,
    s.answer_tokens            AS answer_tokens,
    s.model_manifest_hash      AS model_hash,
    s.prompt_key               AS prompt_key,
    s.run_id                   AS run_id
FROM signals AS s
JOIN prompts AS p ON p.key = s.prompt_key
"""


def upgrade() -> None:
    op.create_table(
        "signal_prompts",
        sa.Column("prompt_key", sa.String(64), sa.ForeignKey("prompts.key"), primary_key=True),
        sa.Column("prefix", sa.Text, nullable=False),
        sa.Column("content_free_prefix", sa.Text, nullable=False),
        sa.Column("answers_json", sa.Text, nullable=False),
        sa.Column("status", sa.String(16), nullable=False, index=True),
        sa.Column("error", sa.Text),
        sa.Column("updated_at", ts, nullable=False),
    )
    op.create_table(
        "signals",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column(
            "prompt_key", sa.String(64), sa.ForeignKey("prompts.key"), nullable=False, index=True
        ),
        sa.Column("label", sa.String(32), nullable=False),
        sa.Column("answer", sa.Text, nullable=False),
        sa.Column("logprob", sa.Float, nullable=False),
        sa.Column("answer_tokens", sa.Integer, nullable=False),
        sa.Column("raw_probability", sa.Float, nullable=False),
        sa.Column("content_free_logprob", sa.Float, nullable=False),
        sa.Column("content_free_tokens", sa.Integer, nullable=False),
        sa.Column("content_free_probability", sa.Float, nullable=False),
        sa.Column("probability", sa.Float, nullable=False),
        sa.Column("model_manifest_hash", sa.String(64), nullable=False),
        sa.Column("run_id", sa.Integer, sa.ForeignKey("runs.id")),
        sa.Column("code_version", sa.String(64), nullable=False),
        sa.Column("created_at", ts, nullable=False, index=True),
        sa.UniqueConstraint("prompt_key", "label", name="uq_signals_prompt_label"),
    )
    op.execute(SIGNALS_V1)


def downgrade() -> None:
    op.execute("DROP VIEW IF EXISTS signals_v1")
    op.drop_table("signals")
    op.drop_table("signal_prompts")
