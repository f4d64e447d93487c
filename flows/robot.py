"""Old import path of ``flows.store.robot``, kept for one release (see CHANGELOG.md)."""

from flows.store.robot import (  # noqa: F401
    COLUMNS,
    VIEW,
    Forecast,
    connect_readonly,
    is_postgres_url,
    read_forecasts,
)
