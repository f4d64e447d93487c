"""Exact resume: a killed ``yalm-runner generate``, re-run, writes the uninterrupted run's bytes.

The model is ``flat_store``: random weights whose next-token distributions are nearly flat over
the real vocabulary, so that the last bits of the arithmetic decide tokens (the first test shows
the old way of resuming changes its text). Every run is a real ``yalm-runner generate`` process
with one thread; kills are SIGKILLs the process sends itself at a moment placed by construction
(``runner_kill_child.py``: mid-prefill, right after a checkpoint, between checkpoints, after a KV
frame is written but before the state names it), never by timing. Rows finish at different
steps: their own ``max_new_tokens``, stop strings, and EOS.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from yalm_runner.checkpoint import ModelStore
from yalm_runner.config import SamplingParams
from yalm_runner.engine import Engine, Request
from yalm_runner.offload import ResidentWeights
from yalm_runner.resume import StateFile
from yalm_runner.tokenizer import EOS_ID, Tokenizer

KILL_CHILD = Path(__file__).resolve().parent / "runner_kill_child.py"
CHILD_ENV = {**os.environ, "OMP_NUM_THREADS": "1"}  # the same threads in every run
PREFIXES = ["The market", "Сбербанк повысил", "Oil prices\nfell", "Analysts expect", "Яндекс"]
MAX_NEW = [10, 17, 24, 28, 13, 21, 28, 15]
SAMPLING = ("--temp", "0.8", "--top-p", "0.9", "--seed", "7")
# Every ids checkpoint also saves the KV cache (any positive interval that has passed).
EVERY_CHECKPOINT = ("--kv-checkpoint-interval", "1e-9")
KV_CONFIGS = {
    "device": (),
    "host-16-rows": ("--kv-on", "cpu", "--kv-bits", "16", "--kv-layout", "rows"),
    "host-8-rows": ("--kv-on", "cpu", "--kv-bits", "8", "--kv-layout", "rows"),
    "host-4-rows": ("--kv-on", "cpu", "--kv-bits", "4", "--kv-layout", "rows"),
    "host-16-slots": ("--kv-on", "cpu", "--kv-bits", "16", "--kv-layout", "slots"),
    "host-8-slots": ("--kv-on", "cpu", "--kv-bits", "8", "--kv-layout", "slots"),
    "host-4-slots": ("--kv-on", "cpu", "--kv-bits", "4", "--kv-layout", "slots"),
    "host-4-attended": ("--kv-on", "cpu", "--kv-bits", "4", "--kv-attention", "host"),
    "weights-on-disk": ("--weights-on", "disk"),
}


def write_prompts(path: Path) -> Path:
    rows = []
    for index, max_new in enumerate(MAX_NEW):
        row = {"id": f"row-{index}", "prefix": f"{PREFIXES[index % 5]} {index}"}
        row["max_new_tokens"] = max_new
        if index in (2, 5):
            row["stop"] = ["e"]
        rows.append(json.dumps(row, ensure_ascii=False))
    path.write_text("\n".join(rows) + "\n", encoding="utf-8")
    return path


def generate(store, prompts, output, *extra, kill: str | None = None, batch_size: int = 3):
    """Run ``yalm-runner generate`` (SIGKILLed at ``kill``); returns (exit status, stderr)."""
    command = [sys.executable, str(KILL_CHILD), kill] if kill else [sys.executable, "-m",
                                                                     "yalm_runner.cli"]  # fmt: skip
    command += ["generate", "-m", str(store), "--input", str(prompts), "--output", str(output)]
    command += ["-n", "28", *SAMPLING, "--batch-size", str(batch_size), "--checkpoint-every", "2"]
    command += ["--device", "cpu", "--dtype", "fp32", *extra]
    done = subprocess.run(command, capture_output=True, text=True, env=CHILD_ENV, timeout=300)
    return done.returncode, done.stderr


def rows_of(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def kill_and_rerun(store, prompts, output, moments, *extra) -> list[str]:
    """Run the job killed at each of ``moments`` in turn, then to its end; return the re-runs'
    stderr. Every kill must land while the job still had work."""
    errors = []
    for moment in moments:
        status, stderr = generate(store, prompts, output, *extra, kill=moment)
        assert status == -signal.SIGKILL, f"{moment}: the job ended first\n{stderr[-2000:]}"
        errors.append(stderr)
    status, stderr = generate(store, prompts, output, *extra)
    assert status == 0, stderr[-3000:]
    errors.append(stderr)
    assert not StateFile.beside(output).path.exists()
    assert not StateFile.kv_folder_beside(output).exists()
    return errors


@pytest.fixture(scope="module")
def prompts(tmp_path_factory) -> Path:
    return write_prompts(tmp_path_factory.mktemp("prompts") / "in.jsonl")


@pytest.fixture(scope="module")
def reference(flat_store, prompts, tmp_path_factory):
    """Each KV configuration's uninterrupted output, made when first asked for."""
    folder = tmp_path_factory.mktemp("reference")
    made: dict[str, bytes] = {}

    def of(config: str) -> bytes:
        if config not in made:
            output = folder / f"{config}.jsonl"
            status, stderr = generate(flat_store, prompts, output, *KV_CONFIGS[config])
            assert status == 0, stderr
            made[config] = output.read_bytes()
        return made[config]

    return of


def test_the_old_way_of_resuming_would_change_this_models_text(flat_store, prompts, reference):
    """Batches cut another way, or rows re-prefilled from their saved ids in one pass (how a
    resume used to go on), give other tokens on this model: the kill tests below would catch a
    resume that is not exact. (Each comparison flips a row with a chance of about one in
    seven; together they miss with a chance of about one in a hundred.)"""
    rows = rows_of_bytes(reference("device"))
    assert {row["token_ids"][-1] == EOS_ID for row in rows} == {True, False}, "some end on EOS"
    assert any(row["suffix"].endswith("e") and len(row["token_ids"]) < row["max_new_tokens"]
               for row in rows)  # fmt: skip
    store = ModelStore.open(flat_store)
    tokenizer = Tokenizer(store.tokenizer_path)
    sampling = SamplingParams(temperature=0.8, top_p=0.9, seed=7)
    engine = Engine(ResidentWeights(store, "cpu", torch.float32))
    requests = [
        Request(row["id"], tuple(tokenizer.encode(row["prefix"])), row["max_new_tokens"])
        for row in rows
    ]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the runs above
    try:
        planned = engine.generate(requests, sampling, batch_size=3)
        for done, row in zip(planned, rows, strict=True):  # the same run (no stop strings here)
            assert list(done.new_ids[: len(row["token_ids"])]) == row["token_ids"]
        differ = {}
        for batch_size in (1, 2, 4, 8):
            other = engine.generate(requests, sampling, batch_size=batch_size)
            differ[f"batches of {batch_size}"] = [
                done.key for done, again in zip(planned, other, strict=True) if done != again
            ]
        halfway = [
            Request(r.key, r.prompt_ids, r.max_new_tokens, done.new_ids[: len(done.new_ids) // 2])
            for r, done in zip(requests, planned, strict=True)
        ]
        again = engine.generate(halfway, sampling, batch_size=3)
        differ["re-prefilled halfway"] = [
            done.key for done, other in zip(planned, again, strict=True) if done != other
        ]
    finally:
        torch.set_num_threads(threads)
    print(f"rows whose text changes: {differ}")
    assert any(differ.values())


def rows_of_bytes(data: bytes) -> list[dict]:
    return [json.loads(line) for line in data.decode("utf-8").splitlines()]


def mismatch(got: bytes, want: bytes, errors: list[str]) -> str:
    """What differs between two runs' outputs, row by row, and what the re-runs said about
    resuming: the failure message of a byte comparison that failed."""
    mine = {row["id"]: row["token_ids"] for row in rows_of_bytes(got)}
    theirs = {row["id"]: row["token_ids"] for row in rows_of_bytes(want)}
    lines = [f"{len(mine)} rows written, {len(theirs)} expected"]
    for key in sorted(set(mine) | set(theirs)):
        a, b = mine.get(key), theirs.get(key)
        if a != b:
            first = next(
                (i for i, (x, y) in enumerate(zip(a or [], b or [], strict=False)) if x != y), None
            )
            lines.append(f"row {key}: first differing token {first}, lengths {len(a or [])}"
                         f" vs {len(b or [])}")  # fmt: skip
    said = [line for text in errors for line in text.splitlines()
            if "resum" in line or "checkpoint" in line or "exact" in line]  # fmt: skip
    return "\n".join(lines + said[-20:])


def test_kills_at_every_kind_of_moment_resume_to_the_same_bytes(
    flat_store, prompts, reference, tmp_path
):
    """KV on the device: killed inside a prefill, right after a KV checkpoint, between two
    checkpoints, after a KV frame was written but before the state named it, in a later
    batch's prefill, and late; each re-run goes on exactly."""
    output = tmp_path / "out.jsonl"
    moments = ["prefill:2", "kv:4", "decode:6", "kv-written:3", "prefill:7", "kv:6"]
    errors = kill_and_rerun(flat_store, prompts, output, moments, *EVERY_CHECKPOINT)
    assert output.read_bytes() == reference("device")
    told = "\n".join(errors)
    assert "goes on from its KV checkpoint" in told, told
    assert "not exact" not in told and "unusable" not in told, told


@pytest.mark.parametrize("config", [name for name in KV_CONFIGS if name != "device"])
def test_every_kv_placement_and_width_resumes_to_the_same_bytes(
    flat_store, prompts, reference, tmp_path, config
):
    output = tmp_path / "out.jsonl"
    extra = (*KV_CONFIGS[config], *EVERY_CHECKPOINT)
    errors = kill_and_rerun(flat_store, prompts, output, ["prefill:3", "kv:5", "decode:9"], *extra)
    assert output.read_bytes() == reference(config)
    told = "\n".join(errors)
    assert "goes on from its KV checkpoint" in told and "not exact" not in told, told


def test_without_kv_checkpoints_the_live_batch_is_recomputed_exactly(
    flat_store, prompts, reference, tmp_path
):
    """Interval 0 (never) and the default (600 s, more than this job lasts) write no KV: a
    kill costs the live batch, recomputed from its start in its planned layout."""
    for interval in ("0", None):
        output = tmp_path / f"out-{interval}.jsonl"
        extra = ("--kv-checkpoint-interval", interval) if interval else ()
        errors = kill_and_rerun(flat_store, prompts, output, ["decode:20", "decode:15"], *extra)
        assert output.read_bytes() == reference("device")
        assert "KV checkpoint" not in "\n".join(errors)


def killed_with_kv(flat_store, prompts, output, moment="kv:5") -> Path:
    """The job killed after some KV checkpoints; returns its KV file."""
    status, stderr = generate(flat_store, prompts, output, *EVERY_CHECKPOINT, kill=moment)
    assert status == -signal.SIGKILL, stderr
    (kv_file,) = StateFile.kv_folder_beside(output).glob("batch-*.kv")
    return kv_file


def finish(flat_store, prompts, output) -> list[str]:
    status, stderr = generate(flat_store, prompts, output, *EVERY_CHECKPOINT)
    assert status == 0, stderr
    return [line for line in stderr.splitlines() if "KV checkpoint" in line]


def test_a_torn_last_kv_frame_falls_back_to_the_checkpoint_before_it(
    flat_store, prompts, reference, tmp_path
):
    output = tmp_path / "cut.jsonl"
    kv_file = killed_with_kv(flat_store, prompts, output)
    state = json.loads(StateFile.beside(output).path.read_text())
    (entry,) = state["exact"]["batches"].values()
    kv_file.write_bytes(kv_file.read_bytes()[: entry["current"]["end"] - 100])  # a torn frame
    (line,) = finish(flat_store, prompts, output)
    assert "last KV checkpoint is unusable" in line and "going on from the one before it" in line
    assert f"step {entry['previous']['step']}" in line
    assert output.read_bytes() == reference("device")

    output = tmp_path / "flipped.jsonl"
    kv_file = killed_with_kv(flat_store, prompts, output, "kv:3")
    data = bytearray(kv_file.read_bytes())
    data[-10] ^= 0xFF  # a bad sector in the last frame
    kv_file.write_bytes(bytes(data))
    (line,) = finish(flat_store, prompts, output)
    assert "fails its CRC32" in line and "the one before it" in line, line
    assert output.read_bytes() == reference("device")


def test_ids_without_their_kv_recompute_the_batch_from_its_start(
    flat_store, prompts, reference, tmp_path
):
    output = tmp_path / "out.jsonl"
    kv_file = killed_with_kv(flat_store, prompts, output)
    kv_file.unlink()
    (line,) = finish(flat_store, prompts, output)
    assert line.endswith("is missing); recomputing the batch from its start"), line
    assert output.read_bytes() == reference("device")


def test_a_signal_saves_ids_but_no_kv_and_the_rerun_is_exact(
    flat_store, prompts, reference, tmp_path
):
    output = tmp_path / "out.jsonl"
    status, stderr = generate(flat_store, prompts, output, *EVERY_CHECKPOINT, kill="sigterm:9")
    assert status == 128 + signal.SIGTERM, stderr
    state = json.loads(StateFile.beside(output).path.read_text())
    (kv_file,) = StateFile.kv_folder_beside(output).glob("batch-*.kv")
    (entry,) = state["exact"]["batches"].values()
    assert kv_file.stat().st_size == entry["current"]["end"], "the signal wrote KV"
    header = dict(zip(entry["current"]["keys"], entry["current"]["ids"], strict=True))
    assert any(len(state["partial"][key]) > len(ids) for key, ids in header.items())
    finish(flat_store, prompts, output)
    assert output.read_bytes() == reference("device")


def test_another_batch_size_resumes_from_ids_and_says_it_is_not_exact(
    flat_store, prompts, reference, tmp_path
):
    output = tmp_path / "out.jsonl"
    killed_with_kv(flat_store, prompts, output, "kv:12")
    before = {row["id"] for row in (rows_of(output) if output.exists() else [])}
    status, stderr = generate(flat_store, prompts, output, *EVERY_CHECKPOINT, batch_size=2)
    assert status == 0, stderr
    lines = [line for line in stderr.splitlines() if "not exact" in line]
    assert lines == [
        "yalm-runner generate: resume is not exact: batch size 3 -> 2; the unfinished rows go "
        "on from their saved ids"
    ]
    rows = rows_of(output)
    assert [row["id"] for row in rows] == [f"row-{index}" for index in range(len(MAX_NEW))]
    expected = {row["id"]: row for row in rows_of_bytes(reference("device"))}
    assert before and all(row == expected[row["id"]] for row in rows if row["id"] in before)
    assert not StateFile.kv_folder_beside(output).exists()


GPU_CONFIGS = {
    "device": ("--kv-on", "gpu"),
    **{name: flags for name, flags in KV_CONFIGS.items() if name.startswith("host-")},
}


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("config", list(GPU_CONFIGS))
def test_in_16_bits_on_a_gpu_every_kv_placement_resumes_to_the_same_bytes(
    flat_store, prompts, tmp_path, config
):
    """bf16 compute on CUDA, the KV cache on the GPU or in pinned RAM at 16/8/4 bits in both
    layouts (pinned write-backs are asynchronous: a checkpoint waits for them)."""
    extra = ("--device", "cuda", "--dtype", "bf16", *GPU_CONFIGS[config], *EVERY_CHECKPOINT)
    reference = tmp_path / "reference.jsonl"
    status, stderr = generate(flat_store, prompts, reference, *extra)
    assert status == 0, stderr
    output = tmp_path / "out.jsonl"
    errors = kill_and_rerun(flat_store, prompts, output, ["prefill:3", "kv:5", "decode:9"], *extra)
    if output.read_bytes() != reference.read_bytes():
        again = tmp_path / "again.jsonl"
        status, stderr = generate(flat_store, prompts, again, *extra)
        same = again.read_bytes() == reference.read_bytes()
        told = mismatch(output.read_bytes(), reference.read_bytes(), errors)
        itself = "reproduces itself" if same else "does not reproduce itself either"
        pytest.fail(f"the re-run differs; the uninterrupted run {itself}\n{told}")
    told = "\n".join(errors)
    assert "goes on from its KV checkpoint" in told and "not exact" not in told, told


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("config", list(GPU_CONFIGS))
def test_in_16_bits_on_a_gpu_every_kv_placement_reproduces_itself(
    flat_store, prompts, tmp_path, config
):
    """What exact resume stands on: three uninterrupted runs of the same command write the same
    bytes. On a mismatch, two more runs without KV checkpoints say whether checkpoints matter."""
    extra = ("--device", "cuda", "--dtype", "bf16", *GPU_CONFIGS[config])
    outputs = []
    for run in range(3):
        output = tmp_path / f"run-{run}.jsonl"
        status, stderr = generate(flat_store, prompts, output, *extra, *EVERY_CHECKPOINT)
        assert status == 0, stderr
        outputs.append(output.read_bytes())
    if len(set(outputs)) > 1:
        plain = []
        for run in range(2):
            output = tmp_path / f"plain-{run}.jsonl"
            status, stderr = generate(flat_store, prompts, output, *extra)
            assert status == 0, stderr
            plain.append(output.read_bytes())
        told = [mismatch(other, outputs[0], []) for other in outputs[1:] if other != outputs[0]]
        without = "agree" if plain[0] == plain[1] else "differ too"
        pytest.fail(
            f"{len(set(outputs))} different outputs of 3; without KV checkpoints two runs"
            f" {without}\n" + "\n".join(told)
        )


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_on_two_gpus_each_live_batch_resumes_to_the_same_bytes(flat_store, prompts, tmp_path):
    extra = ("--device", "cuda:0,cuda:1", "--dtype", "bf16", "--kv-on", "gpu", *EVERY_CHECKPOINT)
    reference = tmp_path / "reference.jsonl"
    status, stderr = generate(flat_store, prompts, reference, *extra)
    assert status == 0, stderr
    output = tmp_path / "out.jsonl"
    kill_and_rerun(flat_store, prompts, output, ["kv:5", "decode:9"], *extra)
    assert output.read_bytes() == reference.read_bytes()
