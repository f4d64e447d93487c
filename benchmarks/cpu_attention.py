"""Can the host's cores attend over a RAM-resident KV cache as fast as a layer's weights arrive?

Issue 17's first lever: FlexGen keeps the KV cache in host RAM and computes decode attention on
the CPU, so that only a step's new q/k/v and the attention output cross the link, never the
cache. For YaLM-100B's envelope (64 rows, 128 heads of 80, contexts of ~100-256 positions, 4-bit
records) that removes ~11 GB a step from the link, if the cores keep up with the ~12 ms in which
one int4 layer's 0.67 GB of weights arrive at ~55 GB/s; and they must do it while the DMA engine
reads those weights out of the same RAM.

``--kernel-only`` times just ``hostattn``'s compiled kernel (8 and 4 bits, the records as
the engine keeps them), which the engine's ``--kv-attention host`` runs.

This script measures exactly that, per layer, in one run: the time the weights of one layer take
over the pinned link (measured now), and the CPU time of one decode step's attention for one
layer over the batch's cache kept in 16 bits, and in 4-bit records (``kvformat``) expanded first,
each alone and again while pinned host-to-device copies run flat out on a CUDA stream. No
engine code is involved: it answers whether the lever can work before anyone builds it.

    python benchmarks/cpu_attention.py [--rows 64] [--contexts 128,256] [--threads N]
"""

from __future__ import annotations

import argparse
import os
import time

import torch

from yalm_runner import hostattn
from yalm_runner.bench.link import BackgroundCopies
from yalm_runner.kvformat import decode_kv, encode_kv

LAYER_INT4_BYTES = 53.50e9 / 80  # one YaLM-100B layer, int4 g128 (the envelope's 53.5 GB / 80)


def _median_s(work, repeats: int = 5) -> float:
    work()  # warm-up
    times = []
    for _ in range(repeats):
        began = time.perf_counter()
        work()
        times.append(time.perf_counter() - began)
    return sorted(times)[len(times) // 2]


def link_bytes_per_s(size: int = 1 << 30) -> float:
    source = torch.empty(size, dtype=torch.uint8).pin_memory()
    target = torch.empty(size, dtype=torch.uint8, device="cuda")

    def copy() -> None:
        target.copy_(source, non_blocking=True)
        torch.cuda.synchronize()

    return size / _median_s(copy)


def kernel_work(rows: int, heads: int, head_dim: int, context: int, bits: int, threads: int):
    """The same attention through ``hostattn``'s compiled kernel, over the records as the
    engine keeps them (row-major, bf16 scales), never expanded."""
    shape = (rows, context, heads, head_dim)
    keys, values = (encode_kv(torch.randn(shape).to(torch.bfloat16), bits) for _ in range(2))
    step = [torch.randn(rows, heads, head_dim) for _ in range(3)]
    valid = torch.ones(rows, context, dtype=torch.bool)

    def work() -> None:
        hostattn.attend(keys, values, bits, torch.bfloat16, *step, valid, threads=threads)

    return work, keys.numel() * 2


def attention_work(rows: int, heads: int, head_dim: int, context: int, bits: int, dtype):
    """One layer's decode attention over ``context`` cached positions, on the CPU."""
    shape = (rows, heads, context, head_dim)
    keys = torch.randn(shape, dtype=torch.float32).to(dtype)
    values = torch.randn(shape, dtype=torch.float32).to(dtype)
    query = torch.randn((rows, heads, 1, head_dim), dtype=torch.float32).to(dtype)
    if bits == 16:

        def work() -> None:
            torch.nn.functional.scaled_dot_product_attention(query, keys, values)

        return work, keys.numel() * keys.element_size() * 2
    key_records, value_records = encode_kv(keys, bits), encode_kv(values, bits)
    expanded_keys, expanded_values = torch.empty_like(keys), torch.empty_like(values)

    def work() -> None:
        decode_kv(key_records, bits, expanded_keys)
        decode_kv(value_records, bits, expanded_values)
        torch.nn.functional.scaled_dot_product_attention(query, expanded_keys, expanded_values)

    return work, key_records.numel() * 2


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--heads", type=int, default=128)
    parser.add_argument("--head-dim", type=int, default=80)
    parser.add_argument("--contexts", default="128,256")
    parser.add_argument(
        "--threads", default=str(os.cpu_count()),
        help="comma-separated thread counts; the kernel runs at each, torch at the first",
    )  # fmt: skip
    parser.add_argument(
        "--kernel-only", action="store_true", help="only hostattn's compiled kernel"
    )
    args = parser.parse_args()
    counts = [int(t) for t in args.threads.split(",")]
    torch.set_num_threads(counts[0])
    cuda = torch.cuda.is_available()
    link = link_bytes_per_s() if cuda else 25e9
    layer_s = LAYER_INT4_BYTES / link
    print(
        f"{os.cpu_count()} cores; link {'measured' if cuda else 'assumed'} {link / 1e9:.1f} "
        f"GB/s; one int4 layer of YaLM-100B arrives in {layer_s * 1e3:.1f} ms",
        flush=True,
    )
    if hostattn.available():
        print(f"kernel: {hostattn.build_description()}", flush=True)
    print(
        "| KV kept as | compute | context | threads | cache MB/layer | alone ms | G el/s "
        "| with DMA ms | G el/s | / layer time |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    cases = [(16, torch.bfloat16), (16, torch.float32), (4, torch.bfloat16), (4, torch.float32)]
    cases = [] if args.kernel_only else [(bits, dtype, "torch", counts[0]) for bits, dtype in cases]
    if hostattn.available():
        cases += [(bits, torch.float32, "kernel", n) for bits in (8, 4) for n in counts]
    else:
        print(f"(no compiled kernel: {hostattn.unavailable_reason()})")
    for context in (int(c) for c in args.contexts.split(",")):
        for bits, dtype, how, threads in cases:
            if how == "kernel":
                work, nbytes = kernel_work(
                    args.rows, args.heads, args.head_dim, context, bits, threads
                )
            else:
                work, nbytes = attention_work(
                    args.rows, args.heads, args.head_dim, context, bits, dtype
                )
            # Every cached element is read once: keys and values, rows x context x heads x dim.
            elements = 2 * args.rows * context * args.heads * args.head_dim
            alone = _median_s(work)
            busy = float("nan")
            if cuda:
                with BackgroundCopies() as copies:
                    busy = _median_s(work)
                dma = f" (DMA {copies.bytes_per_s / 1e9:.0f} GB/s)"
            else:
                dma = ""
            worst = busy if cuda else alone
            compute = str(dtype).removeprefix("torch.") + (" (kernel)" if how == "kernel" else "")
            print(
                f"| {bits}-bit | {compute} | {context} | {threads} | {nbytes / 1e6:.0f} | "
                f"{alone * 1e3:.1f} | {elements / alone / 1e9:.1f} | {busy * 1e3:.1f}{dma} | "
                f"{elements / busy / 1e9:.1f} | {worst / layer_s:.2f}x |",
                flush=True,
            )


if __name__ == "__main__":
    main()
