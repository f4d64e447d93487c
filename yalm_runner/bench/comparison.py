"""``yalm-runner bench``: the streaming engine against the link it streams over, in one run.

A synthetic model of a named shape (random weights made on the fly, never written to disk) is
placed under the given budgets; the run measures pinned and pageable host-to-device bandwidth,
then prefill + decode for each batch size, and reports tokens/s, the effective streaming rate
and its fraction of the roofline (bytes streamed per decode step over the measured pinned
bandwidth). Peak device memory is read from the allocator and set against the budget. With
peers, the same workload runs through each of them (``bench.peers``) and ours runs at the
planner's batch; with a directory, the disk tier is set against the drive (``bench.disk``).
Each of our rows also carries the step-time model's prediction of its decode step, at rates
calibrated in the same run (``bench.calibrate``). ``--quantize`` runs ours on a compressed
synthetic store (``bench.envelope``); ``--device cpu`` runs ours alone on a CPU, a RAM copy
standing in for the link (a smoke run, not a measurement). This module is the top of
``yalm_runner.bench``: it composes the others and nothing imports it but the command line.
"""

from __future__ import annotations

import json
import sys
from dataclasses import replace
from pathlib import Path

import torch

from yalm_runner.bench.calibrate import calibrate
from yalm_runner.bench.disk import run_disk_bench
from yalm_runner.bench.envelope import CompressedSyntheticStore
from yalm_runner.bench.link import measure_h2d, measure_ram_copy
from yalm_runner.bench.ours import try_ours
from yalm_runner.bench.peers import SYSTEM_LABELS, SYSTEMS, largest_fitting, run_peer
from yalm_runner.bench.synthetic import NO_EOS, SHAPES, SyntheticStore, estimate_workspace
from yalm_runner.bench.table import (
    BenchRow,
    compare_with_ours,
    format_disk,
    format_table,
    target_lines,
)
from yalm_runner.engine import Engine
from yalm_runner.errors import ConfigError, OffloadError
from yalm_runner.offload import OffloadPolicy, format_bytes, plan_placement
from yalm_runner.planning import MemoryPlan, plan_memory
from yalm_runner.quant import Quantization
from yalm_runner.steptime import StepRates
from yalm_runner.streaming import StreamingWeights, part_bytes_in

PEER_BATCHES = (1, 2, 4, 8, 16, 32, 64, 128, 256)


# What an option left unset means. Each of these changes only some runs; given to a run it
# would not change, it is refused (``check_options``) rather than silently ignored.
DEFAULTS = {
    "uncapped_batch": 32,
    "max_batch": 256,
    "kv_layout": "auto",
    "peer_timeout_s": 900.0,
    "disk_layers": 8,
    "disk_file_bytes": 4 * 2**30,
}


def planned_kv_widths(kv_bits: tuple[int, ...] | None, peers: tuple[str, ...]) -> tuple[int, ...]:
    """The KV widths of the planner's rows, widest first: those asked for; unasked, 16 bits
    beside the peers (the row the peers are compared with) and none otherwise."""
    if kv_bits is None:
        return (16,) if peers else ()
    return tuple(sorted(set(kv_bits), reverse=True))


def check_options(
    shape: str,
    gpu_memory: int | None,
    *,
    peers: tuple[str, ...],
    uncapped_peers: tuple[str, ...] | None,
    uncapped_batch: int | None,
    max_batch: int | None,
    kv_bits: tuple[int, ...] | None,
    kv_layout: str | None,
    peer_timeout_s: float | None,
    disk_dir: Path | None,
    disk_layers: int | None,
    disk_file_bytes: int | None,
    device: str = "cuda",
    kv_batches: tuple[int, ...] = (),
    quantization: Quantization | None = None,
) -> None:
    """Refuse, before anything runs, what the bench cannot do and any option (not None) that
    would change nothing in this run; the one-line error names the option."""
    if shape not in SHAPES:
        raise ConfigError(f"unknown shape {shape!r}; choose one of {sorted(SHAPES)}")
    if device not in ("cuda", "cpu"):
        raise ConfigError(f"--device is cuda or cpu, got {device!r}")
    uncapped = peers if uncapped_peers is None else uncapped_peers
    unknown = [name for name in (*peers, *uncapped) if name not in SYSTEMS]
    if unknown:
        raise ConfigError(f"unknown peers {unknown}; choose from {list(SYSTEMS)}")
    if peers and gpu_memory is None:
        raise ConfigError("--peers compares systems under a GPU budget: give --gpu-memory too")
    alone = (
        ("--peers", bool(peers or uncapped)),
        ("--disk", disk_dir is not None),
    )
    for flag, given in alone:
        if given and device == "cpu":
            raise ConfigError(f"{flag} needs CUDA: --device cpu runs ours alone")
        if given and quantization is not None:
            raise ConfigError(f"{flag} runs 16-bit weights: --quantize runs ours alone")
    if any(size < 1 for size in kv_batches):
        raise ConfigError(f"--kv-batches takes batch sizes >= 1, got {list(kv_batches)}")
    planned = bool(planned_kv_widths(kv_bits, peers))
    any_peers = bool(peers or uncapped)
    idle = (
        ("--kv-layout", kv_layout, planned, "--kv-bits or --peers"),
        ("--kv-batches", kv_batches or None, planned, "--kv-bits or --peers"),
        ("--max-batch", max_batch, planned or bool(peers), "--kv-bits or --peers"),
        ("--uncapped-batch", uncapped_batch, any_peers, "--peers or --uncapped-peers"),
        ("--peer-timeout", peer_timeout_s, any_peers, "--peers or --uncapped-peers"),
        ("--disk-layers", disk_layers, disk_dir is not None, "--disk"),
        ("--disk-file", disk_file_bytes, disk_dir is not None, "--disk"),
    )
    for flag, value, used, needs in idle:
        if value is not None and not used:
            raise ConfigError(f"{flag} does nothing without {needs}")


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _ours_within(store, peer: BenchRow, prompt_len, new_tokens, pinned_bps) -> list[BenchRow]:
    policy = OffloadPolicy(gpu_memory_bytes=peer.peak_gpu_bytes, kv_on="gpu")
    try:
        plan = plan_memory(
            store,
            torch.device("cuda"),
            torch.bfloat16,
            policy,
            batch_size=peer.batch,
            max_context=prompt_len + new_tokens,
            prompt_tokens=prompt_len,
        )
    except OffloadError as exc:
        _log(f"ours within {format_bytes(peer.peak_gpu_bytes)}: {exc}")
        return []
    _log(f"ours within the peer's {format_bytes(peer.peak_gpu_bytes)}: {plan.describe()}")
    with StreamingWeights(store, "cuda", torch.bfloat16, plan.placement, verify=False) as weights:
        row = try_ours(
            weights, peer.batch, prompt_len, new_tokens, policy, pinned_bps, plan,
            "ours, peer's memory",
        )  # fmt: skip
    torch.cuda.empty_cache()
    if row is None:
        return []
    row.cap_bytes = None  # compared with the uncapped peer whose peak it stayed under
    return [row]


def _weights_name(quantization: Quantization) -> str:
    if quantization.scheme == "int4":
        return f"int4 g{quantization.group_size}"
    return quantization.scheme


class _Predictions:
    """Our rows' predicted decode steps: the step-time model at rates calibrated in this run
    (the link measured with the table's; each plan's KV codec, row-major copy calls and
    matmuls at its rows and context).
    Nothing is predicted on a CPU: the model's rates are a GPU's."""

    def __init__(self, store, device, quantization, link_bps, prompt_len, new_tokens):
        self._store, self._device, self._quantization = store, device, quantization
        self._prompt_len, self._new_tokens = prompt_len, new_tokens
        self._base = StepRates(link_bytes_per_s=link_bps)
        self.rates_seen: list[dict] = []  # the calibrated rates of every predicted row

    def plan(self, plan: MemoryPlan) -> float | None:
        """The predicted step of ``plan`` (calibrated now, outside any GPU cap), or None."""
        if self._device != "cuda":
            return None
        config = self._store.config
        rates = calibrate(
            plan, config, "cuda", torch.bfloat16, quantization=self._quantization,
            base=self._base,
        )  # fmt: skip
        torch.cuda.empty_cache()
        self.rates_seen.append({"batch": plan.batch_size, **rates.to_dict()})
        return plan.predicted_step_s(rates)

    def streaming_row(self, row: BenchRow, base: OffloadPolicy) -> None:
        """Predict a ``--batch-sizes`` row: its KV cache on the GPU, every layer streamed."""
        try:
            plan = plan_memory(
                self._store, torch.device(self._device), torch.bfloat16,
                replace(base, kv_on="gpu", kv_bits=16), batch_size=row.batch,
                max_context=self._prompt_len + self._new_tokens, prompt_tokens=self._prompt_len,
            )  # fmt: skip
        except OffloadError:
            return  # the bench's own workspace estimate let it run where the planner would not
        self.note(row, self.plan(plan))

    @staticmethod
    def note(row: BenchRow, predicted: float | None) -> None:
        row.predicted_step_s = predicted
        if predicted:
            _log(
                f"  {row.system} B={row.batch}: step predicted {predicted * 1e3:.1f} ms, "
                f"measured {row.decode_step_s * 1e3:.1f} ms "
                f"({row.decode_step_s / predicted:.2f}x)"
            )


def _largest_planned_batch(store, policy, prompt_len, new_tokens, limit) -> int | None:
    """The largest batch of ``PEER_BATCHES`` (up to ``limit``) our planner places under
    ``policy``'s budgets, KV cache and prefill workspace included."""
    element = torch.empty((), dtype=torch.bfloat16).element_size()
    best = None
    for batch in (size for size in PEER_BATCHES if size <= limit):
        kv = batch * (prompt_len + new_tokens) * store.config.kv_bytes_per_token(element)
        workspace = estimate_workspace(store.config, batch, prompt_len, torch.bfloat16)
        try:
            plan_placement(part_bytes_in(store, torch.bfloat16), policy, kv, workspace)
        except OffloadError:
            break
        best = batch
    return best


def _peer_row(result, pinned_bps: float) -> BenchRow:
    step_s, streamed = result.decode_step_s, result.streamed_bytes_per_pass
    settings = json.dumps(result.settings, default=str) if result.settings else ""
    return BenchRow(
        SYSTEM_LABELS[result.system],
        result.batch,
        result.tokens_per_s,
        step_s,
        streamed / step_s / 1e9 if step_s else 0.0,
        (streamed / pinned_bps) / step_s if step_s else 0.0,
        result.peak_gpu_bytes,
        settings,
        result.cap_bytes,
    )


def run_bench(
    shape: str,
    batches: list[int],
    prompt_len: int,
    new_tokens: int,
    gpu_memory: int | None,
    cpu_memory: int | None,
    num_layers: int | None,
    json_path: Path | None,
    *,
    peers: tuple[str, ...] = (),
    uncapped_peers: tuple[str, ...] | None = None,
    uncapped_batch: int | None = None,
    max_batch: int | None = None,
    kv_bits: tuple[int, ...] | None = None,
    kv_layout: str | None = None,
    peer_timeout_s: float | None = None,
    disk_dir: Path | None = None,
    disk_layers: int | None = None,
    disk_file_bytes: int | None = None,
    device: str = "cuda",
    kv_batches: tuple[int, ...] = (),
    quantization: Quantization | None = None,
) -> list[BenchRow]:
    """Ours at each of ``batches`` (overlap on and off) under the budgets; at the planner's
    batch for each of ``kv_bits`` (KV in pinned RAM where the planner puts it there), and at
    each of ``kv_batches`` with the KV cache where the planner put it (one engine per width,
    its locked KV memory kept from the largest batch to the smaller ones); with
    ``peers``, also ours and each peer at its largest batch under ``gpu_memory`` and at
    ``uncapped_batch`` with no cap (every layer offloaded to the CPU in all three); with
    ``disk_dir``, the disk tier against the drive. Prints one table, whatever a peer did;
    writes everything to ``json_path`` too.

    An option left None takes its default (``DEFAULTS``); one given to a run it would not change
    is refused before anything runs (``check_options``)."""
    check_options(
        shape, gpu_memory, peers=peers, uncapped_peers=uncapped_peers,
        uncapped_batch=uncapped_batch, max_batch=max_batch, kv_bits=kv_bits,
        kv_layout=kv_layout, peer_timeout_s=peer_timeout_s, disk_dir=disk_dir,
        disk_layers=disk_layers, disk_file_bytes=disk_file_bytes, device=device,
        kv_batches=kv_batches, quantization=quantization,
    )  # fmt: skip
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError(
            "bench measures host-to-device streaming and needs a CUDA device (--device cpu: a "
            "smoke run of ours alone)"
        )
    cuda = device == "cuda"
    uncapped_peers = peers if uncapped_peers is None else uncapped_peers
    widths = planned_kv_widths(kv_bits, peers)
    uncapped_batch = DEFAULTS["uncapped_batch"] if uncapped_batch is None else uncapped_batch
    max_batch = DEFAULTS["max_batch"] if max_batch is None else max_batch
    kv_layout = DEFAULTS["kv_layout"] if kv_layout is None else kv_layout
    peer_timeout_s = DEFAULTS["peer_timeout_s"] if peer_timeout_s is None else peer_timeout_s
    disk_layers = DEFAULTS["disk_layers"] if disk_layers is None else disk_layers
    disk_file_bytes = DEFAULTS["disk_file_bytes"] if disk_file_bytes is None else disk_file_bytes
    config = SHAPES[shape]
    if num_layers:
        config = replace(config, num_layers=num_layers)
    if quantization is None:
        store = SyntheticStore(config, torch.bfloat16)
    else:
        store = CompressedSyntheticStore(config, quantization, torch.bfloat16)
    bandwidth = measure_h2d() if cuda else measure_ram_copy()
    pinned = bandwidth["pinned"]
    base = OffloadPolicy(gpu_memory_bytes=gpu_memory, cpu_memory_bytes=cpu_memory, weights_on="cpu")
    placement = plan_placement(part_bytes_in(store, torch.bfloat16), base)
    rows: list[BenchRow] = []
    predict = _Predictions(store, device, quantization, pinned, prompt_len, new_tokens)
    with StreamingWeights(store, device, torch.bfloat16, placement, verify=False) as weights:
        for batch in batches:
            for overlap in (True, False):
                row = try_ours(
                    weights, batch, prompt_len, new_tokens, replace(base, overlap=overlap), pinned
                )
                if row is None:
                    break
                if overlap:  # the model's pipeline is the overlapped one
                    predict.streaming_row(row, base)
                rows.append(row)
        if peers:
            capped = _largest_planned_batch(store, base, prompt_len, new_tokens, max_batch)
            if capped is not None and not any(
                row.batch == capped and row.system == "ours (streaming)" for row in rows
            ):
                row = try_ours(weights, capped, prompt_len, new_tokens, base, pinned)
                rows += [row] if row else []
        # The planner's batch at each KV width: the KV cache may go to pinned RAM,
        # so that many more rows share each weight transfer under the same GPU budget.
        for bits in widths:
            policy = replace(base, kv_on="auto", kv_bits=bits, kv_layout=kv_layout)
            try:
                plan = plan_memory(
                    store,
                    torch.device(device),
                    torch.bfloat16,
                    policy,
                    batch_size=None,
                    max_context=prompt_len + new_tokens,
                    prompt_tokens=prompt_len,
                    rows=max_batch,
                )
            except OffloadError as exc:
                _log(f"planned ({bits}-bit KV): {exc}")
                continue
            _log(f"planned ({bits}-bit KV): {plan.describe()}")
            label = "ours, KV in RAM" if bits == 16 else f"ours, {bits}-bit KV"
            label = label if plan.kv_on == "cpu" else "ours, planned"
            # The same KV placement at the smaller batches asked for, on the same engine.
            kept = bits if plan.kv_on == "cpu" else 16  # a cache on the device is 16-bit
            same = replace(policy, kv_on=plan.kv_on, kv_layout=plan.kv_layout, kv_bits=kept)
            engine = Engine(weights, eos_id=NO_EOS, kv_on=plan.kv_on, kv_bits=bits,
                            kv_layout=plan.kv_layout)  # fmt: skip
            for size in [None, *sorted(set(kv_batches) - {plan.batch_size}, reverse=True)]:
                if size is not None:
                    try:
                        plan = plan_memory(
                            store, torch.device(device), torch.bfloat16, same, batch_size=size,
                            max_context=prompt_len + new_tokens, prompt_tokens=prompt_len,
                        )  # fmt: skip
                    except OffloadError as exc:
                        _log(f"{label} B={size}: {exc}")
                        continue
                predicted = predict.plan(plan)
                row = try_ours(
                    weights, plan.batch_size, prompt_len, new_tokens, policy, pinned, plan, label,
                    engine,
                )  # fmt: skip
                if row is not None:
                    predict.note(row, predicted)
                    rows.append(row)
            del engine
        if peers:
            uncapped = replace(base, gpu_memory_bytes=None)
            row = try_ours(weights, uncapped_batch, prompt_len, new_tokens, uncapped, pinned)
            rows += [row] if row else []
    del weights  # its pinned copy of the model goes before the peers make theirs
    if cuda:
        torch.cuda.empty_cache()
    disk = None
    if disk_dir is not None:
        disk_config = replace(config, num_layers=min(disk_layers, config.num_layers))
        disk = run_disk_bench(disk_dir, disk_config, torch.bfloat16, "cuda", disk_file_bytes)
    peer_results = []
    if peers or uncapped_peers:
        layers_arg = num_layers or None
        element = torch.empty((), dtype=torch.bfloat16).element_size()
        for system in peers:
            candidates = [
                batch
                for batch in PEER_BATCHES
                if batch <= max_batch
                and batch * (prompt_len + new_tokens) * config.kv_bytes_per_token(element)
                + estimate_workspace(config, batch, prompt_len, torch.bfloat16)
                < gpu_memory
            ]
            best, tried = largest_fitting(
                system, shape, layers_arg, candidates, prompt_len, new_tokens, gpu_memory,
                peer_timeout_s, _log,
            )  # fmt: skip
            peer_results += tried
            rows += [_peer_row(best, pinned)] if best else []
        for system in uncapped_peers:
            result = run_peer(
                system, shape, layers_arg, uncapped_batch, prompt_len, new_tokens, None,
                peer_timeout_s,
            )  # fmt: skip
            peer_results.append(result)
            if result.ok:
                rows.append(_peer_row(result, pinned))
            else:
                _log(f"{system} uncapped B={uncapped_batch}: {result.error}")
        zero = [r for r in rows if r.system.startswith("DeepSpeed") and r.cap_bytes is None]
        if zero:  # ours given the GPU memory ZeRO took: layers that fit stay resident
            rows += _ours_within(store, zero[0], prompt_len, new_tokens, pinned)
    compare_with_ours(rows)
    print(
        f"shape {shape}: {config.num_layers} layers x hidden {config.hidden_size}, "
        f"{config.param_count() / 1e9:.1f} B params; prompt {prompt_len}, {new_tokens} new tokens"
    )
    link = "measured host-to-device" if cuda else "CPU run, RAM copies for the link"
    weights_kind = "16-bit weights" if quantization is None else _weights_name(quantization)
    print(
        f"{link}: pinned {pinned / 1e9:.1f} GB/s, "
        f"pageable {bandwidth['pageable'] / 1e9:.1f} GB/s; GPU budget "
        f"{format_bytes(gpu_memory) if gpu_memory else 'none'}; {weights_kind}"
    )
    print(format_table(rows))
    if peers or uncapped_peers:
        print("\n".join(target_lines(rows)))
    if disk is not None:
        print(format_disk(disk))
    if json_path is not None:
        json_path.write_text(
            json.dumps(
                {
                    "shape": shape,
                    "device": device,
                    "weights": "bf16" if quantization is None else _weights_name(quantization),
                    "config": config.to_dict(),
                    "prompt_len": prompt_len,
                    "new_tokens": new_tokens,
                    "gpu_memory": gpu_memory,
                    "cpu_memory": cpu_memory,
                    "bandwidth_bytes_per_s": bandwidth,
                    "rows": [row.__dict__ for row in rows],
                    "peer_attempts": [result.__dict__ for result in peer_results],
                    "targets": target_lines(rows) if peers or uncapped_peers else [],
                    "disk": disk,
                    "rates": predict.rates_seen,
                },
                indent=1,
            )
        )
    return rows
