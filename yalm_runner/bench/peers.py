"""The peers of ``yalm-runner bench``: the same workload through HF Accelerate offload and
DeepSpeed ZeRO-Inference (ZeRO stage 3 with parameters offloaded to pinned CPU memory).

The peers run YaLM's math from ``model``, unchanged, inside plain ``nn.Module`` wrappers that
hold ``nn.Parameter``s, so each library sees an ordinary PyTorch model with the same bytes per
layer as ours: one module per transformer layer whose tensors are its *direct* parameters (ZeRO-3
gathers a module's direct parameters at its forward; Accelerate's hooks move a whole module),
and one module for the embedding and the head, which share the tied word embedding. The KV
cache is a preallocated (B, S, NH, D) pair per layer on the GPU, as in our engine; decoding is
greedy over prompts of one length.

Each system runs in its own process (``python -m yalm_runner.bench.peers``, driven by
``run_peer``) so that one library's hooks, pinned buffers and allocator state never colour
another's figures; the child prints one JSON object as its last line. Each child runs in its own
process group, and a peer's time limit covers its whole batch search: past it the group is killed
(the library's helper processes too) and the search stops, so the bench always reaches its
table. A GPU cap is enforced with
the allocator's per-process memory fraction, so exceeding it is an out-of-memory error, reported
as "does not fit"; the peak allocated memory is read back. accelerate and deepspeed are optional
(extras ``gpu`` and ``deepspeed``) and imported inside the functions that use them. This module
knows nothing of our streaming engine beyond the shapes and the synthetic weights it shares.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any

import torch
from torch import nn

from yalm_runner import model
from yalm_runner.bench.synthetic import SHAPES, SyntheticStore, estimate_workspace
from yalm_runner.config import ModelConfig
from yalm_runner.model import EMBEDDING_KEYS, HEAD_KEYS, PROJECTOR_KEYS, expected_shapes, layer_keys

SYSTEMS = ("accelerate", "zero")
SYSTEM_LABELS = {"accelerate": "HF Accelerate", "zero": "DeepSpeed ZeRO-3"}
# Room left under a cap for the CUDA libraries' own workspaces and allocator rounding.
CAP_MARGIN_BYTES = 256 * 2**20

PartSource = Callable[[str], dict[str, torch.Tensor]]


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _attr(name: str) -> str:
    """A release tensor name as a parameter attribute (``nn.Module`` names may not hold dots)."""
    return name.replace(".", "__")


def _parameter(tensor: torch.Tensor, dtype: torch.dtype) -> nn.Parameter:
    return nn.Parameter(tensor.to(dtype), requires_grad=False)


class PeerLayer(nn.Module):
    """One transformer layer: its tensors as direct parameters, ``model.block`` as forward."""

    def __init__(self, config: ModelConfig, layer_idx: int, tensors: model.Weights, dtype):
        super().__init__()
        self.config = config
        self.names = layer_keys(layer_idx)
        for name in self.names:
            self.register_parameter(_attr(name), _parameter(tensors[name], dtype))
        self.rotary: model.Rotary | None = None  # set once the execution device is known

    def weights(self) -> dict[str, torch.Tensor]:
        return {name: getattr(self, _attr(name)) for name in self.names}

    def forward(self, h, positions, keys, values, start: int, mask):
        return model.block(
            h, self.weights(), self.config, self.rotary, positions, keys, values, start, mask
        )


class PeerEnds(nn.Module):
    """Embedding and head in one module: the head's output matrix is the tied word embedding."""

    def __init__(self, config: ModelConfig, embedding: model.Weights, head: model.Weights, dtype):
        super().__init__()
        self.config = config
        for name in (*EMBEDDING_KEYS, *PROJECTOR_KEYS):
            self.register_parameter("embedding__" + _attr(name), _parameter(embedding[name], dtype))
        for name in HEAD_KEYS:
            self.register_parameter("head__" + _attr(name), _parameter(head[name], dtype))

    def _weights(self, prefix: str, names: Sequence[str]) -> dict[str, torch.Tensor]:
        return {name: getattr(self, prefix + _attr(name)) for name in names}

    def forward(self, x: torch.Tensor, *, head: bool = False) -> torch.Tensor:
        embedding = self._weights("embedding__", (*EMBEDDING_KEYS, *PROJECTOR_KEYS))
        if not head:
            return model.embed(x, embedding, self.config)  # (B, T) ids -> (B, T, H)
        return model.head(
            x, self._weights("head__", HEAD_KEYS), embedding["word_embeddings.weight"], self.config
        )


class PeerStack(nn.Module):
    """The transformer layers in order; one call is one pass over all of them."""

    def __init__(self, layers: list[PeerLayer]):
        super().__init__()
        self.layers = nn.ModuleList(layers)

    def forward(self, h, positions, start: int, mask, caches):
        for layer, (keys, values) in zip(self.layers, caches, strict=True):
            h = layer(h, positions, keys, values, start, mask)
        return h


class PeerModel(nn.Module):
    """Ends + stack; ``forward`` returns the fp32 logits of each row's last position."""

    def __init__(self, config: ModelConfig, ends: PeerEnds, stack: PeerStack):
        super().__init__()
        self.config = config
        self.ends = ends
        self.stack = stack

    def set_rotary(self, device: torch.device, dtype: torch.dtype) -> None:
        rotary = model.Rotary.build(self.config, device, dtype)
        for layer in self.stack.layers:
            layer.rotary = rotary

    def forward(self, tokens, positions, start: int, mask, caches):
        h = self.ends(tokens)
        h = self.stack(h, positions, start, mask, caches)
        return self.ends(h[:, -1], head=True)


def build_ends(config: ModelConfig, parts: PartSource, dtype: torch.dtype) -> PeerEnds:
    return PeerEnds(config, parts("embedding"), parts("head"), dtype)


def build_stack(config: ModelConfig, parts: PartSource, dtype: torch.dtype) -> PeerStack:
    return PeerStack(
        [
            PeerLayer(config, layer_idx, parts(f"layer_{layer_idx}"), dtype)
            for layer_idx in range(config.num_layers)
        ]
    )


@dataclass
class GreedyRun:
    ids: torch.Tensor  # (B, new_tokens)
    last_logits: torch.Tensor  # (B, V) fp32, the logits that chose the last token
    prefill_s: float
    decode_s: float
    passes: int


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def generate_greedy(
    peer: PeerModel,
    tokens: torch.Tensor,
    new_tokens: int,
    device: torch.device,
    dtype: torch.dtype,
) -> GreedyRun:
    """Greedy decoding of ``tokens`` (B, T), all rows one length, with a GPU-resident KV cache.

    Masks and positions are built as our engine builds them for unpadded rows, so the two give
    the same ids. ``torch.no_grad`` rather than inference mode: ZeRO-3 rewrites parameters'
    storage in place between calls, which inference tensors forbid.
    """
    config = peer.config
    batch, prompt_len = tokens.shape
    slots = prompt_len + new_tokens
    shape = (batch, slots, config.num_heads, config.head_dim)
    caches = [
        (
            torch.empty(shape, device=device, dtype=dtype),
            torch.zeros(shape, device=device, dtype=dtype),
        )
        for _ in range(config.num_layers)
    ]
    key_valid = torch.zeros((batch, slots), dtype=torch.bool, device=device)
    generated = []

    def forward(step_tokens: torch.Tensor, start: int) -> torch.Tensor:
        end = start + step_tokens.shape[1]
        key_valid[:, start:end] = True
        positions = torch.arange(start, end, device=device)[None, :].expand(batch, -1)  # (B, T)
        mask = model.attention_mask(key_valid[:, :end], start, end - start)
        return peer(step_tokens, positions, start, mask, caches)

    _synchronize(device)
    began = time.perf_counter()
    logits = forward(tokens.to(device), 0)
    _synchronize(device)
    prefill_s = time.perf_counter() - began
    began = time.perf_counter()
    for step in range(new_tokens):
        next_ids = logits.argmax(dim=-1)  # (B,)
        generated.append(next_ids)
        if step + 1 < new_tokens:
            logits = forward(next_ids[:, None], prompt_len + step)
    _synchronize(device)
    return GreedyRun(
        torch.stack(generated, dim=1).cpu(),
        logits.float().cpu(),
        prefill_s,
        time.perf_counter() - began,
        new_tokens,
    )


def bench_prompts(batch: int, prompt_len: int, vocab_size: int) -> torch.Tensor:
    """The bench's prompts: BOS then a deterministic spread of ids (as ``bench.ours.run_ours``)."""
    rows = [
        [1]
        + [(row * 7 + pos) % min(50000, vocab_size - 300) + 300 for pos in range(prompt_len - 1)]
        for row in range(batch)
    ]
    return torch.tensor(rows, dtype=torch.long)


# -- the two systems ---------------------------------------------------------------------------


def _numel(shape: tuple[int, ...]) -> int:
    count = 1
    for size in shape:
        count *= size
    return count


def part_bytes(config: ModelConfig, part: str, element_bytes: int) -> int:
    return sum(_numel(shape) for shape in expected_shapes(config, part).values()) * element_bytes


def dispatch_accelerate(
    peer: PeerModel, device: torch.device, weights_budget: int | None
) -> tuple[PeerModel, dict[str, Any]]:
    """Hand ``peer`` (on the CPU) to Accelerate.

    On a GPU: ``infer_auto_device_map`` under ``max_memory`` = ``weights_budget`` for the GPU
    (None: the ends alone, every layer offloaded), then ``dispatch_model``: layers mapped to
    ``cpu`` are moved to the GPU by hooks at each forward. On the CPU (tests) ``cpu_offload``
    runs the same hook machinery with the CPU as execution device.
    """
    import accelerate

    config = peer.config
    if device.type != "cuda":
        accelerate.cpu_offload(peer, execution_device=device)
        return peer, {"device_map": "cpu_offload"}
    if weights_budget is None:
        device_map: dict[str, Any] = {"ends": device.index or 0}
        device_map.update({f"stack.layers.{idx}": "cpu" for idx in range(config.num_layers)})
        max_memory = None
    else:
        max_memory = {device.index or 0: weights_budget, "cpu": 2**50}
        device_map = accelerate.infer_auto_device_map(
            peer, max_memory=max_memory, no_split_module_classes=["PeerLayer", "PeerEnds"]
        )
    gpu = device.index or 0
    if _placed(device_map, "ends") != gpu:
        raise MemoryError(f"the embedding and head do not fit the GPU budget: {device_map}")
    peer = accelerate.dispatch_model(peer, device_map=device_map)
    on_cpu = [
        idx
        for idx in range(config.num_layers)
        if _placed(device_map, f"stack.layers.{idx}") in ("cpu", "disk")
    ]
    return peer, {"max_memory": max_memory, "layers_on_cpu": on_cpu}


def _placed(device_map: dict[str, Any], name: str) -> Any:
    """Where ``device_map`` puts module ``name`` (its own entry or its nearest parent's)."""
    while True:
        if name in device_map:
            return device_map[name]
        if not name:
            raise KeyError(f"module {name!r} is not in the device map")
        name = name.rsplit(".", 1)[0] if "." in name else ""


def zero_config(
    config: ModelConfig, element_bytes: int, live_budget_bytes: int | None
) -> dict[str, Any]:
    """ZeRO stage 3, parameters offloaded to pinned CPU memory.

    Capped: at most two layers' parameters live on the GPU (fewer if the budget says so) and a
    prefetch bucket of one layer; uncapped: generous live and prefetch limits for speed. Biases
    and LayerNorm vectors (< 10 x hidden elements) stay on the GPU in both.
    """
    layer_numel = config.layer_param_count(1)
    if live_budget_bytes is None:
        live, prefetch = 3_000_000_000, 2 * layer_numel
    else:
        # Half the budget: ZeRO's limit governs prefetching, and the layer being computed and
        # the allocator's rounding come on top of it.
        live = max(layer_numel, min(2 * layer_numel, live_budget_bytes // 2 // element_bytes))
        prefetch = min(layer_numel, live // 2)
    return {
        "train_micro_batch_size_per_gpu": 1,
        "bf16": {"enabled": True},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
        "zero_optimization": {
            "stage": 3,
            "offload_param": {"device": "cpu", "pin_memory": True},
            "stage3_max_live_parameters": int(live),
            "stage3_max_reuse_distance": int(live),
            "stage3_prefetch_bucket_size": int(prefetch),
            "stage3_param_persistence_threshold": 10 * config.hidden_size,
        },
    }


def _distributed_env() -> None:
    """The variables ``torch.distributed`` reads, for a world of one process."""
    if "MASTER_PORT" not in os.environ:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            os.environ["MASTER_PORT"] = str(probe.getsockname()[1])
    for name, value in (("MASTER_ADDR", "127.0.0.1"), ("RANK", "0"), ("WORLD_SIZE", "1")):
        os.environ.setdefault(name, value)
    os.environ.setdefault("LOCAL_RANK", "0")


def build_zero(
    config: ModelConfig, parts: PartSource, dtype: torch.dtype, ds_config: dict[str, Any]
) -> PeerModel:
    """Ends on the GPU as ours keep them; the layers built under ``zero.Init`` (each partitioned
    to pinned CPU memory as soon as it exists, so the whole model is never on the GPU) and handed
    to ``deepspeed.initialize``, which adds the hooks that fetch a layer at its forward."""
    import deepspeed

    _distributed_env()
    deepspeed.init_distributed(dist_backend="nccl", verbose=False)
    ends = build_ends(config, parts, dtype).to("cuda")
    with deepspeed.zero.Init(
        config_dict_or_path=ds_config, remote_device="cpu", pin_memory=True, dtype=dtype
    ):
        stack = build_stack(config, parts, dtype)
    engine, *_ = deepspeed.initialize(model=stack, config=ds_config)
    engine.module.eval()
    return PeerModel(config, ends, engine.module)


@dataclass
class PeerResult:
    system: str
    batch: int
    cap_bytes: int | None
    ok: bool
    error: str = ""
    tokens_per_s: float = 0.0
    decode_step_s: float = 0.0
    prefill_s: float = 0.0
    streamed_bytes_per_pass: int = 0
    peak_gpu_bytes: int = 0
    settings: dict[str, Any] | None = None


def run_system(
    system: str,
    config: ModelConfig,
    batch: int,
    prompt_len: int,
    new_tokens: int,
    cap_bytes: int | None,
) -> PeerResult:
    """Build ``system``'s model of ``config`` (random bf16 weights), run one warm-up and one
    timed greedy generation at ``batch`` under ``cap_bytes`` of GPU memory (None: no cap)."""
    device, dtype = torch.device("cuda", 0), torch.bfloat16
    element = torch.empty((), dtype=dtype).element_size()
    torch.cuda.set_device(device)
    kv = batch * (prompt_len + new_tokens) * config.kv_bytes_per_token(element)
    workspace = estimate_workspace(config, batch, prompt_len, dtype)
    ends = part_bytes(config, "embedding", element) + part_bytes(config, "head", element)
    result = PeerResult(system, batch, cap_bytes, ok=False)
    headroom = None
    if cap_bytes is not None:
        headroom = cap_bytes - kv - workspace - CAP_MARGIN_BYTES
        if headroom < ends:
            result.error = (
                f"KV {kv / 2**30:.2f} GiB + workspace {workspace / 2**30:.2f} GiB + ends "
                f"{ends / 2**30:.2f} GiB exceed the cap"
            )
            return result
    store = SyntheticStore(config, dtype)
    layer_bytes = [part_bytes(config, f"layer_{idx}", element) for idx in range(config.num_layers)]
    try:
        if system == "accelerate":
            peer = PeerModel(
                config,
                build_ends(config, store.read_part, dtype),
                build_stack(config, store.read_part, dtype),
            )
            peer, settings = dispatch_accelerate(peer, device, headroom)
            streamed = sum(layer_bytes[idx] for idx in settings["layers_on_cpu"])
        elif system == "zero":
            ds_config = zero_config(config, element, None if headroom is None else headroom - ends)
            peer = build_zero(config, store.read_part, dtype, ds_config)
            settings = {"zero_optimization": ds_config["zero_optimization"]}
            threshold = ds_config["zero_optimization"]["stage3_param_persistence_threshold"]
            streamed = sum(
                _numel(shape) * element
                for idx in range(config.num_layers)
                for shape in expected_shapes(config, f"layer_{idx}").values()
                if _numel(shape) >= threshold
            )
        else:
            raise ValueError(f"unknown system {system!r}; choose one of {SYSTEMS}")
        peer.eval()
        peer.set_rotary(device, dtype)
        # The cap binds the run, not the build (whose transient copies of random weights are
        # the bench's, not the system's): resident weights are allocated and count in the peak.
        torch.cuda.empty_cache()
        if cap_bytes is not None:
            total = torch.cuda.get_device_properties(device).total_memory
            torch.cuda.set_per_process_memory_fraction(min(1.0, cap_bytes / total), device)
        _log(f"{system} B={batch}: built ({streamed / 2**30:.2f} GiB offloaded per pass)")
        generate_greedy(
            peer, bench_prompts(1, min(prompt_len, 8), config.vocab_size), 2, device, dtype
        )
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        run = generate_greedy(
            peer, bench_prompts(batch, prompt_len, config.vocab_size), new_tokens, device, dtype
        )
    except torch.OutOfMemoryError as exc:
        result.error = "out of GPU memory: " + str(exc).split("\n")[0][:300]
        result.peak_gpu_bytes = torch.cuda.max_memory_allocated(device)
        return result
    except MemoryError as exc:
        result.error = str(exc)
        return result
    decode_steps = max(run.passes - 1, 1)
    return replace(
        result,
        ok=True,
        tokens_per_s=batch * new_tokens / (run.prefill_s + run.decode_s),
        decode_step_s=run.decode_s / decode_steps,
        prefill_s=run.prefill_s,
        streamed_bytes_per_pass=streamed,
        peak_gpu_bytes=torch.cuda.max_memory_allocated(device),
        settings=settings,
    )


# -- the parent's side: one child process per run ----------------------------------------------


def run_peer(
    system: str,
    shape: str,
    num_layers: int | None,
    batch: int,
    prompt_len: int,
    new_tokens: int,
    cap_bytes: int | None,
    timeout_s: float,
) -> PeerResult:
    """Run ``system`` in a child process; its stderr passes through, its last stdout line is
    the result. A crash, a timeout or a missing library comes back as a failed result."""
    command = [
        sys.executable, "-m", "yalm_runner.bench.peers", "--system", system, "--shape", shape,
        "--batch", str(batch), "--prompt-len", str(prompt_len), "-n", str(new_tokens),
        "--cap-bytes", str(cap_bytes or 0),
    ]  # fmt: skip
    if num_layers:
        command += ["--layers", str(num_layers)]
    failed = PeerResult(system, batch, cap_bytes, ok=False)
    try:
        # Every peer alike: expandable segments, so fragmentation does not pass for a full cap.
        env = {"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True", **os.environ}
        returncode, stdout = run_child(command, timeout_s, env)
    except subprocess.TimeoutExpired:
        return replace(failed, error=f"timed out after {timeout_s:.0f} s")
    lines = stdout.strip().splitlines()
    try:
        return PeerResult(**json.loads(lines[-1]))
    except (IndexError, json.JSONDecodeError, TypeError):
        return replace(failed, error=f"child exited {returncode} without a result")


def run_child(command: list[str], timeout_s: float, env: dict[str, str]) -> tuple[int, str]:
    """Run ``command`` in a process group of its own and return its exit status and stdout (its
    stderr passes through). Past ``timeout_s``, or if the parent is interrupted, the whole group
    is killed and the exception raised (``subprocess.TimeoutExpired`` for the time limit); when
    the child ends, helpers it left in the group are killed too, so none keeps GPU memory."""
    with subprocess.Popen(
        command, stdout=subprocess.PIPE, text=True, env=env, start_new_session=True
    ) as child:
        try:
            stdout, _ = child.communicate(timeout=timeout_s)
        finally:
            _kill_group(child.pid)
    return child.returncode, stdout


def _kill_group(group: int) -> None:
    # ProcessLookupError: every process of the group has already exited.
    with contextlib.suppress(ProcessLookupError):
        os.killpg(group, signal.SIGKILL)


def largest_fitting(
    system: str,
    shape: str,
    num_layers: int | None,
    candidates: list[int],
    prompt_len: int,
    new_tokens: int,
    cap_bytes: int,
    timeout_s: float,
    log: Callable[[str], None],
    clock: Callable[[], float] = time.monotonic,
) -> tuple[PeerResult | None, list[PeerResult]]:
    """Try ``candidates`` from the largest down; the first that runs under the cap wins. The
    whole search has ``timeout_s`` seconds: each run gets what is left of them, and none starts
    once they are spent."""
    tried: list[PeerResult] = []
    deadline_s = clock() + timeout_s
    ordered = sorted(candidates, reverse=True)
    for position, batch in enumerate(ordered):
        left_s = deadline_s - clock()
        if left_s <= 0:
            rest = ", ".join(str(size) for size in ordered[position:])
            log(
                f"{SYSTEM_LABELS[system]}: its {timeout_s:.0f} s under the cap are spent; "
                f"B={rest} not tried"
            )
            break
        result = run_peer(
            system, shape, num_layers, batch, prompt_len, new_tokens, cap_bytes, left_s
        )
        tried.append(result)
        if result.ok and result.peak_gpu_bytes <= cap_bytes:
            return result, tried
        log(f"{SYSTEM_LABELS[system]} B={batch} under the cap: {result.error or 'over the cap'}")
    return None, tried


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="one peer run of yalm-runner bench (a child)")
    parser.add_argument("--system", choices=SYSTEMS, required=True)
    parser.add_argument("--shape", choices=sorted(SHAPES), required=True)
    parser.add_argument("--layers", type=int)
    parser.add_argument("--batch", type=int, required=True)
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("-n", "--max-new-tokens", type=int, default=32)
    parser.add_argument("--cap-bytes", type=int, default=0, help="0: no cap")
    args = parser.parse_args(argv)
    config = SHAPES[args.shape]
    if args.layers:
        config = replace(config, num_layers=args.layers)
    began = time.perf_counter()
    result = run_system(
        args.system,
        config,
        args.batch,
        args.prompt_len,
        args.max_new_tokens,
        args.cap_bytes or None,
    )
    outcome = (
        f"{result.tokens_per_s:.1f} tok/s, {result.decode_step_s * 1e3:.0f} ms/step, peak "
        f"{result.peak_gpu_bytes / 2**30:.2f} GiB"
        if result.ok
        else result.error
    )
    _log(
        f"{SYSTEM_LABELS[args.system]} B={args.batch}: {outcome} "
        f"({time.perf_counter() - began:.0f} s)"
    )
    print(json.dumps(asdict(result)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
