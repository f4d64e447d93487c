"""yalm_runner: run Yandex's YaLM-100B faithfully on small machines.

The package knows nothing of feeds, templates, SQL or Prefect; the pipeline in ``flows`` uses it
through the tokenizer, the store and the engine.
"""

from yalm_runner.errors import (
    CheckpointError,
    ConfigError,
    GenerationError,
    OffloadError,
    YalmError,
)

__version__ = "0.1.0"

__all__ = [
    "CheckpointError",
    "ConfigError",
    "GenerationError",
    "OffloadError",
    "YalmError",
    "__version__",
]
