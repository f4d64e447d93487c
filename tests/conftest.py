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


@pytest.fixture(scope="session")
def flat_store(tmp_path_factory) -> Path:
    """A random model whose next-token distributions are nearly flat over the real YaLM
    vocabulary (128,000 pieces): at every step the nucleus ends among thousands of near ties, so
    the last bits of the arithmetic decide tokens. The batch layout changes its text; EOS is
    made likely enough (~2% a step) that some rows end on it."""
    import torch

    from yalm_runner.convert import convert_release
    from yalm_runner.release import WEIGHTS_DIR, release_file_name, save_release_file
    from yalm_runner.tiny import TinySpec, make_tiny
    from yalm_runner.tokenizer import EOS_ID
    from yalm_runner.vocab import bundled_vocab_path

    folder = tmp_path_factory.mktemp("flat")
    spec = TinySpec(
        num_layers=4,
        embedding_size=64,
        hidden_size=256,
        num_heads=4,
        ffn_size=684,
        dtype=torch.float32,
        seed=3,
        embedding_std=0.03,  # logits of about 0.25 spread: flat
    )
    make_tiny(folder / "release", spec, vocab=bundled_vocab_path())
    head_file = folder / "release" / WEIGHTS_DIR / release_file_name(spec.num_layers + 4)
    head = torch.load(head_file, weights_only=True)
    head["output_bias"][EOS_ID] = 6.0
    save_release_file(head_file, head)
    convert_release(folder / "release", folder / "store")
    return folder / "store"
