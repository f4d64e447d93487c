"""The yalm-runner command line, run as a user runs it: a real subprocess per command."""

import json
import os
import subprocess
import sys

import pytest
import torch

from yalm_runner.cli import build_parser


def run(*args, check=True):
    result = subprocess.run(
        [sys.executable, "-m", "yalm_runner.cli", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    if check and result.returncode != 0:
        raise AssertionError(result.stderr)
    return result


def test_make_tiny_convert_generate_inspect(tmp_path):
    run("make-tiny", tmp_path / "rel", "--layers", 2, "--seed", 5)
    run("convert", tmp_path / "rel", tmp_path / "store", "--num-heads", 4)
    prompts = tmp_path / "in.jsonl"
    prompts.write_text(
        '{"prefix": "Сбербанк повысил", "id": "sber"}\n\n'
        '{"prefix": "The market\\nrose", "max_new_tokens": 3, "topic": "x"}\n',
        encoding="utf-8",
    )
    out = tmp_path / "out.jsonl"
    result = run(
        "generate",
        "-m",
        tmp_path / "store",
        "--input",
        prompts,
        "--output",
        out,
        "--greedy",
        "-n",
        6,
        "--device",
        "cpu",
        "--dtype",
        "fp32",
    )
    rows = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert [row["prefix"] for row in rows] == ["Сбербанк повысил", "The market\nrose"]
    assert rows[1]["topic"] == "x" and rows[0]["id"] == "sber"
    assert len(rows[0]["token_ids"]) == 6 or rows[0]["token_ids"][-1] == 2
    assert len(rows[1]["token_ids"]) <= 3
    assert all(isinstance(row["suffix"], str) for row in rows)
    assert "tokens/s" in result.stderr and "peak RSS" in result.stderr
    again = tmp_path / "again.jsonl"
    run(
        "generate",
        "-m",
        tmp_path / "store",
        "--input",
        prompts,
        "--output",
        again,
        "--greedy",
        "-n",
        6,
        "--device",
        "cpu",
        "--dtype",
        "fp32",
    )
    assert again.read_text(encoding="utf-8") == out.read_text(encoding="utf-8")
    described = run("inspect", tmp_path / "store").stdout
    assert "parameters" in described and "one decode step" in described


def test_library_errors_are_one_line(tmp_path):
    result = run("inspect", tmp_path, check=False)
    assert result.returncode == 1
    assert result.stderr.strip().count("\n") == 0
    assert "manifest.json is missing" in result.stderr
    assert "Traceback" not in result.stderr
    verbose = run("--verbose", "inspect", tmp_path, check=False)
    assert "Traceback" in verbose.stderr


def test_bench_kv_widths_are_checked_before_anything_runs(capsys):
    from yalm_runner import cli

    for bad in ("3", "8,x", ""):
        assert cli.main(["bench", "--kv-bits", bad]) == 1
        assert "--kv-bits takes 16, 8 or 4 (a comma list)" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("given", "needs"),
    [
        (["--kv-layout", "rows"], "--kv-bits or --peers"),
        (["--max-batch", "512"], "--kv-bits or --peers"),
        (["--peer-timeout", "60"], "--peers or --uncapped-peers"),
        (["--uncapped-batch", "8"], "--peers or --uncapped-peers"),
        (["--disk-layers", "2"], "--disk"),
        (["--disk-file", "1GiB"], "--disk"),
        (["--kv-batches", "64,128"], "--kv-bits or --peers"),
        (["--group-size", "32"], "--quantize int4"),
    ],
)
def test_bench_refuses_an_option_that_would_do_nothing(capsys, given, needs):
    from yalm_runner import cli

    assert cli.main(["bench", "--gpu-memory", "8GiB", *given]) == 1
    err = capsys.readouterr().err.strip()
    assert err == f"yalm-runner bench: error: {given[0]} does nothing without {needs}"


@pytest.mark.parametrize(
    ("given", "error"),
    [
        (
            ["--device", "cpu", "--peers", "zero"],
            "--peers needs CUDA: --device cpu runs ours alone",
        ),
        (["--device", "cpu", "--disk", "."], "--disk needs CUDA: --device cpu runs ours alone"),
        (["--quantize", "int4", "--peers", "zero"], "--peers runs 16-bit weights: --quantize"),
        (["--device", "tpu"], "--device is cuda or cpu, got 'tpu'"),
        (["--kv-bits", "4", "--kv-batches", "8,x"], "--kv-batches takes batch sizes (a comma"),
    ],
)
def test_bench_refuses_what_a_cpu_or_compressed_run_cannot_do(capsys, given, error):
    from yalm_runner import cli

    assert cli.main(["bench", "--gpu-memory", "8GiB", *given]) == 1
    assert capsys.readouterr().err.startswith(f"yalm-runner bench: error: {error}")


def test_bench_runs_the_planners_rows_without_peers_when_kv_widths_are_asked_for():
    from yalm_runner.bench.comparison import check_options, planned_kv_widths

    # The command of issue 17: `--batch-sizes "" --gpu-memory 8GiB --kv-bits 16,4`, no --peers.
    assert planned_kv_widths((16, 4), peers=()) == (16, 4)
    assert planned_kv_widths((4, 16, 4), peers=()) == (16, 4)
    assert planned_kv_widths(None, peers=("zero",)) == (16,)  # beside the peers, as before
    assert planned_kv_widths(None, peers=()) == ()
    check_options(
        "13b", 8 * 2**30, peers=(), uncapped_peers=None, uncapped_batch=None, max_batch=512,
        kv_bits=(16, 4), kv_layout="slots", peer_timeout_s=None, disk_dir=None,
        disk_layers=None, disk_file_bytes=None,
    )  # fmt: skip


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_bench_prints_a_planner_row_for_each_kv_width_without_peers():
    result = run(
        "bench", "--shape", "tiny", "--batch-sizes", "", "--gpu-memory", "1GiB",
        "--kv-bits", "16,4", "--max-batch", "8", "--prompt-len", "8", "-n", "4",
    )  # fmt: skip
    table = result.stdout.splitlines()
    header = next(index for index, line in enumerate(table) if line.startswith("system"))
    assert len(table[header + 1 :]) == 2, result.stdout


def test_bad_input_lines_are_named(tiny_store, tmp_path):
    prompts = tmp_path / "in.jsonl"
    prompts.write_text('{"prefix": "ok"}\n{"text": "no prefix"}\n')
    result = run(
        "generate",
        "-m",
        tiny_store,
        "--input",
        prompts,
        "--output",
        tmp_path / "o",
        "--device",
        "cpu",
        check=False,
    )
    assert result.returncode == 1
    assert "in.jsonl line 2: expected an object with a 'prefix' string" in result.stderr
    assert not (tmp_path / "o").exists()


def test_unknown_flags_are_errors_and_help_ends_with_an_example():
    parser = build_parser()
    with pytest.raises(SystemExit):
        parser.parse_args(["generate", "--model", "x", "--input", "a", "--output", "b", "--bogus"])
    for command in ("convert", "generate", "inspect", "make-tiny"):
        help_text = run(command, "--help").stdout
        assert help_text.strip().splitlines()[-1].startswith("example: yalm-runner " + command)


def test_environment_variables_fill_flags(monkeypatch):
    monkeypatch.setenv("YALM_RUNNER_MAX_NEW_TOKENS", "7")
    monkeypatch.setenv("YALM_RUNNER_MODEL", "somewhere")
    args = build_parser().parse_args(["generate", "--input", "a", "--output", "b"])
    assert args.max_new_tokens == 7 and str(args.model) == "somewhere"


def test_budget_flags_stream_from_disk_with_the_same_output(tiny_store, tmp_path):
    prompts = tmp_path / "in.jsonl"
    prompts.write_text(
        "".join(f'{{"prefix": "Рынок {n} " }}\n' * 1 for n in range(5)), encoding="utf-8"
    )
    common = ["-m", tiny_store, "--input", prompts, "--greedy", "-n", 5, "--device", "cpu"]
    run("generate", *common, "--output", tmp_path / "resident.jsonl")
    streamed = run(
        "generate",
        *common,
        "--output",
        tmp_path / "disk.jsonl",
        "--weights-on",
        "disk",
        "--batch-size",
        2,
    )
    assert "on disk" in streamed.stderr and "batch 2 rows" in streamed.stderr
    assert (tmp_path / "disk.jsonl").read_bytes() == (tmp_path / "resident.jsonl").read_bytes()
    too_small = run(
        "generate", *common, "--output", tmp_path / "x.jsonl", "--cpu-memory", "1KiB", check=False
    )
    assert too_small.returncode == 1
    assert "RAM budget 1.00 KiB cannot hold the minimum" in too_small.stderr
    assert "Traceback" not in too_small.stderr


def test_inspect_prints_the_plan_and_the_predicted_step(tiny_store):
    result = run(
        "inspect",
        tiny_store,
        "--gpu-memory",
        "1MiB",
        "--weights-on",
        "cpu",
        "--prompt-len",
        16,
        "-n",
        16,
        "--rows",
        4,
    )
    assert "plan on cuda in bfloat16: batch 4 rows x 32 positions" in result.stdout
    assert "in pinned RAM" in result.stdout
    assert (
        "PREDICTION (not a measurement) for PCIe 4 x16 at 25 GB/s, NVMe at 3 GB/s, device-side "
        "rates as an H200 measured them" in result.stdout
    )
    refused = run("inspect", tiny_store, "--gpu-memory", "1KiB", check=False)
    assert refused.returncode == 1 and "GPU budget 1.00 KiB" in refused.stderr
    on_cpu = run("inspect", tiny_store, "--device", "cpu", "--cpu-memory", "64MiB")
    assert on_cpu.stdout.splitlines()[-1] == (
        "no prediction for a CPU-only plan: the step-time model's rates are a GPU's"
    )


def test_inspects_prediction_is_the_plans_bytes_at_the_named_rates(tiny_store):
    import re

    from yalm_runner.checkpoint import ModelStore
    from yalm_runner.offload import OffloadPolicy, parse_bytes
    from yalm_runner.planning import plan_memory

    # A link of 1 MB/s makes the tiny store's bytes the step's largest term.
    budgets = ["--gpu-memory", "1MiB", "--weights-on", "cpu", "--rows", 4]
    shape = ["--prompt-len", 16, "-n", 16, "--link-gbps", 0.001, "--disk-gbps", 0.5]
    lines = run("inspect", tiny_store, *budgets, *shape).stdout.splitlines()
    header = lines.index(
        "PREDICTION (not a measurement) for a 0.001 GB/s host-to-device link, a drive at 0.5 "
        "GB/s, device-side rates as an H200 measured them (docs/benchmarks.md):"
    )
    step_line, tokens_line, prefill_line, texts_line = lines[header + 1 : header + 5]
    plan = plan_memory(
        ModelStore.open(tiny_store), torch.device("cuda"), torch.bfloat16,
        OffloadPolicy(gpu_memory_bytes=parse_bytes("1MiB"), weights_on="cpu"), batch_size=None,
        max_context=32, prompt_tokens=16, rows=4,
    )  # fmt: skip
    link_ms = plan.placement.streamed_bytes_per_pass / 1e6 * 1e3  # every layer, once a step
    numbers = [float(x) for x in re.findall(r"(\d+\.\d+) ms", step_line)]
    step_ms, busy_link_ms = numbers[0], numbers[1]
    assert busy_link_ms == pytest.approx(link_ms, abs=0.05)
    assert step_line.startswith(f"  decode step   {step_ms:.1f} ms, bound by the link")
    assert link_ms < step_ms < link_ms + 10  # plus the last layer's work and the overhead
    tokens = float(re.search(r"tokens/s +(\d+\.\d) while decoding \(4 rows", tokens_line)[1])
    assert tokens == pytest.approx(4 / (step_ms / 1e3), rel=0.01)
    prefill_s = float(re.search(r"prefill +(\d+\.\d+) s per batch", prefill_line).group(1))
    assert prefill_s == pytest.approx(link_ms / 1e3, rel=0.05)  # one pass of the weights
    batch_s = prefill_s + 15 * step_ms / 1e3  # 16 new tokens: the prefill's, then 15 steps
    texts = float(re.search(r"texts/hour +(\d+) of 16 new tokens", texts_line).group(1))
    assert texts == pytest.approx(4 * 3600 / batch_s, rel=0.01)
    assert f"a batch of 4 every {batch_s:.1f} s, prefill included" in texts_line


def test_a_reader_that_stops_early_gets_no_traceback(tiny_store):
    # `yalm-runner inspect STORE | head -1` where the reader is gone before the output is: the
    # pipe's read end is closed first, so every write meets a closed pipe.
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        writer = subprocess.run(
            [sys.executable, "-m", "yalm_runner.cli", "inspect", str(tiny_store)],
            stdout=write_end,
            stderr=subprocess.PIPE,
            text=True,
            timeout=300,
        )
    finally:
        os.close(write_end)
    assert writer.stderr == ""
    assert writer.returncode == 141  # stopped by the closed pipe, as `cat` would be


def test_convert_takes_the_head_count_a_tiny_release_records(tmp_path):
    run("make-tiny", tmp_path / "rel", "--layers", 1, "--heads", 8)
    run("convert", tmp_path / "rel", tmp_path / "store")  # no --num-heads
    manifest = json.loads((tmp_path / "store" / "manifest.json").read_text())
    assert manifest["model"]["num_heads"] == 8
    (tmp_path / "rel" / "num_heads.json").unlink()  # a release as Yandex publishes it
    refused = run("convert", tmp_path / "rel", tmp_path / "other", check=False)
    assert refused.returncode == 1
    assert refused.stderr.strip().endswith(
        "hidden size 64 is not divisible by --num-heads 128; the release does not record the "
        "head count, pass the right one"
    )
