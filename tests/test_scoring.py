"""Scoring candidate answers: the scorer's log-probs against an independent full-sequence pass.

The reference is ``quality.sequence_logits``: one sequence at a time from position 0 through
``model.block`` with the model's own causal mask, then ``log_softmax``; nothing of the packing,
the shared prefixes or the batches. Everything runs in fp32 on the CPU on the tiny model.
"""

from __future__ import annotations

import json

import pytest
import torch

from yalm_runner.checkpoint import ModelStore
from yalm_runner.cli import main
from yalm_runner.engine import Engine
from yalm_runner.offload import OffloadPolicy, ResidentWeights
from yalm_runner.packing import ScoreRequest, pack
from yalm_runner.planning import ScoreShape, fit_score_batch, plan_scoring
from yalm_runner.quality import sequence_logits
from yalm_runner.scorefile import score_file
from yalm_runner.scoring import ScoreRow, ScoringJob, encode_row
from yalm_runner.session import open_session
from yalm_runner.tokenizer import Tokenizer

TOLERANCE = 1e-4

# Rows with shared prefixes, candidates of different token lengths, several prompts of mixed
# lengths, and "stock pri" + "ces ...", whose first candidate token merges across the boundary.
ROWS = [
    ScoreRow(
        "ru", "Акции Сбербанка на следующей сессии:", (" вырастут", " упадут", " не изменятся")
    ),
    ScoreRow("en", "The shares will ", ("rise", "fall sharply after the report", "stay flat")),
    ScoreRow("merge", "stock pri", ("ces rose sharply", "ces fell back to the lows")),
    ScoreRow("one", "Hello", (" world",)),
    ScoreRow(
        "long",
        "Morning note.\nThe company reported strong earnings, and the market opened higher. "
        "Analysts expect the shares to",
        (" rise", " fall", " rise further"),
    ),
]


class ListSink:
    location = "memory"

    def __init__(self):
        self.rows = {}
        self.completed = False

    def stored(self, keys):
        return {key for key in keys if key in self.rows}

    def finished(self, result):
        self.rows[result.key] = result

    def complete(self):
        self.completed = True


@pytest.fixture(scope="module")
def store(tiny_store):
    return ModelStore.open(tiny_store)


@pytest.fixture(scope="module")
def tokenizer(store):
    return Tokenizer(store.tokenizer_path)


@pytest.fixture(scope="module")
def resident(store):
    return ResidentWeights(store, "cpu", torch.float32)


def reference_logprobs(weights, tokenizer, row: ScoreRow) -> list[float]:
    """Per candidate: log_softmax of one plain full-sequence pass, summed over its tokens."""
    sums = []
    for candidate in row.candidates:
        context_len, ids = encode_row(tokenizer, row.prefix, candidate)
        log_probs = torch.log_softmax(sequence_logits(weights, list(ids)).double(), dim=-1)
        sums.append(sum(float(log_probs[t - 1, ids[t]]) for t in range(context_len, len(ids))))
    return sums


def score_rows(session, tokenizer, rows, batch_size=None):
    job = ScoringJob(rows, tokenizer, session.store.config)
    assert job.admit() == []
    sink = ListSink()
    job.run(session, sink, batch_size=batch_size, catch_signals=False)
    assert sink.completed
    return sink.rows, job


def test_the_merging_row_really_merges_across_the_prefix_boundary(tokenizer):
    context_len, ids = encode_row(tokenizer, "stock pri", "ces rose sharply")
    assert tuple(tokenizer.encode("stock pri")) != ids[:context_len]
    first, second = (encode_row(tokenizer, "stock pri", text)[1] for text in ROWS[2].candidates)
    request = ScoreRequest("merge", context_len, (first, second))
    assert request.shared_len < context_len  # the shared part is shorter than the prefix


def test_trailing_whitespace_of_the_prefix_moves_to_the_candidate(tokenizer):
    assert encode_row(tokenizer, "The shares will ", "rise") == encode_row(
        tokenizer, "The shares will", " rise"
    )
    context_len, ids = encode_row(tokenizer, "The shares will", " rise")
    assert ids == tuple(tokenizer.encode("The shares will rise"))
    assert context_len == len(tokenizer.encode("The shares will"))


@pytest.mark.parametrize("batch_size, group_rows", [(5, 0), (2, 0), (5, 2), (1, 0)])
def test_scores_equal_an_independent_full_sequence_pass(
    store, tokenizer, resident, batch_size, group_rows
):
    requests = ScoringJob(ROWS, tokenizer, store.config).requests
    scored = Engine(resident).score(requests, batch_size=batch_size, group_rows=group_rows)
    for row, result in zip(ROWS, scored, strict=True):
        expected = reference_logprobs(resident, tokenizer, row)
        assert result.key == row.key
        assert result.logprobs == pytest.approx(expected, abs=TOLERANCE)
        tokens = [len(encode_row(tokenizer, row.prefix, c)[1]) for c in row.candidates]
        context = encode_row(tokenizer, row.prefix, row.candidates[0])[0]
        assert list(result.tokens) == [count - context for count in tokens]
    assert len({result.tokens for result in scored}) > 1  # candidates of different lengths


def test_a_packed_row_computes_the_shared_part_once(tokenizer, store):
    requests = ScoringJob(ROWS[:1], tokenizer, store.config).requests
    packed = pack(requests, 2, "cpu")
    separate = sum(len(sequence) - 1 for sequence in requests[0].sequences)
    assert packed.tokens.shape[1] == requests[0].packed_len < separate


def test_offloaded_from_disk_scores_equal_resident(tiny_store, tokenizer, resident):
    policy = OffloadPolicy(weights_on="disk")
    job = ScoringJob(ROWS, tokenizer, ModelStore.open(tiny_store).config)
    with open_session(
        tiny_store, device="cpu", dtype=torch.float32, policy=policy, score_only=job.shape
    ) as session:
        assert session.placement.count("disk") == session.store.config.num_layers
        rows, _ = score_rows(session, tokenizer, ROWS)
        streamed = session.engine.weights.bytes_from_disk
    resident_rows = Engine(resident).score(job.requests, batch_size=len(ROWS))
    for expected in resident_rows:
        assert rows[expected.key].logprobs == pytest.approx(expected.logprobs, abs=TOLERANCE)
    assert streamed > 0


def test_every_layer_is_streamed_once_per_batch(tiny_store, tokenizer):
    job = ScoringJob(ROWS, tokenizer, ModelStore.open(tiny_store).config)
    policy = OffloadPolicy(weights_on="disk")
    with open_session(
        tiny_store, device="cpu", dtype=torch.float32, policy=policy, score_only=job.shape,
        batch_size=2,
    ) as session:  # fmt: skip
        layer_bytes = sum(
            session.store.parts[f"layer_{idx}"].data_bytes
            for idx in range(session.store.config.num_layers)
        )
        _, job = score_rows(session, tokenizer, ROWS, batch_size=2)
        assert job.stats.forward_passes == 3  # 5 prompts in batches of 2
        assert session.engine.weights.bytes_from_disk == 3 * layer_bytes


def test_the_planner_sizes_the_batch_by_activations_and_refuses_with_numbers(store):
    shape = ScoreShape(tokens=200, positions=9, rows=64)
    unbounded = fit_score_batch(store.config, torch.float32, None, shape)
    assert unbounded.batch_size == 64
    small = fit_score_batch(store.config, torch.float32, 4 << 20, shape)
    assert 1 <= small.batch_size < 64 and small.workspace_bytes <= 4 << 20
    with pytest.raises(Exception, match="scoring one prompt of 200 tokens needs"):
        fit_score_batch(store.config, torch.float32, 1000, shape)
    plan = plan_scoring(store, torch.device("cpu"), torch.float32, OffloadPolicy(), shape)
    assert plan.batch_size == 64 and plan.kv_bytes_per_row == 0


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), "utf-8")


def test_score_command_writes_logprobs_and_tokens_per_line(
    tiny_store, tokenizer, resident, tmp_path
):
    source, target = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_jsonl(
        source,
        [{"id": row.key, "prefix": row.prefix, "candidates": list(row.candidates)} for row in ROWS],
    )
    code = main(["score", "-m", str(tiny_store), "--input", str(source), "--output", str(target),
                 "--device", "cpu", "--batch-size", "2"])  # fmt: skip
    assert code == 0
    lines = [json.loads(line) for line in target.read_text("utf-8").splitlines()]
    assert [line["id"] for line in lines] == [row.key for row in ROWS]  # input order
    for row, line in zip(ROWS, lines, strict=True):
        assert line["logprobs"] == pytest.approx(
            reference_logprobs(resident, tokenizer, row), abs=TOLERANCE
        )
        assert len(line["tokens"]) == len(row.candidates) and "error" not in line


def test_score_refuses_kv_options_it_would_ignore(tiny_store, tmp_path, capsys):
    """Scoring keeps no KV cache: ``--kv-bits`` and friends would do nothing, so they are no
    options of ``score`` (an option that does nothing must not be taken silently)."""
    source = tmp_path / "in.jsonl"
    write_jsonl(source, [{"prefix": "Hello", "candidates": [" world"]}])
    for option in (["--kv-bits", "4"], ["--kv-on", "cpu"], ["--kv-layout", "slots"]):
        with pytest.raises(SystemExit) as stopped:
            main(["score", "-m", str(tiny_store), "--input", str(source), "--output",
                  str(tmp_path / "out.jsonl"), "--device", "cpu", *option])  # fmt: skip
        assert stopped.value.code == 2
        assert f"unrecognized arguments: {' '.join(option)}" in capsys.readouterr().err
    assert not (tmp_path / "out.jsonl").exists()


def test_bad_lines_are_named_carry_an_error_and_the_rest_is_scored(
    tiny_store, tokenizer, store, tmp_path, capsys
):
    too_long = len(encode_row(tokenizer, "word " * 400, " rise")[1])
    assert too_long > store.config.max_positions
    source, target = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_jsonl(
        source,
        [
            {"prefix": "The shares will", "candidates": [" rise", " fall"]},
            {"prefix": "No answers", "candidates": []},
            {"prefix": "An empty one", "candidates": [" yes", ""]},
            {"prefix": "word " * 400, "candidates": [" rise"]},
            {"prefix": "Fine too", "candidates": [" ok"]},
        ],
    )
    code = main(["score", "-m", str(tiny_store), "--input", str(source), "--output", str(target),
                 "--device", "cpu"])  # fmt: skip
    assert code == 3
    errors = [line for line in capsys.readouterr().err.splitlines() if " line " in line]
    assert errors == [
        f"yalm-runner score: {source} line 2: no candidates",
        f"yalm-runner score: {source} line 3: candidate 2 is empty",
        f"yalm-runner score: {source} line 4: prefix + candidate 1 is {too_long} tokens, over "
        f"the model's {store.config.max_positions} positions",
    ]
    lines = [json.loads(line) for line in target.read_text("utf-8").splitlines()]
    assert [("error" in line, "logprobs" in line) for line in lines] == [
        (False, True), (True, False), (True, False), (True, False), (False, True),
    ]  # fmt: skip


def test_a_file_that_is_not_score_input_is_refused_before_anything_is_written(
    tiny_store, tmp_path, capsys
):
    source, target = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    source.write_text('{"prefix": "a", "candidates": [" b"]}\n{"prefix": "c", "candidates": 5}\n')
    assert main(["score", "-m", str(tiny_store), "--input", str(source), "--output", str(target),
                 "--device", "cpu"]) == 1  # fmt: skip
    assert f"{source} line 2: 'candidates' must be a list of strings" in capsys.readouterr().err
    assert not target.exists()


def test_score_file_reports_the_plan(tiny_store, tmp_path):
    source, target = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_jsonl(source, [{"prefix": "The shares will", "candidates": [" rise", " fall"]}])
    messages = []
    report = score_file(tiny_store, source, target, device="cpu", notify=messages.append)
    assert report.scored == 1 and report.failed == [] and report.stats.forward_passes == 1
    assert "scoring 1 prompts per pass" in messages[0]


def test_a_session_without_memory_budgets_scores_long_prompts_after_a_one_row_plan(tiny_store):
    """A night with ``batch_size: 1`` plans generation for one row; with no memory budget the
    room that plan keeps beside the weights is no limit for scoring (it was taken for one, and
    a ~970-token prompt did not fit the one row's workspace)."""
    shape = ScoreShape(tokens=970, positions=3, rows=4)
    with open_session(
        tiny_store, device="cpu", batch_size=1, max_context=1000, prompt_tokens=32
    ) as session:
        plan = session.score_plan(shape, batch_size=1)
        assert plan.batch_size == 1
        assert session.score_plan(shape).batch_size == 4  # as many prompts as there are
    # Under a budget the room is what the budget leaves beside the weights (the pipeline's
    # starter config sets one): the one-row plan's room no longer decides; a budget too small
    # for the activations is refused with the numbers.
    roomy = OffloadPolicy(cpu_memory_bytes=256 << 20)
    with open_session(
        tiny_store, device="cpu", policy=roomy, batch_size=1, max_context=1000, prompt_tokens=32
    ) as session:
        room = session.plan.score_room_bytes
        kept = session.placement.kv_bytes + session.placement.workspace_bytes
        assert kept < 50 << 20 < room < 256 << 20
        assert session.score_plan(shape, batch_size=1).batch_size == 1
    tight = OffloadPolicy(cpu_memory_bytes=24 << 20)
    with (
        open_session(
            tiny_store, device="cpu", policy=tight, batch_size=1, max_context=1000, prompt_tokens=32
        ) as session,
        pytest.raises(Exception, match="scoring batch 1 of 970 tokens needs"),
    ):
        session.score_plan(shape, batch_size=1)
