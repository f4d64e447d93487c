"""One definition per setting: the yalm-runner flags and the pipeline's YAML speak one vocabulary.

Each case is given to both front ends, the `generate` command (in process) and the
`generation:` section of a config file; both take the same spellings and refuse the same bad
values with the same words, naming the flag or the key.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
import yaml

from flows.config import load_config
from flows.errors import PipelineConfigError
from yalm_runner import cli
from yalm_runner.config import SamplingParams
from yalm_runner.errors import ConfigError
from yalm_runner.offload import OffloadPolicy
from yalm_runner.settings import (
    RunnerSettings,
    SamplingSettings,
    flag_of,
    parse_bytes,
)


def write_config(directory: Path, generation: dict) -> Path:
    path = directory / "yalm-forecast.yaml"
    path.write_text(yaml.safe_dump({"generation": generation}), encoding="utf-8")
    return path


GENERATE = ["generate", "-m", "no-store", "--input", "no.jsonl", "--output", "out.jsonl"]

# (setting, YAML value, the same value as typed on the command line, what is wrong)
REFUSED = [
    ("dtype", "int4", "int4", "one of auto, bf16, fp16, fp32, got 'int4'"),
    ("device", "tpu", "tpu", "auto, cpu, cuda, cuda:N, cuda:all or cuda:0,cuda:1, got 'tpu'"),
    ("kv_bits", 2, "2", "one of 16, 8, 4, got 2"),
    ("kv_on", "ram", "ram", "one of auto, gpu, cpu, got 'ram'"),
    ("kv_layout", "columns", "columns", "one of auto, rows, slots, got 'columns'"),
    ("weights_on", "nvme", "nvme", "one of auto, gpu, cpu, disk, got 'nvme'"),
    ("gpu_memory", "lots", "lots", "a size like 8GiB, got 'lots'"),
    ("cpu_memory", "0GiB", "0GiB", "must be a positive size, got '0GiB'"),
    ("top_p", 1.5, "1.5", r"must be in \[0, 1\], got 1.5"),
    ("top_k", -1, "-1", "must be >= 0, got -1"),
    ("temperature", -0.5, "-0.5", "must be >= 0.0, got -0.5"),
    ("batch_size", 0, "0", "must be >= 1, got 0"),
    ("checkpoint_every", -1, "-1", "must be >= 0, got -1"),
    ("max_new_tokens", 0, "0", "must be >= 1, got 0"),
]


@pytest.mark.parametrize(("name", "yaml_value", "cli_text", "message"), REFUSED)
def test_both_front_ends_refuse_a_bad_value_with_the_same_words(
    tmp_path, capsys, name, yaml_value, cli_text, message
):
    with pytest.raises(PipelineConfigError, match=rf"generation\.{name}: {message}$"):
        load_config(write_config(tmp_path, {name: yaml_value}))
    flag = flag_of(RunnerSettings, name)
    with pytest.raises(SystemExit) as exit_info:
        cli.main([*GENERATE, flag, cli_text])
    assert exit_info.value.code == 2
    last_line = capsys.readouterr().err.strip().splitlines()[-1]
    assert re.search(rf"error: argument (-\w/)?{flag}: {message}$", last_line), last_line


@pytest.mark.parametrize(
    ("name", "yaml_value", "cli_text", "expected"),
    [
        ("dtype", "bf16", "bf16", "bf16"),
        ("dtype", "bfloat16", "bfloat16", "bf16"),
        ("dtype", "float16", "float16", "fp16"),
        ("dtype", "float32", "fp32", "fp32"),
        ("device", "cuda:0,cuda:1", "cuda:0,cuda:1", "cuda:0,cuda:1"),
        ("batch_size", "auto", "auto", None),
        ("batch_size", 7, "7", 7),
        ("gpu_memory", "8GiB", "8GiB", "8GiB"),
        ("kv_layout", "slots", "slots", "slots"),
        ("overlap", False, None, False),
        ("kv_bits", 4, "4", 4),
    ],
)
def test_both_front_ends_accept_the_same_spellings(tmp_path, name, yaml_value, cli_text, expected):
    config = load_config(write_config(tmp_path, {name: yaml_value}))
    assert getattr(config.generation, name) == expected
    flag = flag_of(RunnerSettings, name)
    argv = [*GENERATE, flag] if cli_text is None else [*GENERATE, flag, cli_text]
    chosen = cli.settings.from_args(cli.build_parser().parse_args(argv))
    assert getattr(chosen, name) == expected


def test_a_rule_between_settings_names_the_flag_and_the_key(tmp_path, capsys):
    assert cli.main([*GENERATE, "--kv-bits", "4", "--kv-on", "gpu"]) == 1
    assert "error: --kv-bits: 4-bit KV is for a cache in pinned RAM" in capsys.readouterr().err
    with pytest.raises(PipelineConfigError, match=r"generation\.kv_bits: 4-bit KV is for a cache"):
        load_config(write_config(tmp_path, {"kv_bits": 4, "kv_on": "gpu"}))


def test_the_yaml_is_strict_where_the_command_line_reads_text(tmp_path):
    # A quoted YAML number is a string, a YAML `yes` is no integer: refused, named.
    for value, message in (("16", "expected an integer, got '16'"), (True, "expected an integer")):
        with pytest.raises(PipelineConfigError, match=rf"generation\.kv_bits: {message}"):
            load_config(write_config(tmp_path, {"kv_bits": value}))
    with pytest.raises(PipelineConfigError, match=r"generation\.kv_bitz: unknown key$"):
        load_config(write_config(tmp_path, {"kv_bitz": 8}))


def test_settings_make_the_engines_records(tmp_path):
    generation = {
        "dtype": "float16",
        "gpu_memory": "8GiB",
        "cpu_memory": "48GiB",
        "weights_on": "cpu",
        "kv_bits": 8,
        "kv_layout": "rows",
        "overlap": False,
        "temperature": 0.5,
        "top_k": 40,
        "seed": 9,
    }
    settings = load_config(write_config(tmp_path, generation)).generation
    assert settings.torch_dtype() is torch.float16
    assert OffloadPolicy.from_settings(settings) == OffloadPolicy(
        gpu_memory_bytes=8 * 2**30,
        cpu_memory_bytes=48 * 2**30,
        weights_on="cpu",
        kv_bits=8,
        kv_layout="rows",
        overlap=False,
    )
    params = SamplingParams.from_settings(settings)
    assert (params.temperature, params.top_k, params.top_p, params.seed) == (0.5, 40, 0.9, 9)
    assert (
        SamplingParams.from_mapping(settings.sampling()) == params
    )  # as a stored prompt carries it
    assert RunnerSettings().torch_dtype() is None  # auto: the session's choice for the device


def test_a_stored_sampling_mapping_is_checked_by_name():
    with pytest.raises(ConfigError, match=r"^sampling\.top_p: must be in \[0, 1\], got 2.0$"):
        SamplingParams.from_mapping({**SamplingSettings().sampling(), "top_p": 2.0})


def test_a_policy_built_in_code_is_refused_with_the_settings_words():
    with pytest.raises(ConfigError, match=r"^weights_on: one of auto, gpu, cpu, disk, got 'ram'$"):
        OffloadPolicy(weights_on="ram")


def test_on_a_cpu_the_ram_budget_is_the_device_memory_not_a_gpu_budget():
    policy = OffloadPolicy(gpu_memory_bytes=parse_bytes("8GiB"), cpu_memory_bytes=1024)
    on_gpu, on_cpu = policy.budgets_on("cuda"), policy.budgets_on("cpu")
    assert (on_gpu.device_bytes, on_gpu.pinned_bytes, on_gpu.device_memory) == (
        8 * 2**30,
        1024,
        "GPU",
    )
    # The GPU budget means nothing on a CPU-only run; RAM is the device memory, no pinned tier.
    assert (on_cpu.device_bytes, on_cpu.pinned_bytes, on_cpu.pinned_tier) == (1024, None, False)
    assert (on_cpu.device_memory, on_cpu.device_flag) == ("RAM", "--cpu-memory")


def test_the_plan_on_a_cpu_speaks_of_ram(tiny_store):
    from yalm_runner.checkpoint import ModelStore
    from yalm_runner.errors import OffloadError
    from yalm_runner.planning import plan_memory

    store = ModelStore.open(tiny_store)
    cpu = torch.device("cpu")
    plan = plan_memory(
        store, cpu, torch.float32, OffloadPolicy(weights_on="disk"), batch_size=2, max_context=32
    )
    described = plan.describe()
    assert "KV 48.00 KiB/row in RAM; layers: 0 resident in RAM, 3 on disk; RAM: weights" in (
        described
    )
    assert "GPU" not in described
    with pytest.raises(
        OffloadError, match=r"the RAM budget .* lower the batch size or raise --cpu-"
    ):
        plan_memory(
            store, cpu, torch.float32, OffloadPolicy(cpu_memory_bytes=1024), batch_size=1,
            max_context=32,
        )  # fmt: skip
