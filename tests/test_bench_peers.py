"""The bench's peers and disk measurement: same math as our engine, honest tables, real reads.

Accelerate runs its hook machinery on the CPU here (``cpu_offload``); the GPU paths (Accelerate
under ``max_memory``, DeepSpeed ZeRO-3) run on the lent GPU through ``yalm-runner bench``.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from dataclasses import asdict, replace
from pathlib import Path

import pytest
import torch

from yalm_runner.bench import peers as bench_peers
from yalm_runner.bench.disk import measure_disk_tier, measure_drive_read, write_synthetic_store
from yalm_runner.bench.peers import (
    PeerModel,
    PeerResult,
    build_ends,
    build_stack,
    generate_greedy,
    zero_config,
)
from yalm_runner.bench.synthetic import SHAPES, SyntheticStore
from yalm_runner.bench.table import (
    BenchRow,
    compare_with_ours,
    format_disk,
    format_table,
    target_lines,
)
from yalm_runner.config import SamplingParams
from yalm_runner.engine import Engine, Request
from yalm_runner.offload import OffloadPolicy, plan_placement
from yalm_runner.streaming import StreamingWeights, part_bytes_in

TINY = SHAPES["tiny"]
CPU = torch.device("cpu")


def _peer(store: SyntheticStore) -> PeerModel:
    peer = PeerModel(
        store.config,
        build_ends(store.config, store.read_part, torch.float32),
        build_stack(store.config, store.read_part, torch.float32),
    )
    peer.set_rotary(CPU, torch.float32)
    return peer


def _engine_ids(store: SyntheticStore, prompts: torch.Tensor, new_tokens: int) -> torch.Tensor:
    placement = plan_placement(part_bytes_in(store, torch.float32), OffloadPolicy())
    with StreamingWeights(store, "cpu", torch.float32, placement, verify=False) as weights:
        engine = Engine(weights, eos_id=-1)  # no early stop: every row makes new_tokens ids
        requests = [
            Request(f"r{row}", tuple(prompts[row].tolist()), new_tokens)
            for row in range(prompts.shape[0])
        ]
        finished = engine.generate(requests, SamplingParams(greedy=True), batch_size=len(requests))
    return torch.tensor([done.new_ids for done in finished])


def test_peer_module_greedy_ids_equal_engine():
    store = SyntheticStore(TINY, torch.float32, seed=3)
    prompts = bench_peers.bench_prompts(3, 7, TINY.vocab_size)
    run = generate_greedy(_peer(store), prompts, 6, CPU, torch.float32)
    assert torch.equal(run.ids, _engine_ids(store, prompts, 6))
    assert run.passes == 6 and run.last_logits.dtype == torch.float32


def test_accelerate_offload_gives_the_plain_modules_logits_and_ids():
    pytest.importorskip("accelerate")
    store = SyntheticStore(TINY, torch.float32, seed=5)
    prompts = bench_peers.bench_prompts(2, 5, TINY.vocab_size)
    plain = generate_greedy(_peer(store), prompts, 4, CPU, torch.float32)
    offloaded, settings = bench_peers.dispatch_accelerate(_peer(store), CPU, None)
    assert settings == {"device_map": "cpu_offload"}
    # The hooks really offload: between calls a layer's weights are on the meta device.
    assert offloaded.stack.layers[1].weights()["attention.dense.weight"].device.type == "meta"
    run = generate_greedy(offloaded, prompts, 4, CPU, torch.float32)
    assert torch.equal(run.ids, plain.ids)
    torch.testing.assert_close(run.last_logits, plain.last_logits, rtol=0, atol=0)
    assert torch.equal(run.ids, _engine_ids(store, prompts, 4))


def test_device_map_lookup_uses_the_nearest_parent():
    device_map = {"ends": 0, "stack.layers.0": 0, "stack.layers": "cpu"}
    assert bench_peers._placed(device_map, "stack.layers.0") == 0
    assert bench_peers._placed(device_map, "stack.layers.3") == "cpu"
    assert bench_peers._placed({"": 0}, "stack.layers.3") == 0


def test_zero_config_under_a_cap_keeps_at_most_two_layers_live():
    config = SHAPES["13b"]
    layer = config.layer_param_count(1)
    capped = zero_config(config, 2, 10 * layer * 2)["zero_optimization"]
    assert capped["stage"] == 3 and capped["offload_param"] == {"device": "cpu", "pin_memory": True}
    assert capped["stage3_max_live_parameters"] == 2 * layer
    assert capped["stage3_prefetch_bucket_size"] == layer
    tight = zero_config(config, 2, layer)["zero_optimization"]  # half a layer of budget
    assert tight["stage3_max_live_parameters"] == layer  # one whole layer is the floor
    assert capped["stage3_param_persistence_threshold"] < config.hidden_size * config.hidden_size


def _row(system, cap, tokens_per_s, batch=32):
    return BenchRow(system, batch, tokens_per_s, 0.5, 50.0, 0.9, 6 * 2**30, "", cap)


def test_table_ratios_and_targets():
    cap = 8 * 2**30
    rows = [
        _row("ours (streaming)", cap, 70.0),
        _row("HF Accelerate", cap, 5.0),
        _row("DeepSpeed ZeRO-3", cap, 20.0, batch=16),
        _row("ours (streaming)", None, 69.0),
        _row("DeepSpeed ZeRO-3", None, 48.0),
    ]
    compare_with_ours(rows)
    assert [round(row.ours_over_this, 3) for row in rows] == [1.0, 14.0, 3.5, 1.0, 1.438]
    table = format_table(rows).splitlines()
    assert table[0].split() == [
        "system", "cap", "B", "tok/s", "ms/step", "GB/s", "roofline", "peak", "GiB", "ours/x"
    ]  # fmt: skip
    assert "8.00 GiB" in table[2] and table[2].rstrip().endswith("14.00")
    assert " none " in table[5] and table[5].rstrip().endswith("1.44")
    assert target_lines(rows) == [
        "target ours >= 10x HF Accelerate (capped): 14.00x, met",
        "target ours >= 5x DeepSpeed ZeRO-3 (capped): 3.50x, NOT met",
        "target ours >= 1.25x DeepSpeed ZeRO-3 (uncapped): 1.44x, met",
    ]
    assert json.loads(json.dumps([row.__dict__ for row in rows]))[1]["ours_over_this"] == 14.0
    assert "not measured" in target_lines(rows[:1])[0]


def test_peer_result_travels_from_child_as_json(monkeypatch):
    sent = PeerResult("zero", 16, 8 * 2**30, True, tokens_per_s=12.5, settings={"stage": 3})

    def fake_child(command, timeout_s, env):
        assert command[1:3] == ["-m", "yalm_runner.bench.peers"]
        assert command[command.index("--cap-bytes") + 1] == str(8 * 2**30)
        assert timeout_s == 60
        return 0, "log line\n" + json.dumps(asdict(sent))

    monkeypatch.setattr(bench_peers, "run_child", fake_child)
    got = bench_peers.run_peer("zero", "13b", None, 16, 128, 32, 8 * 2**30, 60)
    assert got == sent

    monkeypatch.setattr(bench_peers, "run_child", lambda command, timeout_s, env: (-9, ""))
    failed = bench_peers.run_peer("zero", "13b", None, 16, 128, 32, None, 60)
    assert not failed.ok and "exited -9" in failed.error


def test_a_child_past_its_time_limit_is_killed_with_the_helpers_it_started(tmp_path):
    helper_pid = tmp_path / "helper.pid"
    # A child that starts a helper in its group, then outlives its limit.
    script = f"sleep 300 & echo $! > {helper_pid}; echo started; sleep 300"
    with pytest.raises(subprocess.TimeoutExpired):
        bench_peers.run_child(["sh", "-c", script], 2, dict(os.environ))
    helper = Path(f"/proc/{int(helper_pid.read_text())}/status")
    for _ in range(50):  # killed; then reaped by whoever inherited it
        if not helper.exists() or "State:\tZ" in helper.read_text():
            break
        time.sleep(0.1)
    assert not helper.exists() or "State:\tZ" in helper.read_text()


def test_a_finished_child_gives_its_exit_status_and_output():
    assert bench_peers.run_child(["sh", "-c", "echo one; echo two; exit 3"], 60, {}) == (
        3,
        "one\ntwo\n",
    )


def test_a_peers_batch_search_stops_when_its_time_is_spent(monkeypatch):
    cap, now_s, limits = 8 * 2**30, [0.0], []

    def slow_peer(system, shape, layers, batch, prompt_len, new_tokens, cap_bytes, timeout_s):
        limits.append(timeout_s)
        now_s[0] += min(150.0, timeout_s)  # each run takes 150 s, or is stopped at its limit
        error = "out of GPU memory" if timeout_s >= 150 else f"timed out after {timeout_s:.0f} s"
        return PeerResult(system, batch, cap_bytes, False, error)

    monkeypatch.setattr(bench_peers, "run_peer", slow_peer)
    logged = []
    best, tried = bench_peers.largest_fitting(
        "accelerate", "13b", None, [1, 2, 4, 8, 16, 32], 128, 32, cap, 400, logged.append,
        clock=lambda: now_s[0],
    )  # fmt: skip
    assert best is None
    assert [result.batch for result in tried] == [32, 16, 8]
    assert limits == [400.0, 250.0, 100.0]  # each run gets what is left of the peer's 400 s
    assert tried[-1].error == "timed out after 100 s"
    assert logged[-1] == "HF Accelerate: its 400 s under the cap are spent; B=4, 2, 1 not tried"


def test_largest_fitting_walks_down_until_a_batch_fits(monkeypatch):
    cap = 8 * 2**30

    def fake_peer(system, shape, layers, batch, *args):
        fits = batch <= 8
        return PeerResult(system, batch, cap, fits, "" if fits else "out of GPU memory", 1.0)

    monkeypatch.setattr(bench_peers, "run_peer", fake_peer)
    logged = []
    best, tried = bench_peers.largest_fitting(
        "accelerate", "13b", None, [4, 8, 16, 32], 128, 32, cap, 60, logged.append
    )
    assert best.batch == 8 and [result.batch for result in tried] == [32, 16, 8]
    assert len(logged) == 2


def test_drive_read_of_a_small_fresh_file(tmp_path):
    path = tmp_path / "sequential.bin"
    read = measure_drive_read(path, 40 * 2**20)
    assert read.size_bytes == 32 * 2**20  # whole 16 MiB chunks
    assert read.bytes_per_s > 0
    assert read.method in ("O_DIRECT", "buffered after POSIX_FADV_DONTNEED")
    assert not path.exists()


def test_disk_tier_reads_every_layer_of_a_real_store(tmp_path):
    config = replace(TINY, num_layers=3)
    store = write_synthetic_store(tmp_path / "store", config, torch.bfloat16)
    tier = measure_disk_tier(store, "cpu", torch.bfloat16, repeats=1)
    layers = sum(store.parts[f"layer_{idx}"].data_bytes for idx in range(3))
    assert tier.bytes_per_pass == layers and tier.layers == 3 and tier.bytes_per_s > 0
    line = format_disk(
        {
            "drive_bytes_per_s": 2e9,
            "drive_method": "O_DIRECT",
            "drive_file_bytes": 2**30,
            "tier_bytes_per_s": 1.5e9,
            "tier_bytes_per_pass": tier.bytes_per_pass,
            "tier_layers": tier.layers,
            "tier_over_drive": 0.75,
        }
    )
    assert "drive sequential read 2.00 GB/s" in line and "tier/drive 75.0%" in line


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_accelerate_peer_runs_under_a_cap_on_the_gpu():
    pytest.importorskip("accelerate")
    result = bench_peers.run_system("accelerate", TINY, 4, 16, 4, 2**30)
    assert result.ok, result.error
    assert result.peak_gpu_bytes <= 2**30 and result.tokens_per_s > 0
