"""Named migrations, applied in order, each in its own transaction."""
