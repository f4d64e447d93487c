"""Shared fixtures: where the real YaLM tokenizer lies.

The tokenizer is not ours to ship, so it is never copied into the project; it is read from the
shared material beside the checkout (``../shared/yalm/voc_100b.sp``) or from ``$YALM_VOCAB``.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


def find_yalm_vocab() -> Path | None:
    candidates = [os.environ.get("YALM_VOCAB"), REPO_ROOT.parent / "shared/yalm/voc_100b.sp"]
    for candidate in candidates:
        if candidate and Path(candidate).is_file():
            return Path(candidate)
    return None


@pytest.fixture(scope="session")
def yalm_vocab() -> Path:
    path = find_yalm_vocab()
    if path is None:
        pytest.fail(
            "the real YaLM tokenizer was not found: set YALM_VOCAB or provide "
            "../shared/yalm/voc_100b.sp"
        )
    return path


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
