"""The model a pipeline config names: which store, and which tokenizer counts the prompts' tokens.

Glue between the config and ``yalm_runner``: the command line and the flow both ask it, so that
neither imports the other. It opens nothing heavier than a store's manifest.
"""

from __future__ import annotations

from pathlib import Path

from flows.config import PipelineConfig
from flows.errors import PipelineConfigError


def resolve_tokenizer_path(config: PipelineConfig) -> Path:
    """The ``tokenizer`` key, else the model store's own tokenizer."""
    if config.tokenizer is not None:
        if not config.tokenizer.is_file():
            raise PipelineConfigError(f"tokenizer: file not found: {config.tokenizer}")
        return config.tokenizer
    if config.model is None:
        raise PipelineConfigError("tokenizer: not set, and no `model` store to take it from")
    from yalm_runner.checkpoint import ModelStore

    return ModelStore.open(config.model, verify_tokenizer=False).tokenizer_path
