"""Prompt claims: which worker holds a pending prompt, and until when.

``prompts.claimed_by`` names the worker (``host:gpu`` or any id it chooses) and
``prompts.claimed_until`` is the end of its lease (ISO 8601 UTC text, like every time in the
store). A prompt is free when it has no claim or its lease has run out, so a killed worker's
prompts go back to the queue by themselves (see ``flows.store.claims``). Both columns are nullable,
so existing rows need no backfill; SQLite and PostgreSQL both add them in place.

Revision ID: 0002_prompt_claims
Revises: 0001_initial
"""

import sqlalchemy as sa
from alembic import op

revision = "0002_prompt_claims"
down_revision = "0001_initial"
branch_labels = None
depends_on = None


# Plain ALTER TABLE, not Alembic's batch mode: batch mode rebuilds the table on SQLite, which
# the view forecasts_v1 (reading prompts) does not survive. SQLite >= 3.35 drops columns itself.


def upgrade() -> None:
    op.add_column("prompts", sa.Column("claimed_by", sa.String(128)))
    op.add_column("prompts", sa.Column("claimed_until", sa.String(20)))


def downgrade() -> None:
    op.drop_column("prompts", "claimed_until")
    op.drop_column("prompts", "claimed_by")
