"""The model a pipeline config names: which store, and which tokenizer counts the prompts' tokens.

Glue between the config and ``yalm_runner``: the command line and the flow both ask it, so that
neither imports the other. It opens nothing heavier than a store's manifest.
"""

from __future__ import annotations

from pathlib import Path

from flows.config import PipelineConfig
from flows.errors import PipelineConfigError


def resolve_tokenizer_path(config: PipelineConfig) -> Path:
    """The ``tokenizer`` key, else the model store's own tokenizer, else (no store yet: a fresh
    install that renders before the model is converted) the real YaLM tokenizer shipped with
    the package, the one every YaLM-100B store carries."""
    if config.tokenizer is not None:
        if not config.tokenizer.is_file():
            raise PipelineConfigError(f"tokenizer: file not found: {config.tokenizer}")
        return config.tokenizer
    if config.model is not None and config.model.exists():
        from yalm_runner.checkpoint import ModelStore

        return ModelStore.open(config.model, verify_tokenizer=False).tokenizer_path
    from yalm_runner.vocab import bundled_vocab_path

    return bundled_vocab_path()
