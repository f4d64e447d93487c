"""Alembic migrations of the pipeline's store, run programmatically by ``flows.store.database``."""
