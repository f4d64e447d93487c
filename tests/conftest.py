"""Shared fixtures: the real YaLM tokenizer and tiny random checkpoints.

The real tokenizer is the one the package ships (``yalm_runner/vocab``), checked against its
checksum, so the tests need nothing beside the checkout.
"""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def yalm_vocab() -> Path:
    from yalm_runner.vocab import bundled_vocab_path

    return bundled_vocab_path()


@pytest.fixture(scope="session")
def tiny_release(tmp_path_factory) -> Path:
    """A tiny random checkpoint in the release layout, fp32, with a small trained vocabulary."""
    import torch

    from yalm_runner.tiny import TinySpec, make_tiny

    path = tmp_path_factory.mktemp("release") / "tiny"
    make_tiny(path, TinySpec(num_layers=3, dtype=torch.float32, seed=7))
    return path


@pytest.fixture(scope="session")
def tiny_store(tiny_release, tmp_path_factory) -> Path:
    from yalm_runner.convert import convert_release

    path = tmp_path_factory.mktemp("store") / "tiny"
    convert_release(tiny_release, path, num_heads=4)
    return path
