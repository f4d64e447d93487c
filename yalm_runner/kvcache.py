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


class HostKV:
    """Every layer's cache in (pinned) host RAM; two device slots take turns holding a layer."""

    def __init__(
        self, config: ModelConfig, batch: int, slots: int, device: torch.device, dtype: torch.dtype
    ):
        self._cuda = device.type == "cuda"
        self._layers = config.num_layers
        host_shape = (batch, slots, config.num_heads, config.head_dim)
        # Values are zero-filled like DeviceKV's: masked slots are multiplied by a zero weight,
        # and 0 * garbage could be NaN.
        self._host = [
            (
                torch.empty(host_shape, dtype=dtype, pin_memory=self._cuda),
                torch.zeros(host_shape, dtype=dtype, pin_memory=self._cuda),
            )
            for _ in range(config.num_layers)
        ]
        self._slots = [
            (
                torch.empty(host_shape, device=device, dtype=dtype),
                torch.zeros(host_shape, device=device, dtype=dtype),
            )
            for _ in range(2)
        ]
        self._rows = list(range(batch))
        self.bytes_moved = 0
        if self._cuda:
            self._stream = torch.cuda.Stream(device)
            self._ready = [torch.cuda.Event() for _ in range(2)]
            self._computed = [torch.cuda.Event() for _ in range(2)]
            self._compute = lambda: torch.cuda.current_stream(device)

    def _copy(self, target: torch.Tensor, source: torch.Tensor) -> None:
        target.copy_(source, non_blocking=self._cuda)
        self.bytes_moved += source.numel() * source.element_size()

    def _fetch(self, layer_idx: int, start: int) -> None:
        """Bring the live rows' slots ``0 .. start-1`` of ``layer_idx`` to its device slot."""
        slot = layer_idx % 2
        keys, values = self._host[layer_idx]
        slot_keys, slot_values = self._slots[slot]
        if self._cuda:
            self._stream.wait_event(self._computed[slot])
            with torch.cuda.stream(self._stream):
                for live, row in enumerate(self._rows):
                    self._copy(slot_keys[live, :start], keys[row, :start])
                    self._copy(slot_values[live, :start], values[row, :start])
                self._ready[slot].record(self._stream)
        else:
            for live, row in enumerate(self._rows):
                self._copy(slot_keys[live, :start], keys[row, :start])
                self._copy(slot_values[live, :start], values[row, :start])

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
        return keys[:live], values[:live]

    def stored(self, layer_idx: int, start: int, end: int) -> None:
        """Send the slots ``start .. end-1`` that layer ``layer_idx`` wrote back to RAM."""
        slot = layer_idx % 2
        keys, values = self._host[layer_idx]
        slot_keys, slot_values = self._slots[slot]
        if self._cuda:
            self._computed[slot].record(self._compute())
            self._stream.wait_event(self._computed[slot])
            with torch.cuda.stream(self._stream):
                for live, row in enumerate(self._rows):
                    self._copy(keys[row, start:end], slot_keys[live, start:end])
                    self._copy(values[row, start:end], slot_values[live, start:end])
                # The next fetch into this slot is ordered after these copies on the stream.
                self._computed[slot].record(self._stream)
        else:
            for live, row in enumerate(self._rows):
                self._copy(keys[row, start:end], slot_keys[live, start:end])
                self._copy(values[row, start:end], slot_values[live, start:end])

    def keep(self, rows: list[int]) -> None:
        self._rows = [self._rows[row] for row in rows]
