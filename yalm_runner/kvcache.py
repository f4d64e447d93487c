"""Where a batch's keys and values live between layers: on the compute device, or in pinned RAM.

Both caches hand the engine, for layer j, a (B, S_max, NH, D) pair that ``model.block`` writes its
new slots into and reads ``0 .. end`` from; the engine calls ``layer(j, start)`` before the block
and ``stored(j, start, end)`` after it, and ``keep(rows)`` when rows leave the batch.

``DeviceKV`` keeps every layer on the device. ``HostKV`` keeps them in pinned host memory: while
layer j computes, the live rows' old slots of layer j+1 travel to the other of two device slots
on a copy stream, and after layer j the slots it wrote travel back. Rows that leave the batch
are dropped from the row map; their host memory is simply not read again. Copy contract: a
device slot is refilled only after the compute that used it and the write-back of its new
slots, both ordered on the one copy stream.
"""

from __future__ import annotations

import torch

from yalm_runner.config import ModelConfig


class DeviceKV:
    """Every layer's cache on the compute device."""

    def __init__(
        self, config: ModelConfig, batch: int, slots: int, device: torch.device, dtype: torch.dtype
    ):
        self.bytes_moved = 0  # nothing crosses the link
        shape = (batch, slots, config.num_heads, config.head_dim)
        self._caches = [
            (
                torch.empty(shape, device=device, dtype=dtype),
                torch.zeros(shape, device=device, dtype=dtype),
            )
            for _ in range(config.num_layers)
        ]

    def layer(self, layer_idx: int, start: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self._caches[layer_idx]

    def stored(self, layer_idx: int, start: int, end: int) -> None:
        pass

    def keep(self, rows: list[int]) -> None:
        index = torch.tensor(rows, device=self._caches[0][0].device, dtype=torch.long)
        self._caches = [(keys[index], values[index]) for keys, values in self._caches]


def quantize_kv(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(..., D) -> int8 codes and one scale per vector (absmax / 127), in ``x``'s dtype."""
    scale = x.abs().amax(dim=-1, keepdim=True).float() / 127.0
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    codes = torch.round(x.float() / scale).clamp_(-127, 127).to(torch.int8)
    return codes, scale.to(x.dtype)


def dequantize_kv(codes: torch.Tensor, scale: torch.Tensor, out: torch.Tensor) -> None:
    torch.mul(codes.to(out.dtype), scale, out=out)


class HostKV:
    """Every layer's cache in (pinned) host RAM; two device slots take turns holding a layer.

    ``bits=8`` keeps the host copy as int8 codes with one scale per (token, head): half the RAM
    and half the traffic. Codes travel to a device staging area and are expanded into the slot
    on the compute stream; new slots are quantized on the device before they travel back.
    """

    def __init__(
        self,
        config: ModelConfig,
        batch: int,
        slots: int,
        device: torch.device,
        dtype: torch.dtype,
        bits: int = 16,
    ):
        if bits not in (8, 16):
            raise ValueError(f"KV bits must be 8 or 16, got {bits}")
        self._cuda = device.type == "cuda"
        self._layers = config.num_layers
        self._bits = bits
        shape = (batch, slots, config.num_heads, config.head_dim)
        scale_shape = (batch, slots, config.num_heads, 1)

        def host_layer() -> list[torch.Tensor]:
            # Zero-filled: masked slots are multiplied by a zero weight, and 0 * NaN is NaN.
            if bits == 16:
                return [torch.zeros(shape, dtype=dtype, pin_memory=self._cuda) for _ in range(2)]
            return [
                torch.zeros(size, dtype=kind, pin_memory=self._cuda)
                for _ in range(2)
                for size, kind in ((shape, torch.int8), (scale_shape, dtype))
            ]

        self._host = [host_layer() for _ in range(config.num_layers)]
        self._slots = [
            (
                torch.zeros(shape, device=device, dtype=dtype),
                torch.zeros(shape, device=device, dtype=dtype),
            )
            for _ in range(2)
        ]
        if bits == 16:
            # The codes are the values: host rows travel straight into the slots.
            self._incoming = [list(slot) for slot in self._slots]
        else:
            self._incoming = [
                [
                    torch.zeros(size, dtype=kind, device=device)
                    for _ in range(2)
                    for size, kind in ((shape, torch.int8), (scale_shape, dtype))
                ]
                for _ in range(2)
            ]
            self._outgoing = [
                [
                    torch.zeros(size, dtype=kind, device=device)
                    for _ in range(2)
                    for size, kind in ((shape, torch.int8), (scale_shape, dtype))
                ]
                for _ in range(2)
            ]
        self._rows = list(range(batch))
        self.bytes_moved = 0
        if self._cuda:
            self._stream = torch.cuda.Stream(device)
            self._ready = [torch.cuda.Event() for _ in range(2)]
            self._computed = [torch.cuda.Event() for _ in range(2)]
            self._sent = [torch.cuda.Event() for _ in range(2)]
            self._compute = lambda: torch.cuda.current_stream(device)

    def _copy(self, target: torch.Tensor, source: torch.Tensor) -> None:
        target.copy_(source, non_blocking=self._cuda)
        self.bytes_moved += source.numel() * source.element_size()

    def _move_rows(self, targets, sources, target_rows, source_rows, begin: int, end: int):
        for target, source in zip(targets, sources, strict=True):
            for target_row, source_row in zip(target_rows, source_rows, strict=True):
                self._copy(target[target_row, begin:end], source[source_row, begin:end])

    def _fetch(self, layer_idx: int, start: int) -> None:
        """Bring the live rows' slots ``0 .. start-1`` of ``layer_idx`` to the device."""
        slot = layer_idx % 2
        live = range(len(self._rows))
        incoming, host = self._incoming[slot], self._host[layer_idx]
        if self._cuda:
            self._stream.wait_event(self._computed[slot])
            with torch.cuda.stream(self._stream):
                self._move_rows(incoming, host, live, self._rows, 0, start)
                self._ready[slot].record(self._stream)
        else:
            self._move_rows(incoming, host, live, self._rows, 0, start)

    def layer(self, layer_idx: int, start: int) -> tuple[torch.Tensor, torch.Tensor]:
        if layer_idx == 0 or not self._cuda:
            # On the CPU there is nothing to overlap: fetch each layer as it comes.
            self._fetch(layer_idx, start)
        slot = layer_idx % 2
        if self._cuda:
            self._compute().wait_event(self._ready[slot])
            if layer_idx + 1 < self._layers:
                self._fetch(layer_idx + 1, start)  # overlaps this layer's compute
        live = len(self._rows)
        keys, values = self._slots[slot]
        if self._bits == 8 and start:
            key_codes, key_scales, value_codes, value_scales = self._incoming[slot]
            dequantize_kv(key_codes[:live, :start], key_scales[:live, :start], keys[:live, :start])
            dequantize_kv(
                value_codes[:live, :start], value_scales[:live, :start], values[:live, :start]
            )
        return keys[:live], values[:live]

    def stored(self, layer_idx: int, start: int, end: int) -> None:
        """Send the slots ``start .. end-1`` that layer ``layer_idx`` wrote back to RAM."""
        slot = layer_idx % 2
        live = range(len(self._rows))
        host = self._host[layer_idx]
        if self._bits == 16:
            outgoing = list(self._slots[slot])
        else:
            outgoing = self._outgoing[slot]
            if self._cuda:  # the last copies out of this staging must have left
                self._compute().wait_event(self._sent[slot])
            for which, values in enumerate(self._slots[slot]):
                codes, scales = quantize_kv(values[: len(live), start:end])
                outgoing[2 * which][: len(live), start:end] = codes
                outgoing[2 * which + 1][: len(live), start:end] = scales
        if self._cuda:
            self._computed[slot].record(self._compute())
            self._stream.wait_event(self._computed[slot])
            with torch.cuda.stream(self._stream):
                self._move_rows(host, outgoing, self._rows, live, start, end)
                # The next fetch into this slot is ordered after these copies on the stream.
                self._computed[slot].record(self._stream)
                self._sent[slot].record(self._stream)
        else:
            self._move_rows(host, outgoing, self._rows, live, start, end)

    def keep(self, rows: list[int]) -> None:
        self._rows = [self._rows[row] for row in rows]
