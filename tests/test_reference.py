"""Faithfulness: our greedy continuation equals the original Yandex code's, token for token.

``golden/reference_greedy.json`` holds outputs of the ORIGINAL YaLM-100B Megatron code (run on
the CPU in fp32, see its ``how``) for a tiny random checkpoint that ``make-tiny`` rebuilds here
deterministically with the real YaLM vocabulary. We go through the user's path: the release
layout, ``convert``, then ``generate --greedy --device cpu --dtype fp32``.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from yalm_runner.tiny import TinySpec, make_tiny
from yalm_runner.tokenizer import Tokenizer

GOLDEN = json.loads((Path(__file__).parent / "golden/reference_greedy.json").read_text())


@pytest.fixture(scope="module")
def generated(yalm_vocab, tmp_path_factory):
    root = tmp_path_factory.mktemp("reference")
    args = GOLDEN["make_tiny"]
    make_tiny(
        root / "release",
        TinySpec(
            num_layers=args["layers"],
            embedding_size=args["embedding"],
            hidden_size=args["hidden"],
            num_heads=args["heads"],
            ffn_size=args["ffn"],
            seed=args["seed"],
            dtype=torch.float32,
        ),
        vocab=yalm_vocab,
    )
    prompts = root / "prompts.jsonl"
    prompts.write_text(
        "".join(
            json.dumps({"prefix": case["prefix"]}, ensure_ascii=False) + "\n"
            for case in GOLDEN["cases"]
        ),
        encoding="utf-8",
    )
    cli = [sys.executable, "-m", "yalm_runner.cli"]
    subprocess.run(
        [*cli, "convert", root / "release", root / "store", "--num-heads", str(args["heads"])],
        check=True,
        capture_output=True,
    )
    subprocess.run(
        [
            *cli,
            "generate",
            "-m",
            root / "store",
            "--input",
            prompts,
            "--output",
            root / "out.jsonl",
            "--greedy",
            "--device",
            "cpu",
            "--dtype",
            "fp32",
            "-n",
            str(GOLDEN["out_seq_length"]),
        ],
        check=True,
        capture_output=True,
    )
    lines = (root / "out.jsonl").read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines]


@pytest.mark.parametrize("case_idx", range(len(GOLDEN["cases"])))
def test_greedy_ids_equal_the_original(generated, case_idx):
    case, ours = GOLDEN["cases"][case_idx], generated[case_idx]
    assert ours["prefix"] == case["prefix"]
    assert ours["token_ids"] == case["token_ids"]


def test_prompt_ids_equal_the_original_tokenizer(yalm_vocab):
    tokenizer = Tokenizer(yalm_vocab)
    for case in GOLDEN["cases"]:
        assert tokenizer.encode(case["prefix"]) == case["context_ids"]


def test_suffixes_equal_the_original_except_its_nfkc_slice(generated, yalm_vocab):
    tokenizer = Tokenizer(yalm_vocab)
    for case, ours in zip(GOLDEN["cases"], generated, strict=True):
        normalised_prefix = tokenizer.decode(case["context_ids"])
        if normalised_prefix == case["prefix"]:
            assert ours["suffix"] == case["suffix"]
        else:
            # The original slices by the raw prompt's length, which NFKC changed ("…" -> "...");
            # its suffix then starts with leftover prompt characters. Ours starts at the tokens.
            shift = len(normalised_prefix) - len(case["prefix"])
            assert case["suffix"][shift:] == ours["suffix"]
