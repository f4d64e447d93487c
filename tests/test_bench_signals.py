"""The signals benchmark runs on the CPU at a tiny shape (a smoke test: speed is measured on the
device, in benchmarks, never in tests)."""

import json

from yalm_runner.bench.signals import main, score_requests
from yalm_runner.bench.synthetic import SHAPES


def test_the_bench_scores_and_generates_the_same_prompts_and_prints_one_table(tmp_path, capsys):
    path = tmp_path / "signals.json"
    argv = ["--shape", "tiny", "--device", "cpu", "--prompt-len", "40", "--content-free-len",
            "10", "-n", "3", "--rows", "4", "--json", str(path)]  # fmt: skip
    assert main(argv) == 0
    out = capsys.readouterr().out
    result = json.loads(path.read_text())
    assert result["signals"] == result["texts"] == 4 and result["score_rows"] == 8
    assert result["score_passes"] == -(-8 // result["score_batch"])
    assert result["generate_passes"] == 3  # a prefill and two decode steps
    assert result["signals_per_hour"] > 0 and result["texts_per_hour"] > 0
    assert "| signals: 40-token prompt + 10-token content-free prompt, 3 answers each | 4 |" in out
    assert "| texts: 3 new tokens from the same prompts | 4 |" in out


def test_each_signal_is_a_prompt_row_and_a_content_free_row_with_three_answers():
    requests = score_requests(SHAPES["tiny"], 2, 30, 8, 3)
    assert [request.key for request in requests] == ["prompt0", "free0", "prompt1", "free1"]
    assert [request.context_len for request in requests] == [30, 8, 30, 8]
    for request in requests:
        assert [len(s) - request.context_len for s in request.sequences] == [1, 2, 3]
        assert all(0 < token < SHAPES["tiny"].vocab_size for s in request.sequences for token in s)
