"""The streaming weight source: layers move to the compute device as the forward pass needs them.

One schedule, written once: while layer j computes, layer j+1 is copied from pinned RAM into the
other of two device buffers on a copy stream, and a reader thread brings the next disk-tier
layer into a pinned relay buffer (by direct I/O, see ``directio``). ``overlap=False`` runs the
same loop with every move waited for, which is what the overlap is measured against.

Copy contract: ``_load(layer, slot)`` leaves the layer's bytes, in the compute dtype and in its
packed layout, in device buffer ``slot``, and records ``ready[slot]`` when they are there; it
never overwrites a slot before ``free[slot]`` (recorded when the compute stream is done with it).

On a CPU-only machine the device buffers are plain RAM and the disk reader fills them directly:
the same engine, streaming from disk under a RAM budget.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import torch

from yalm_runner import cudamem
from yalm_runner.checkpoint import ModelStore
from yalm_runner.directio import SLACK, RangeReader
from yalm_runner.model import Weights
from yalm_runner.offload import OffloadPolicy, Placement, cast_part, plan_placement
from yalm_runner.pinned import pinned_empty
from yalm_runner.quant import DequantizingWeights, scratch_elements
from yalm_runner.tensorfile import read_layout

ALIGNMENT = 256


@dataclass(frozen=True)
class PackedTensor:
    name: str
    shape: tuple[int, ...]
    begin: int
    end: int
    dtype: torch.dtype


def _has_files(store: ModelStore) -> bool:
    """Whether ``store``'s parts are files in the store format, to be read by direct I/O (a
    ``ModelStore``; a bench's synthetic store whose disk-tier layers it wrote out says so)."""
    return isinstance(store, ModelStore) or getattr(store, "has_files", False)


def _compressed(store: ModelStore, part: str) -> bool:
    return getattr(store, "quantization", None) is not None and part.startswith("layer_")


def pack_layout(store: ModelStore, part: str, dtype: torch.dtype) -> tuple[list[PackedTensor], int]:
    """Offsets of ``part``'s tensors in one flat buffer of ``dtype``.

    In the store's own dtype, and for every compressed layer (its codes, scales and 16-bit
    biases travel as stored; ``quant.DequantizingWeights`` casts on the device), this is the
    file's data layout, so a layer goes from disk to the device as one block; in another dtype
    the tensors are repacked at 256-byte boundaries.
    """
    records = store.parts[part].records
    if dtype == store.dtype or _compressed(store, part):
        packed = [PackedTensor(r.name, r.shape, r.begin, r.end, r.dtype) for r in records]
        return packed, store.parts[part].data_bytes
    element = torch.empty((), dtype=dtype).element_size()
    offset, packed = 0, []
    for record in records:
        count = 1
        for size in record.shape:
            count *= size
        packed.append(
            PackedTensor(record.name, record.shape, offset, offset + count * element, dtype)
        )
        offset += -(-(count * element) // ALIGNMENT) * ALIGNMENT
    return packed, offset


def unpack(buffer: torch.Tensor, layout: list[PackedTensor]) -> Weights:
    return {t.name: buffer[t.begin : t.end].view(t.dtype).view(t.shape) for t in layout}


def pack_into(buffer: torch.Tensor, layout: list[PackedTensor], tensors: Weights) -> None:
    for packed in layout:
        target = buffer[packed.begin : packed.end].view(tensors[packed.name].dtype)
        target.copy_(tensors[packed.name].reshape(-1))


class StreamingWeights:
    """A weight source that follows a ``Placement``: resident, pinned-RAM and disk layers."""

    def __init__(
        self,
        store: ModelStore,
        device: torch.device | str,
        dtype: torch.dtype,
        placement: Placement,
        *,
        overlap: bool = True,
        verify: bool = True,
        share_pinned: StreamingWeights | None = None,
        buffers: int = 2,
    ):
        """``share_pinned``: another source over the same store, dtype and placement whose
        pinned-RAM layers this one streams too (one host copy for several GPUs: pinned memory
        is visible to every device). ``buffers``: device buffers for streamed layers, so the
        copy of layer j+buffers-1 may start once layer j-1's compute is done (2: double
        buffering; a disk tier keeps 2, bound by its two relays)."""
        if buffers < 2:
            raise ValueError(f"streaming needs at least 2 device buffers, got {buffers}")
        self.store = store
        self.config = store.config
        self.device = torch.device(device)
        self.dtype = dtype
        self.placement = placement
        self.overlap = overlap
        self.verify = verify
        self._cuda = self.device.type == "cuda"
        if self._cuda:
            cudamem.configure()  # before the first weight lands: the plan's bytes must count
        self._resident: dict[str, Weights] = {}
        self._pinned: dict[int, torch.Tensor] = {}
        self._layouts: dict[int, tuple[list[PackedTensor], int]] = {}
        self._verified: set[str] = set()
        self.bytes_streamed = 0
        self.bytes_from_disk = 0
        self.disk_read_s = 0.0  # the reader's time in reads (not in waits for a free relay)
        self.quantization = getattr(store, "quantization", None)
        self._range_checked: set[str] = set()
        # Compressed layers dequantize each matrix on access into this one buffer.
        self._dequant_scratch = (
            torch.empty(scratch_elements(self.config), dtype=dtype, device=self.device)
            if self.quantization is not None
            else None
        )
        streamed = []
        for part, tier in placement.tiers.items():
            if tier == "gpu":
                tensors = self._read_cast(part)
                on_device = {n: t.to(self.device) for n, t in tensors.items()}
                if _compressed(store, part):
                    self._resident[part] = self._as_weights(on_device, part)
                else:
                    self._resident[part] = on_device
                self._verified.add(part)
                continue
            layer_idx = int(part.removeprefix("layer_"))
            self._layouts[layer_idx] = pack_layout(store, part, dtype)
            streamed.append(layer_idx)
            if tier == "cpu" and share_pinned is not None:
                self._pinned[layer_idx] = share_pinned._pinned[layer_idx]
                self._verified.add(part)
            elif tier == "cpu":
                layout, size = self._layouts[layer_idx]
                pinned = pinned_empty(size, torch.uint8, pin=self._cuda, what=part)
                pack_into(pinned, layout, self._read_cast(part))
                self._pinned[layer_idx] = pinned
                self._verified.add(part)
        self._streamed = streamed
        buffer_bytes = max((self._layouts[idx][1] for idx in streamed), default=0)
        disk = [idx for idx in streamed if placement.tiers[f"layer_{idx}"] == "disk"]
        self._slots = [
            torch.empty(buffer_bytes, dtype=torch.uint8, device=self.device)
            for _ in range((2 if disk else buffers) if streamed else 0)
        ]
        self._disk = disk
        # Same dtype on disk and in compute: a layer goes from the drive to the relay by direct
        # I/O, its file offset read once from the header.
        as_stored = dtype == store.dtype or self.quantization is not None
        self._direct = RangeReader() if disk and as_stored and _has_files(store) else None
        self._data_start = {
            idx: read_layout(store.parts[f"layer_{idx}"].path).data_start
            for idx in (disk if self._direct else ())
        }
        relay_bytes = max((self._layouts[idx][1] for idx in disk), default=0)
        relay_bytes += SLACK if self._direct else 0
        self._relays = [
            pinned_empty(relay_bytes, torch.uint8, pin=self._cuda, what="disk relay")
            for _ in range(2 if disk else 0)
        ]
        scratch_bytes = (
            0
            if as_stored
            else max((store.parts[f"layer_{idx}"].data_bytes for idx in disk), default=0)
        )
        self._scratch = torch.empty(scratch_bytes, dtype=torch.uint8)
        self._reader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="yalm-disk")
        if self._cuda:
            self._copy_stream = torch.cuda.Stream(self.device)
            self._ready = [torch.cuda.Event() for _ in self._slots]
            self._free = [torch.cuda.Event() for _ in self._slots]
            self._relay_free = [torch.cuda.Event() for _ in self._relays]

    def _read_cast(self, part: str) -> Weights:
        """A part from the store, cast to the compute dtype (compressed layers stay as stored)."""
        tensors = self.store.read_part(part, verify=self.verify)
        if _compressed(self.store, part):
            return tensors
        return cast_part(tensors, self.dtype, part, str(self.store.parts[part].path))

    def _as_weights(self, tensors: Weights, layer: int | str) -> Weights:
        """What ``model.block`` reads: the tensors, or a dequantizing view of compressed ones."""
        if self.quantization is None:
            return tensors
        part = layer if isinstance(layer, str) else f"layer_{layer}"
        first = part not in self._range_checked  # fp16's range is checked on the first pass
        self._range_checked.add(part)
        return DequantizingWeights(
            tensors, self.quantization, self.dtype, self._dequant_scratch, part, check_range=first
        )

    def close(self) -> None:
        self._reader.shutdown(wait=True)
        if self._direct is not None:
            self._direct.close()

    def __enter__(self) -> StreamingWeights:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    @property
    def copy_stream(self) -> torch.cuda.Stream | None:
        """The stream that moves pinned-RAM layers to the device, for a pinned KV cache to
        share: on one queue each layer's KV travels right after the weights queued before it,
        where on two streams the copy engine was seen to run the next layer's weights first
        (a layer's compute then waited ~12 ms for a 1.7 ms copy). None when nothing streams
        or a disk tier's moves wait for their reads (they are queued late; sharing would hold
        the KV behind them)."""
        if not self._cuda or not self._streamed or self._disk:
            return None
        return self._copy_stream

    def embedding(self) -> Weights:
        return self._resident["embedding"]

    def head(self) -> Weights:
        return self._resident["head"]

    # -- disk tier -----------------------------------------------------------------------------

    def _read_disk(self, disk_order: int) -> torch.Tensor:
        """Bring disk-tier layer number ``disk_order`` into its relay, packed in the compute
        dtype (runs on the reader thread). Waits until the relay's previous copy has left."""
        layer_idx = self._disk[disk_order]
        part = f"layer_{layer_idx}"
        relay = self._relays[disk_order % 2]
        if self._cuda:
            self._relay_free[disk_order % 2].synchronize()
        verify = self.verify and part not in self._verified
        began = time.perf_counter()
        if self._direct is not None:
            size = self.store.parts[part].data_bytes
            relay = self._direct.read_range(
                self.store.parts[part].path, self._data_start[layer_idx], size, relay
            )
            if verify:
                self.store.verify_part(part, relay)
        elif self.dtype == self.store.dtype or self.quantization is not None:
            self.store.read_part(part, buffer=relay, verify=verify)
        else:
            raw = self.store.read_part(part, buffer=self._scratch, verify=verify)
            pack_into(
                relay, self._layouts[layer_idx][0], {n: t.to(self.dtype) for n, t in raw.items()}
            )
        self._verified.add(part)
        self.disk_read_s += time.perf_counter() - began
        return relay

    # -- the schedule --------------------------------------------------------------------------

    def layers(self) -> Iterator[tuple[int, Weights]]:
        """Yield every layer in order; streamed ones arrive through the device buffers, up to
        ``buffers - 1`` layers ahead of the one computing."""
        streamed = self._streamed
        reads: dict[int, Future] = {}
        disk_order = {layer_idx: order for order, layer_idx in enumerate(self._disk)}

        def start_read(order: int) -> None:
            if order < len(self._disk) and order not in reads:
                reads[order] = self._reader.submit(self._read_disk, order)

        def load(order: int) -> torch.Tensor:
            """Start moving streamed layer ``order`` to its slot; returns the buffer to use."""
            layer_idx = streamed[order]
            size = self._layouts[layer_idx][1]
            self.bytes_streamed += size
            if layer_idx in disk_order:
                source = reads.pop(disk_order[layer_idx]).result()
                self.bytes_from_disk += self.store.parts[f"layer_{layer_idx}"].data_bytes
            else:
                source = self._pinned[layer_idx]
            if not self._cuda:
                return source  # RAM is the compute device's memory: use it where it lies
            slot = order % depth
            with torch.cuda.stream(self._copy_stream):
                self._copy_stream.wait_event(self._free[slot])
                self._slots[slot][:size].copy_(source[:size], non_blocking=True)
                self._ready[slot].record(self._copy_stream)
                if layer_idx in disk_order:
                    self._relay_free[disk_order[layer_idx] % 2].record(self._copy_stream)
            return self._slots[slot]

        start_read(0)
        start_read(1)
        depth = max(len(self._slots), 2)  # layers in flight: the one computing and the next
        buffers: dict[int, torch.Tensor] = {}
        for ahead in range(min(depth - 1, len(streamed))):
            buffers[ahead] = load(ahead)
        order = 0
        for layer_idx in range(self.config.num_layers):
            part = f"layer_{layer_idx}"
            if part in self._resident:
                yield layer_idx, self._resident[part]
                continue
            if not self.overlap and self._cuda:
                torch.cuda.current_stream(self.device).wait_event(self._ready[order % depth])
                torch.cuda.current_stream(self.device).synchronize()
            elif self._cuda:
                torch.cuda.current_stream(self.device).wait_event(self._ready[order % depth])
            # The next move from pinned RAM goes on the copy stream before this layer runs: a
            # pinned KV cache shares the stream (``copy_stream``) and queues this layer's
            # write-back, which waits for this layer's compute; a move queued after it would
            # leave the link idle for that compute. Its buffer is free once the layer before
            # this one has computed, which is already queued. A disk layer's move waits for its
            # read (the host blocks on it), so it still goes after.
            ahead = order + depth - 1
            early = self.overlap and ahead < len(streamed) and streamed[ahead] not in disk_order
            if early:
                buffers[ahead] = load(ahead)
            layout, _ = self._layouts[layer_idx]
            yield layer_idx, self._as_weights(unpack(buffers.pop(order), layout), layer_idx)
            # The compute of this layer is enqueued (or, on the CPU, done): release its buffers
            # and start the next move if it is not on its way, which then overlaps that compute.
            if self._cuda:
                self._free[order % depth].record(torch.cuda.current_stream(self.device))
                if not self.overlap:
                    torch.cuda.current_stream(self.device).synchronize()
            if layer_idx in disk_order:
                start_read(disk_order[layer_idx] + 2)
            if not early and ahead < len(streamed):
                buffers[ahead] = load(ahead)
            order += 1


def part_bytes_in(store: ModelStore, dtype: torch.dtype) -> dict[str, int]:
    """Each part's size once in the compute dtype."""
    return {part: pack_layout(store, part, dtype)[1] for part in store.parts}


def open_weights(
    store: ModelStore,
    device: torch.device | str,
    dtype: torch.dtype,
    policy: OffloadPolicy,
    kv_bytes: int = 0,
    workspace_bytes: int = 0,
    verify: bool = True,
) -> StreamingWeights:
    """Plan a placement under ``policy`` and open the weight source that follows it."""
    placement = plan_placement(part_bytes_in(store, dtype), policy, kv_bytes, workspace_bytes)
    return StreamingWeights(store, device, dtype, placement, overlap=policy.overlap, verify=verify)
