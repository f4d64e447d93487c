"""Alembic environment: runs migrations on the connection ``flows.store.database`` hands in.

There is no alembic.ini and no URL here: the store opens the database (pragmas, WAL) and passes
its connection through ``config.attributes["connection"]``.
"""

from alembic import context

from flows.store.models import Base

connection = context.config.attributes.get("connection")
if connection is None:
    raise RuntimeError("flows migrations run through flows.store.open_store(), not the alembic CLI")

context.configure(
    connection=connection,
    target_metadata=Base.metadata,
    transaction_per_migration=True,
    render_as_batch=True,
)
with context.begin_transaction():
    context.run_migrations()
