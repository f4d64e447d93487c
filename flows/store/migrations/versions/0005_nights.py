"""Nights: one row per run of the whole pipeline, what failed in it, and the view ``runs_v1``.

``nights`` holds one row per night (``yalm-forecast run``, a served or deployed flow run):
its ``as_of``, when it started and finished, its outcome (``running``, ``done``, ``partial``,
``interrupted``, ``failed``: docs/night.md), the counts of forecasts stored and failed, and the
one-line cause. ``night_failures`` records each feed, template or prompt that failed on its own
that night, with the cause (a template's version too). ``runs_v1`` is the robot's read-only view
of the nights, a contract like ``forecasts_v1`` (docs/robot.md): change it only by adding
``runs_v2``.

Revision ID: 0005_nights
Revises: 0004_read_indexes
"""

import sqlalchemy as sa
from alembic import op

revision = "0005_nights"
down_revision = "0004_read_indexes"
branch_labels = None
depends_on = None

ts = sa.String(20)  # ISO 8601 UTC text, see flows.store.models.UtcTimestamp

RUNS_V1 = """
CREATE VIEW runs_v1 AS
SELECT
    n.id               AS night_id,
    n.as_of            AS as_of,
    n.started_at       AS started_at,
    n.finished_at      AS finished_at,
    n.outcome          AS outcome,
    n.forecasts_stored AS forecasts_stored,
    n.forecasts_failed AS forecasts_failed,
    n.cause            AS cause
FROM nights AS n
"""


def upgrade() -> None:
    op.create_table(
        "nights",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("as_of", ts, nullable=False),
        sa.Column("started_at", ts, nullable=False),
        sa.Column("finished_at", ts),
        sa.Column("outcome", sa.String(16), nullable=False),
        sa.Column("forecasts_stored", sa.Integer, nullable=False, server_default="0"),
        sa.Column("forecasts_failed", sa.Integer, nullable=False, server_default="0"),
        sa.Column("cause", sa.Text),
        sa.Column("code_version", sa.String(64), nullable=False),
    )
    op.create_index("ix_nights_as_of", "nights", ["as_of"])
    op.create_table(
        "night_failures",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("night_id", sa.Integer, sa.ForeignKey("nights.id"), nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("name", sa.String(128), nullable=False),
        sa.Column("version", sa.Integer),
        sa.Column("as_of", ts, nullable=False),
        sa.Column("cause", sa.Text, nullable=False),
    )
    op.create_index("ix_night_failures_night_id", "night_failures", ["night_id"])
    op.execute(RUNS_V1)


def downgrade() -> None:
    op.execute("DROP VIEW runs_v1")
    op.drop_table("night_failures")
    op.drop_table("nights")
