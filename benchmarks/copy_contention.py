"""Does a small transfer between pinned RAM and the GPU wait for a layer's copy in flight?

Attention on the host moves, at every layer of a decode step, the step's q/k/v (fp32) and the
new slot's records to pinned RAM and the attention's output (~2.6 MB at the envelope's 64
rows) back, while the next layer's weights (~670 MB of int4) stream host-to-device on the
copy stream. If the copy engines serve copies in the order they were queued, the output waits
for the whole layer to arrive, and the step runs at the link's time plus the layer's compute
instead of the link's time alone. This times each small transfer alone and 2 ms after a
layer's copy began on another stream, done by a copy and by a kernel that reads or writes the
pinned memory itself (``kernels.move_pinned``), and the layer copy's rate beside each.

    python benchmarks/copy_contention.py [--rows 64] [--repeats 5]
"""

from __future__ import annotations

import argparse
import time

import torch

from yalm_runner.kernels import move_pinned
from yalm_runner.pinned import pinned_empty

HIDDEN = 10240  # YaLM-100B
LAYER_BYTES = 669_000_000  # one int4 (g128) layer of YaLM-100B


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    device = torch.device("cuda")
    layer_host = pinned_empty(LAYER_BYTES, torch.uint8, pin=True, what="a layer")
    layer_device = torch.empty(LAYER_BYTES, dtype=torch.uint8, device=device)
    # Host to device: the attention's output (fp32 on the host, bf16 on the device).
    out_host = pinned_empty(args.rows * HIDDEN * 4, torch.uint8, pin=True, what="output")
    out_host = out_host.view(torch.float32)
    out_host.normal_()
    out_device = torch.empty(args.rows * HIDDEN, dtype=torch.bfloat16, device=device)
    # Device to host: q/k/v (bf16 on the device, fp32 on the host).
    qkv_device = torch.randn(3 * args.rows * HIDDEN, dtype=torch.bfloat16, device=device)
    qkv_host = pinned_empty(3 * args.rows * HIDDEN * 4, torch.uint8, pin=True, what="q/k/v")
    qkv_host = qkv_host.view(torch.float32)
    copy_stream = torch.cuda.Stream(device)
    compute = torch.cuda.current_stream(device)

    def to_device_by_copy() -> None:
        out_device.copy_(out_host.to(device, non_blocking=True))

    def to_device_by_kernel() -> None:
        move_pinned(out_host, out_device)

    def to_host_by_copy() -> None:
        qkv_host.copy_(qkv_device.float(), non_blocking=True)

    def to_host_by_kernel() -> None:
        move_pinned(qkv_device, qkv_host)

    transfers = {
        f"output to the device ({out_host.numel() * 4 / 1e6:.1f} MB fp32), copy": to_device_by_copy,
        "output to the device, kernel": to_device_by_kernel,
        f"q/k/v to the host ({qkv_host.numel() * 4 / 1e6:.1f} MB fp32), copy": to_host_by_copy,
        "q/k/v to the host, kernel": to_host_by_kernel,
    }
    for transfer in transfers.values():  # build the kernels, warm the copies
        transfer()
    torch.cuda.synchronize()
    assert torch.equal(out_device, out_host.to(device).bfloat16()), "the kernel moved other bits"
    assert torch.equal(qkv_host, qkv_device.float().cpu()), "the kernel moved other bits"

    def timed(transfer, beside_layer: bool) -> tuple[float, float]:
        """The transfer's ms (queued to done, on the device), and the layer copy's GB/s."""
        began, ended = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        layer_began = torch.cuda.Event(enable_timing=True)
        layer_ended = torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        if beside_layer:
            with torch.cuda.stream(copy_stream):
                layer_began.record(copy_stream)
                layer_device.copy_(layer_host, non_blocking=True)
                layer_ended.record(copy_stream)
            time.sleep(0.002)
        began.record(compute)
        transfer()
        ended.record(compute)
        torch.cuda.synchronize()
        rate = LAYER_BYTES / layer_began.elapsed_time(layer_ended) * 1e-6 if beside_layer else 0
        return began.elapsed_time(ended), rate

    print(f"{args.rows} rows; a layer copy is {LAYER_BYTES / 1e6:.0f} MB, pinned")
    print("| transfer | alone ms | 2 ms into a layer's copy, ms | the layer's copy beside it |")
    print("|---|---|---|---|")
    for name, transfer in transfers.items():
        alone = sorted(timed(transfer, False)[0] for _ in range(args.repeats))
        beside = sorted(timed(transfer, True) for _ in range(args.repeats))
        middle = args.repeats // 2
        print(
            f"| {name} | {alone[middle]:.3f} | {beside[middle][0]:.3f} | "
            f"{beside[middle][1]:.1f} GB/s |",
            flush=True,
        )


if __name__ == "__main__":
    main()
