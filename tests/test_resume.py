"""Resumable generation: a killed run loses nothing and changes nothing.

The kill tests run ``yalm-runner generate`` as a real subprocess on a tiny model made just big
enough (about a second and a half of decoding on two cores) that kills land mid-generation.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from yalm_runner.checkpoint import ModelStore
from yalm_runner.config import SamplingParams
from yalm_runner.convert import convert_release
from yalm_runner.errors import GenerationError
from yalm_runner.resume import KEY_FIELD, OutputLog, StateFile
from yalm_runner.runner import GenerationInterrupted, generate_file
from yalm_runner.tiny import TinySpec, make_tiny

SAMPLING = SamplingParams(temperature=1.0, top_p=0.9, seed=1234)
MAX_NEW_TOKENS = 40
ROWS = 24
# One thread per generating process: spinning OpenMP workers on a loaded two-core machine make
# a run many times slower.
CHILD_ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
PREFIXES = ["The market", "Сбербанк повысил", "Oil prices\nfell", "Analysts expect", "Яндекс"]


def write_prompts(path: Path, count: int = ROWS, ids: bool = False, order=None) -> Path:
    lines = []
    for index in order if order is not None else range(count):
        row = {"prefix": f"{PREFIXES[index % len(PREFIXES)]} {index}"}
        if ids:
            row["id"] = f"row-{index}"
        if index % 7 == 3:
            row["max_new_tokens"] = 9
        lines.append(json.dumps(row, ensure_ascii=False))
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def generate(store, prompts, output, **overrides):
    settings = dict(
        sampling=SAMPLING,
        max_new_tokens=MAX_NEW_TOKENS,
        device=torch.device("cpu"),
        dtype=torch.float32,
        batch_size=4,
        checkpoint_every=2,
    )
    settings.update(overrides)
    return generate_file(store, prompts, output, **settings)


def cli_command(store, prompts, output, *extra):
    return [
        sys.executable,
        "-m",
        "yalm_runner.cli",
        "generate",
        *("-m", store, "--input", prompts, "--output", output),
        *("-n", MAX_NEW_TOKENS, "--temp", 1.0, "--top-p", 0.9, "--seed", 1234),
        *("--batch-size", 4, "--checkpoint-every", 2, "--device", "cpu", "--dtype", "fp32"),
        *extra,
    ]


def stored_lines(path: Path) -> list[dict]:
    """The complete lines of an output file (a torn last line is left out)."""
    if not path.exists():
        return []
    data = path.read_bytes()
    return [json.loads(line) for line in data[: data.rfind(b"\n") + 1].splitlines()]


def interrupt_after_rows(monkeypatch, rows: int) -> None:
    """Make the next in-process job send itself SIGTERM while storing its ``rows``-th row."""
    original = OutputLog.append
    count = {"rows": 0}

    def append(self, key, row):
        original(self, key, row)
        count["rows"] += 1
        if count["rows"] == rows:
            os.kill(os.getpid(), signal.SIGTERM)  # lands inside the write: must be deferred

    monkeypatch.setattr(OutputLog, "append", append)


@pytest.fixture(scope="module")
def slow_store(tiny_store, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("slow")
    spec = TinySpec(
        num_layers=6,
        embedding_size=64,
        hidden_size=384,
        num_heads=6,
        ffn_size=1024,
        dtype=torch.float32,
        seed=3,
    )
    make_tiny(folder / "release", spec, vocab=ModelStore.open(tiny_store).tokenizer_path)
    convert_release(folder / "release", folder / "store", num_heads=6)
    return folder / "store"


@pytest.fixture(scope="module")
def job(slow_store, tmp_path_factory):
    """The prompts and an uninterrupted run's output (in-process, another batch size)."""
    folder = tmp_path_factory.mktemp("job")
    prompts = write_prompts(folder / "in.jsonl")
    reference = folder / "reference.jsonl"
    generate(slow_store, prompts, reference, batch_size=8, checkpoint_every=0)
    return slow_store, prompts, reference.read_bytes()


def test_sigkill_at_random_moments_then_rerun_gives_the_same_bytes(job, tmp_path):
    store, prompts, reference = job
    rows = stored_lines_from_bytes(reference)
    assert len(rows) == ROWS and len({tuple(row["token_ids"]) for row in rows}) == ROWS
    rng = random.Random(20240611)
    mid_run_kills = 0
    for trial in range(3):
        output = tmp_path / f"trial{trial}.jsonl"
        command = [str(part) for part in cli_command(store, prompts, output)]
        state_path = StateFile.beside(output).path
        for attempt in range(8):
            state_before = state_path.read_bytes() if state_path.exists() else b""
            rows_before = len(stored_lines(output))
            with open(tmp_path / "stderr.txt", "wb") as stderr:
                process = subprocess.Popen(
                    command, stdout=subprocess.DEVNULL, stderr=stderr, env=CHILD_ENV
                )
                if attempt < 3:
                    if rng.random() < 0.5:
                        target = rng.randrange(rows_before, ROWS) if rows_before < ROWS else ROWS
                        while process.poll() is None and len(stored_lines(output)) <= target:
                            time.sleep(0.005)
                    else:
                        with contextlib.suppress(subprocess.TimeoutExpired):
                            process.wait(timeout=rng.uniform(0.8, 2.5))
                if process.poll() is None and attempt < 3:
                    process.send_signal(signal.SIGKILL)
                    process.wait()
                    stored = stored_lines(output)
                    keys = [row[KEY_FIELD] for row in stored if KEY_FIELD in row]
                    assert len(keys) == len(set(keys)), "a row was stored twice"
                    state_after = state_path.read_bytes() if state_path.exists() else b""
                    mid_run_kills += bool(len(keys) < ROWS and state_after != state_before)
                    continue
                assert process.wait(timeout=120) == 0, (tmp_path / "stderr.txt").read_text()
                break
        assert output.read_bytes() == reference, f"trial {trial} differs"
        assert not StateFile.beside(output).path.exists()
    print(f"{mid_run_kills} kills landed after the run had checkpointed, before it finished")
    assert mid_run_kills >= 2, "the kills did not land mid-generation; make the job longer"


def stored_lines_from_bytes(data: bytes) -> list[dict]:
    return [json.loads(line) for line in data.splitlines()]


def test_a_signal_saves_the_ids_of_rows_in_flight(tiny_store, tmp_path):
    prompts = write_prompts(tmp_path / "in.jsonl", count=4)  # row 3 stops at 9 tokens
    reference = tmp_path / "reference.jsonl"
    generate(tiny_store, prompts, reference, max_new_tokens=16, checkpoint_every=0)
    full = {f"line-{n}": row["token_ids"] for n, row in enumerate(stored_lines(reference), 1)}
    others = [ids for key, ids in full.items() if key != "line-4"]
    assert len(full["line-4"]) < min(len(ids) for ids in others), "row 3 must finish first"
    output = tmp_path / "out.jsonl"
    with pytest.MonkeyPatch.context() as patch:
        interrupt_after_rows(patch, 1)  # no checkpoints: only the signal can save the others
        with pytest.raises(GenerationInterrupted, match="1/4 rows done"):
            generate(tiny_store, prompts, output, max_new_tokens=16, checkpoint_every=0)
    partial = StateFile.beside(output).load().partial
    assert set(partial) == {"line-1", "line-2", "line-3"}
    for key, ids in partial.items():
        assert 0 < len(ids) < len(full[key]) and list(ids) == full[key][: len(ids)]
    generate(tiny_store, prompts, output, max_new_tokens=16, checkpoint_every=0)
    assert output.read_bytes() == reference.read_bytes()


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_saves_state_and_exits_cleanly_then_resume_is_identical(job, tmp_path, signum):
    store, prompts, reference = job
    output = tmp_path / "out.jsonl"
    command = [str(part) for part in cli_command(store, prompts, output)]
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=CHILD_ENV
    )
    while process.poll() is None and len(stored_lines(output)) < 6:
        time.sleep(0.005)
    process.send_signal(signum)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 128 + signum, stderr
    assert "Traceback" not in stderr
    assert f"interrupted by {signum.name}" in stderr and "state saved to" in stderr, stderr
    state = StateFile.beside(output).load()
    assert state is not None  # its rows in flight may be none: the signal can fall between batches
    done = {row[KEY_FIELD] for row in stored_lines(output)}
    assert not done & set(state.partial)
    generate(store, prompts, output)  # the library resumes what the CLI began
    assert output.read_bytes() == reference
    assert not StateFile.beside(output).path.exists()


def test_batch_composition_does_not_change_the_text(tiny_store, tmp_path):
    """On this model's peaked distributions; where near ties let the last bits decide, it does
    (tests/test_resume_exact.py), and exact resume replays the batches themselves."""
    ordered = write_prompts(tmp_path / "ordered.jsonl", count=12, ids=True)
    shuffled_order = list(range(12))
    random.Random(5).shuffle(shuffled_order)
    shuffled = write_prompts(tmp_path / "shuffled.jsonl", ids=True, order=shuffled_order)
    texts = []
    for name, prompts, batch_size in [
        ("b1", ordered, 1),
        ("b3", ordered, 3),
        ("b8", ordered, 8),
        ("shuffled", shuffled, 5),
    ]:
        output = tmp_path / f"{name}.jsonl"
        generate(tiny_store, prompts, output, max_new_tokens=16, batch_size=batch_size)
        texts.append({row["id"]: row["suffix"] for row in stored_lines(output)})
    assert all(text == texts[0] for text in texts[1:])
    assert len(set(texts[0].values())) == 12


def test_a_different_job_is_refused_and_no_resume_starts_over(tiny_store, slow_store, tmp_path):
    prompts = write_prompts(tmp_path / "in.jsonl", count=10)
    output = tmp_path / "out.jsonl"
    with pytest.MonkeyPatch.context() as monkeypatch:
        interrupt_after_rows(monkeypatch, 2)
        with pytest.raises(GenerationInterrupted):
            generate(tiny_store, prompts, output, max_new_tokens=16)
    state_path = StateFile.beside(output).path
    saved = (state_path.read_bytes(), output.read_bytes())
    assert len(stored_lines(output)) == 2

    refusals = [
        (dict(sampling=SamplingParams(temperature=1.0, top_p=0.9, seed=5)), "seed (1234 -> 5)"),
        (dict(max_new_tokens=17), "max_new_tokens (16 -> 17)"),
        (dict(stop=("\n",)), "stop"),
        (dict(dtype=torch.bfloat16), "dtype ('float32' -> 'bfloat16')"),
    ]
    for overrides, named in refusals:
        with pytest.raises(GenerationError, match="belongs to a different job") as caught:
            generate(tiny_store, prompts, output, **{"max_new_tokens": 16, **overrides})
        assert named in str(caught.value) and "--no-resume" in str(caught.value)
    with pytest.raises(GenerationError, match="the model store"):
        generate(slow_store, prompts, output, max_new_tokens=16)
    changed = tmp_path / "changed.jsonl"
    shutil.copy(prompts, changed)
    shutil.copy(state_path, StateFile.beside(tmp_path / "other.jsonl").path)
    with changed.open("a") as handle:
        handle.write('{"prefix": "one more"}\n')
    with pytest.raises(GenerationError, match="the input file"):
        generate(tiny_store, changed, tmp_path / "other.jsonl", max_new_tokens=16)
    assert (state_path.read_bytes(), output.read_bytes()) == saved, "a refusal changed files"

    # The command line says it in one line, and --no-resume starts over.
    command = [str(part) for part in cli_command(tiny_store, prompts, output, "-n", 16)]
    refused = subprocess.run(
        [*command, "--seed", "5"], capture_output=True, text=True, env=CHILD_ENV
    )
    assert refused.returncode == 1 and refused.stderr.strip().count("\n") == 0
    assert "seed (1234 -> 5)" in refused.stderr
    assert (state_path.read_bytes(), output.read_bytes()) == saved
    fresh = tmp_path / "fresh.jsonl"
    other_seed = SamplingParams(temperature=1.0, top_p=0.9, seed=5)
    generate(tiny_store, prompts, fresh, max_new_tokens=16, sampling=other_seed)
    generate(tiny_store, prompts, output, max_new_tokens=16, sampling=other_seed, resume=False)
    assert output.read_bytes() == fresh.read_bytes()
    assert not state_path.exists()


def test_stop_strings_end_rows_right_after_the_string(tiny_store, tmp_path):
    prompts = write_prompts(tmp_path / "in.jsonl", count=6, ids=True)
    plain = tmp_path / "plain.jsonl"
    generate(tiny_store, prompts, plain, max_new_tokens=24, checkpoint_every=0)
    reference = {row["id"]: row for row in stored_lines(plain)}
    long_row = max(reference.values(), key=lambda row: len(row["suffix"]))
    text = long_row["suffix"]
    stop = text[len(text) // 2 : len(text) // 2 + 2]
    expected = text[: text.find(stop) + len(stop)]

    rows = [json.loads(line) for line in prompts.read_text(encoding="utf-8").splitlines()]
    for row in rows:
        if row["id"] == long_row["id"]:
            row["stop"] = [stop, "never appears ✓"]
    per_row = tmp_path / "per_row.jsonl"
    per_row.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    stopped = tmp_path / "stopped.jsonl"
    generate(tiny_store, per_row, stopped, max_new_tokens=24)
    result = {row["id"]: row for row in stored_lines(stopped)}
    assert result[long_row["id"]]["suffix"] == expected
    ids = result[long_row["id"]]["token_ids"]
    assert len(ids) < len(long_row["token_ids"]) and long_row["token_ids"][: len(ids)] == ids
    others = [key for key in reference if key != long_row["id"]]
    assert all(result[key]["suffix"] == reference[key]["suffix"] for key in others)

    everywhere = tmp_path / "everywhere.jsonl"
    generate(tiny_store, prompts, everywhere, max_new_tokens=24, stop=(stop,))
    for row in stored_lines(everywhere):
        full = reference[row["id"]]["suffix"]
        cut = full.find(stop)
        assert row["suffix"] == (full if cut < 0 else full[: cut + len(stop)])

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prefix": "a"}\n{"prefix": "b", "stop": [""]}\n', encoding="utf-8")
    with pytest.raises(GenerationError, match=r"bad\.jsonl line 2: stop must be"):
        generate(tiny_store, bad, tmp_path / "bad_out.jsonl")


def test_torn_and_repeated_lines_in_the_output_log_are_handled(tiny_store, tmp_path, monkeypatch):
    prompts = write_prompts(tmp_path / "in.jsonl", count=10)
    reference = tmp_path / "reference.jsonl"
    generate(tiny_store, prompts, reference, max_new_tokens=16)
    output = tmp_path / "out.jsonl"
    with pytest.MonkeyPatch.context() as patch:
        interrupt_after_rows(patch, 3)
        with pytest.raises(GenerationInterrupted):
            generate(tiny_store, prompts, output, max_new_tokens=16)
    lines = output.read_bytes().splitlines(keepends=True)
    assert len(lines) == 3

    # A row stored twice and a line cut by a crash mid-write.
    damaged = b"".join([*lines, lines[0], lines[1][: len(lines[1]) // 2]])
    output.write_bytes(damaged)
    generate(tiny_store, prompts, output, max_new_tokens=16)
    assert output.read_bytes() == reference.read_bytes()

    # A damaged line that is not the last one is refused, naming it, and nothing is touched.
    with pytest.MonkeyPatch.context() as patch:
        interrupt_after_rows(patch, 2)
        with pytest.raises(GenerationInterrupted):
            generate(tiny_store, prompts, output, max_new_tokens=16, resume=False)
    lines = output.read_bytes().splitlines(keepends=True)
    damaged = lines[0][:10] + b"\n" + lines[1]
    output.write_bytes(damaged)
    with pytest.raises(GenerationError, match=r"out\.jsonl line 1: damaged output line"):
        generate(tiny_store, prompts, output, max_new_tokens=16)
    assert output.read_bytes() == damaged


def test_a_crash_after_the_final_rewrite_resumes_to_the_same_file(tiny_store, tmp_path):
    prompts = write_prompts(tmp_path / "in.jsonl", count=8)
    reference = tmp_path / "reference.jsonl"
    generate(tiny_store, prompts, reference, max_new_tokens=12)
    output = tmp_path / "out.jsonl"
    with pytest.MonkeyPatch.context() as patch:
        interrupt_after_rows(patch, 1)
        with pytest.raises(GenerationInterrupted):
            generate(tiny_store, prompts, output, max_new_tokens=12)
    # The rewrite replaced the log, then the process died before removing the state.
    output.write_bytes(reference.read_bytes())
    generate(tiny_store, prompts, output, max_new_tokens=12)
    assert output.read_bytes() == reference.read_bytes()
    assert not StateFile.beside(output).path.exists()


def test_saved_ids_that_do_not_fit_the_job_are_refused_naming_the_state_file(tiny_store, tmp_path):
    prompts = write_prompts(tmp_path / "in.jsonl", count=4)
    output = tmp_path / "out.jsonl"
    with pytest.MonkeyPatch.context() as patch:
        interrupt_after_rows(patch, 1)
        with pytest.raises(GenerationInterrupted):
            generate(tiny_store, prompts, output, max_new_tokens=16, checkpoint_every=0)
    state_file = StateFile.beside(output)
    state = state_file.load()
    key = sorted(state.partial)[0]
    state.partial[key] = (ModelStore.open(tiny_store).config.vocab_size,)  # outside the vocabulary
    state_file.save(state)
    saved = (state_file.path.read_bytes(), output.read_bytes())
    with pytest.raises(GenerationError) as caught:
        generate(tiny_store, prompts, output, max_new_tokens=16, checkpoint_every=0)
    assert str(caught.value) == (
        f"{state_file.path}: saved ids for row {key} do not fit the job; "
        "pass --no-resume to start over"
    )
    assert (state_file.path.read_bytes(), output.read_bytes()) == saved


def test_bad_input_loses_nothing_already_stored(tiny_store, tmp_path):
    prompts = write_prompts(tmp_path / "in.jsonl", count=4)
    output = tmp_path / "out.jsonl"
    generate(tiny_store, prompts, output, max_new_tokens=8)
    finished = output.read_bytes()
    with pytest.raises(GenerationError, match="exceed the model's 1024 positions"):
        generate(tiny_store, prompts, output, max_new_tokens=5000)
    assert output.read_bytes() == finished


def test_an_error_mid_run_keeps_the_progress_for_a_rerun(tiny_store, tmp_path, monkeypatch):
    prompts = write_prompts(tmp_path / "in.jsonl", count=8)
    reference = tmp_path / "reference.jsonl"
    generate(tiny_store, prompts, reference, max_new_tokens=12, checkpoint_every=0)
    output = tmp_path / "out.jsonl"
    original = OutputLog.append

    def append(self, key, row):
        if not output.exists() or not output.read_bytes():  # the rest of its batch is in flight
            raise RuntimeError("CUDA out of memory (simulated)")
        original(self, key, row)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(OutputLog, "append", append)
        with pytest.raises(RuntimeError, match="simulated"):
            generate(tiny_store, prompts, output, max_new_tokens=12, checkpoint_every=0)
    state = StateFile.beside(output).load()
    assert state is not None and state.partial, "the rows in flight were not saved"
    generate(tiny_store, prompts, output, max_new_tokens=12, checkpoint_every=0, batch_size=2)
    assert output.read_bytes() == reference.read_bytes()
