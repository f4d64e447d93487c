"""Where a batch's keys and values live between layers: on the compute device, or in pinned RAM.

Both caches hand the engine, for layer j, a (B, S_max, NH, D) pair that ``model.block`` writes its
new slots into and reads ``0 .. end`` from; the engine calls ``layer(j, start)`` before the layer
(it may run the block over several groups of rows of that pair) and ``stored(j, start, end)``
after it, and ``keep(rows)`` when rows leave the batch.

``DeviceKV`` keeps every layer on the device. ``HostKV`` keeps them in pinned host memory: while
layer j computes, the live rows' old slots of layer j+1 travel to the other of two device slots
on a copy stream, and after layer j the slots it wrote travel back. Rows that leave the batch
are dropped from the row map; their host memory is simply not read again. Copy contract: a
device slot is refilled only after the compute that used it and the write-back of its new
slots, both ordered on the one copy stream. The pinned host memory comes from a ``HostArena``
that outlives the batch: locking tens of GB of RAM takes seconds, so an engine does it once.
The records' format and sizes are ``kvformat``'s; this module moves them.

Every cache also hands its state out and takes it back, for a checkpoint of the batch (the
engine's ``export``/``restore``): ``records(j, first, end)`` copies the live rows' records of
slots ``first .. end-1`` to the CPU in the width they are kept (the compute dtype, or 8/4-bit
records exactly as ``kvformat`` stores them), ``load`` writes such records back,
``rewritten(j)`` says whether older slots of layer j were re-encoded since the last
``exported()`` (a slot-major compaction does that), and ``layout``/``set_layout`` carry the
bookkeeping that decides future arithmetic (the slot-major layout's rows and pending
compactions). Slots no batch wrote are never read, so they need no saving.
"""

from __future__ import annotations

import math

import torch

from yalm_runner import hostattn, kernels
from yalm_runner.config import ModelConfig
from yalm_runner.kvformat import DECODE_BYTES, KV_BITS, decode_kv, encode_kv, kv_record_shape
from yalm_runner.pinned import pinned_empty


class _StateDefaults:
    """The state API's answers for a cache that re-encodes nothing and keeps no bookkeeping
    beyond its records (``SlotMajorHostKV`` overrides them)."""

    def rewritten(self, layer_idx: int) -> bool:
        return False

    def exported(self) -> None:
        pass

    def layout(self) -> dict:
        return {}

    def set_layout(self, layout: dict) -> None:
        pass


class DeviceKV(_StateDefaults):
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

    # The state API (module docstring): the records are the values themselves.

    def records(self, layer_idx: int, first: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        keys, values = self._caches[layer_idx]
        return keys[:, first:end].cpu(), values[:, first:end].cpu()

    def load(
        self, layer_idx: int, rows: list[int], first: int, keys: torch.Tensor, values: torch.Tensor
    ) -> None:
        end = first + keys.shape[1]
        index = torch.tensor(rows, device=self._caches[0][0].device, dtype=torch.long)
        for target, source in zip(self._caches[layer_idx], (keys, values), strict=True):
            target[index, first:end] = source.to(target.device)


class HostArena:
    """Pinned host buffers for the KV cache (keys and values of every layer), kept from one
    batch to the next and grown when a batch needs more."""

    def __init__(self, layers: int, pin: bool):
        self._pin = pin
        self._buffers: list[list[torch.Tensor | None]] = [[None, None] for _ in range(layers)]

    def take(self, count: int, kind: torch.dtype) -> list[list[torch.Tensor]]:
        """Per layer, keys and values: flat tensors of ``count`` elements of ``kind``. The
        contents are whatever an earlier batch left (every slot a batch reads, it wrote)."""
        nbytes = count * torch.empty((), dtype=kind).element_size()
        for pair in self._buffers:
            for which, buffer in enumerate(pair):
                if buffer is None or buffer.numel() < nbytes:
                    pair[which] = None  # the old one goes before the larger one is locked
                    pair[which] = pinned_empty(nbytes, torch.uint8, pin=self._pin, what="KV cache")
        return [[buffer[:nbytes].view(kind) for buffer in pair] for pair in self._buffers]


class _PinnedKV(_StateDefaults):
    """What both pinned-RAM caches share: two device slots, the copy stream and its events, and
    the schedule. ``layer(j)`` waits for layer j's old slots, starts layer j+1's on the copy
    stream (it overlaps layer j's compute), and expands layer j into its device slot; a
    subclass says how a layer travels (``_fetch_copies``), how it lands in the slot
    (``_expand``), how many rows are live (``_live``), and how new slots go back (``stored``).
    """

    def __init__(
        self,
        config: ModelConfig,
        batch: int,
        slots: int,
        device: torch.device,
        dtype: torch.dtype,
        bits: int,
        arena: HostArena | None,
        stream: torch.cuda.Stream | None = None,
    ):
        if bits not in KV_BITS:
            raise ValueError(f"KV bits must be one of {KV_BITS}, got {bits}")
        if bits == 4 and config.head_dim % 2:
            raise ValueError(f"4-bit KV needs an even head size, got {config.head_dim}")
        self._cuda = device.type == "cuda"
        self._layers = config.num_layers
        self._bits = bits
        self._device, self._dtype = device, dtype
        self._batch, self._slot_tail = batch, (config.num_heads, config.head_dim)
        shape = (batch, slots, *self._slot_tail)
        self.bytes_moved = 0
        # One cache (keys or values) of one layer as records, and its element type.
        self._record_shape, self._kind = kv_record_shape(bits, shape, dtype)
        self._allocate(slots)
        arena = arena or HostArena(config.num_layers, pin=self._cuda)
        # Per layer: keys, values, flat.
        self._host = arena.take(math.prod(self._record_shape), self._kind)
        # fp32 temporaries of encoding or expanding one slot of one row (all heads).
        self._row_bytes = config.num_heads * config.head_dim * 4
        if self._cuda:
            # The weights' copy stream when the engine shares it: one queue puts a layer's KV
            # on the link between its weights and the next layer's, in the order they are
            # needed; on a stream of its own the copy engine may run the next weights first
            # and the layer's compute waits for them (see ``StreamingWeights.copy_stream``).
            self._stream = stream or torch.cuda.Stream(device)
            self._ready = [torch.cuda.Event() for _ in range(2)]
            self._computed = [torch.cuda.Event() for _ in range(2)]
            self._sent = [torch.cuda.Event() for _ in range(2)]
            self._compute = lambda: torch.cuda.current_stream(device)

    def _allocate(self, slots: int) -> None:
        """The two device slots, ``slots`` positions each (a subclass adds its staging)."""
        shape = (self._batch, slots, *self._slot_tail)
        self._slots = [
            tuple(torch.zeros(shape, device=self._device, dtype=self._dtype) for _ in range(2))
            for _ in range(2)
        ]

    def _copy(self, target: torch.Tensor, source: torch.Tensor) -> None:
        target.copy_(source, non_blocking=self._cuda)
        self.bytes_moved += source.numel() * source.element_size()

    def _on_copy_stream(self, work) -> None:
        if self._cuda:
            with torch.cuda.stream(self._stream):
                work()
        else:
            work()

    def _after_compute(self, slot: int) -> None:
        """Order the copy stream after everything the compute stream has queued so far: the
        layer that used ``slot`` and whatever was just encoded for the trip back."""
        if self._cuda:
            self._computed[slot].record(self._compute())
            self._stream.wait_event(self._computed[slot])

    def _sent_back(self, slot: int) -> None:
        """On the copy stream, after a write-back: the next fetch into ``slot`` and the next
        reuse of its outgoing staging wait for this point."""
        if self._cuda:
            self._computed[slot].record(self._stream)
            self._sent[slot].record(self._stream)

    def _fetch(self, layer_idx: int, start: int) -> None:
        slot = layer_idx % 2
        if self._cuda:
            self._stream.wait_event(self._computed[slot])

        def work() -> None:
            self._fetch_copies(layer_idx, slot, start)
            if self._cuda:
                self._ready[slot].record(self._stream)

        self._on_copy_stream(work)

    def layer(self, layer_idx: int, start: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer ``layer_idx``'s cache for the live rows."""
        if layer_idx == 0 or not self._cuda:
            # On the CPU there is nothing to overlap: fetch each layer as it comes.
            self._fetch(layer_idx, start)
        slot = layer_idx % 2
        if self._cuda:
            self._compute().wait_event(self._ready[slot])
            if layer_idx + 1 < self._layers:
                self._fetch(layer_idx + 1, start)  # overlaps this layer's compute
        keys, values = self._slots[slot]
        if start:
            self._expand(layer_idx, slot, start)
        live = self._live(layer_idx)
        return keys[:live], values[:live]

    def settle(self) -> None:
        """Wait until every write-back queued on the copy stream has landed in host memory."""
        if self._cuda:
            self._stream.synchronize()

    def _row_groups(self, live: int, slots: int) -> list[tuple[int, int]]:
        """Ranges of the ``live`` rows whose temporaries over ``slots`` slots fit DECODE_BYTES."""
        group = max(1, DECODE_BYTES // (slots * self._row_bytes))
        return [(first, min(first + group, live)) for first in range(0, live, group)]

    def _fetch_copies(self, layer_idx: int, slot: int, start: int) -> None:
        raise NotImplementedError

    def _expand(self, layer_idx: int, slot: int, start: int) -> None:
        raise NotImplementedError

    def _live(self, layer_idx: int) -> int:
        raise NotImplementedError


class HostKV(_PinnedKV):
    """Every layer's cache in (pinned) host RAM, row-major; two device slots take turns holding
    a layer, and each live row travels in one copy per cache each way.

    ``bits`` 8 or 4 keep the host copy compressed per (token, head) (``encode_kv``): a half or
    about a third of the RAM and of the traffic. Compressed rows travel to a device staging area
    and are expanded into the slot on the compute stream; the slots a layer wrote are compressed
    on the device before they travel back.
    """

    def __init__(
        self,
        config: ModelConfig,
        batch: int,
        slots: int,
        device: torch.device,
        dtype: torch.dtype,
        bits: int = 16,
        arena: HostArena | None = None,
        stream: torch.cuda.Stream | None = None,
    ):
        super().__init__(config, batch, slots, device, dtype, bits, arena, stream)
        self._host = [[flat.view(self._record_shape) for flat in pair] for pair in self._host]
        self._rows = list(range(batch))

    def _allocate(self, slots: int, fetching: bool = True) -> None:
        """The slots, and staging for records on their way in (unless nothing is ever
        ``fetching``: a prefill from slot 0) and out."""
        super()._allocate(slots)
        if self._bits == 16:
            # The records are the values: host rows travel straight into and out of the slots.
            self._incoming, self._outgoing = [list(slot) for slot in self._slots], None
            return
        size = kv_record_shape(self._bits, (self._batch, slots, *self._slot_tail), self._dtype)[0]

        def staging() -> list[list[torch.Tensor]]:
            return [
                [torch.zeros(size, dtype=self._kind, device=self._device) for _ in range(2)]
                for _ in range(2)
            ]

        self._incoming = staging() if fetching else None
        self._outgoing = staging()

    @property
    def device_bytes(self) -> int:
        """What this cache holds on the device now: its slots and their staging."""
        held = [*(self._slots or ()), *(self._incoming or ()), *(self._outgoing or ())]
        sizes = {t.data_ptr(): t.numel() * t.element_size() for pair in held for t in pair}
        return sum(sizes.values())

    def _move_rows(self, targets, sources, target_rows, source_rows, begin: int, end: int):
        for target, source in zip(targets, sources, strict=True):
            for target_row, source_row in zip(target_rows, source_rows, strict=True):
                self._copy(target[target_row, begin:end], source[source_row, begin:end])

    def _fetch_copies(self, layer_idx: int, slot: int, start: int) -> None:
        """The live rows' slots ``0 .. start-1`` of ``layer_idx``, a copy per row and cache."""
        if start:
            live = range(len(self._rows))
            self._move_rows(self._incoming[slot], self._host[layer_idx], live, self._rows, 0, start)

    def _live(self, layer_idx: int) -> int:
        return len(self._rows)

    def _expand(self, layer_idx: int, slot: int, start: int) -> None:
        if self._bits == 16:
            return  # the rows landed in the slot itself
        for first, last in self._row_groups(len(self._rows), start):
            for record, target in zip(self._incoming[slot], self._slots[slot], strict=True):
                decode_kv(record[first:last, :start], self._bits, target[first:last, :start])

    def stored(self, layer_idx: int, start: int, end: int) -> None:
        """Send the slots ``start .. end-1`` that layer ``layer_idx`` wrote back to RAM."""
        slot = layer_idx % 2
        live = range(len(self._rows))
        host_rows = list(self._rows)
        if self._bits == 16:
            outgoing = list(self._slots[slot])
        else:
            outgoing = self._outgoing[slot]
            if self._cuda:  # the last copies out of this staging must have left
                self._compute().wait_event(self._sent[slot])
            for first, last in self._row_groups(len(live), end - start):
                for record, values in zip(outgoing, self._slots[slot], strict=True):
                    record[first:last, start:end] = encode_kv(
                        values[first:last, start:end], self._bits
                    )
        self._after_compute(slot)

        def work() -> None:
            self._move_rows(self._host[layer_idx], outgoing, host_rows, live, start, end)
            self._sent_back(slot)

        self._on_copy_stream(work)

    def keep(self, rows: list[int]) -> None:
        self._rows = [self._rows[row] for row in rows]

    def records(self, layer_idx: int, first: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        self.settle()
        index = torch.tensor(self._rows, dtype=torch.long)
        keys, values = (host[:, first:end].index_select(0, index) for host in self._host[layer_idx])
        return keys, values

    def load(
        self, layer_idx: int, rows: list[int], first: int, keys: torch.Tensor, values: torch.Tensor
    ) -> None:
        self.settle()
        end = first + keys.shape[1]
        index = torch.tensor([self._rows[row] for row in rows], dtype=torch.long)
        for host, source in zip(self._host[layer_idx], (keys, values), strict=True):
            host[index, first:end] = source


class HostAttentionKV(HostKV):
    """``HostKV`` (8- or 4-bit records, row-major) whose decode steps attend where the records
    lie, on the host's cores (``hostattn``): only the step's queries, keys and values go out
    (fp32, with the new slot's records encoded on the device) and the attention's output comes
    back, a few MB a layer; the cache itself never crosses the link. A prefill goes the
    ``HostKV`` way (through a device slot, its slots written back on the copy stream); the
    device slots and their staging exist only for it: taken at the prefill's first layer,
    ``prefill_slots`` positions long, and given back at the first decode step (the allocator
    then hands their memory to the decode's activations). A batch resumed from its records
    never takes them.

    Decode: the engine calls ``attend(j, start, query, key, value, valid)`` instead of
    ``layer``/``stored``; it writes the new slot's records into the host cache, then attends
    over slots ``0 .. start-1`` (those ``valid`` allows) and the new slot in full precision,
    as the device path does. The records it writes are ``encode_kv``'s on the device, the same
    bits ``stored`` would send back, so checkpoints and the state API are ``HostKV``'s.
    """

    def __init__(
        self,
        config: ModelConfig,
        batch: int,
        slots: int,
        device: torch.device,
        dtype: torch.dtype,
        bits: int = 4,
        arena: HostArena | None = None,
        stream: torch.cuda.Stream | None = None,
        prefill_slots: int | None = None,
        threads: int | None = None,
        moves: str = "auto",
    ):
        if bits == 16:
            raise ValueError("host attention reads 8- or 4-bit records, not 16-bit values")
        self._prefill_slots = prefill_slots or slots
        self.threads = threads  # the kernel's threads (None: torch's count)
        # How a decode step's q/k/v go to pinned RAM and its output comes back: "auto" by a
        # kernel that reads or writes the pinned memory itself where Triton runs (a copy would
        # queue behind the weights' copy in flight: ``kernels.move_pinned``), else by copies;
        # "copy" always by copies (a benchmark compares the two).
        self.moves = moves
        super().__init__(config, batch, slots, device, dtype, bits, arena, stream)
        heads, dim, record = config.num_heads, config.head_dim, self._record_shape[-1]
        # The step's staging, flat: viewed at the live rows' size, so that every view is
        # contiguous (the kernel takes them as they are).
        self._step_values = pinned_empty(
            3 * batch * heads * dim * 4, torch.uint8, pin=self._cuda, what="host attention"
        ).view(torch.float32)  # fmt: skip
        self._step_records = pinned_empty(
            2 * batch * heads * record, torch.uint8, pin=self._cuda, what="host attention"
        )
        self._step_out = pinned_empty(
            batch * heads * dim * 4, torch.uint8, pin=self._cuda, what="host attention"
        ).view(torch.float32)  # fmt: skip
        self._step_shape = (heads, dim, record)
        self._row_index = torch.arange(batch, dtype=torch.long)
        self._writing_back = False  # a prefill's write-backs may still be on the copy stream

    def _allocate(self, slots: int, fetching: bool = True) -> None:
        self._slots = self._incoming = self._outgoing = None  # until a prefill (``layer``)

    def layer(self, layer_idx: int, start: int) -> tuple[torch.Tensor, torch.Tensor]:
        if start:
            raise ValueError("host attention's device slots hold a prefill from slot 0 only")
        if self._slots is None:
            super()._allocate(self._prefill_slots, fetching=False)
        return super().layer(layer_idx, start)

    def stored(self, layer_idx: int, start: int, end: int) -> None:
        super().stored(layer_idx, start, end)
        self._writing_back = True

    def keep(self, rows: list[int]) -> None:
        super().keep(rows)
        self._row_index = torch.tensor(self._rows, dtype=torch.long)

    def attend(
        self,
        layer_idx: int,
        start: int,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        valid: torch.Tensor,
    ) -> torch.Tensor:
        """A decode step's attention for layer ``layer_idx`` at slot ``start``: ``query``,
        ``key``, ``value`` (B, 1, NH, D) on the device, ``valid`` (B, start) booleans on the
        CPU; returns the context (B, 1, NH x D) in the compute dtype, on the device."""
        live = len(self._rows)
        if self._writing_back:
            if self._cuda:
                for sent in self._sent:  # the prefill's last write-backs, the earlier before
                    sent.synchronize()
            # A decode step needs no device slot: the prefill's go back (their last copies
            # have left) for the decode's activations to use.
            self._slots = self._incoming = self._outgoing = None
        self._writing_back = False
        # (2, B, NH, R): the new slot's keys' and values' records
        records = torch.stack([encode_kv(x[:, 0], self._bits) for x in (key, value)])
        step = torch.stack([query[:, 0], key[:, 0], value[:, 0]])  # (3, B, NH, D)
        by_kernel = self._cuda and self.moves != "copy" and kernels.pinned_moves_available()
        if self._cuda:
            heads, dim, record = self._step_shape
            staged = self._step_values[: 3 * live * heads * dim].view(3, live, heads, dim)
            staged_records = self._step_records[: 2 * live * heads * record]
            staged_records = staged_records.view(2, live, heads, record)
            by_kernel = by_kernel and kernels.move_pinned(step, staged) is not None
            if by_kernel:
                kernels.move_pinned(records, staged_records)
            else:
                staged.copy_(step.float(), non_blocking=True)
                staged_records.copy_(records, non_blocking=True)
            torch.cuda.current_stream(self._device).synchronize()
            out = self._step_out[: live * heads * dim].view(live, heads, dim)
        else:
            staged, staged_records, out = step.float(), records, None
        host_keys, host_values = self._host[layer_idx]
        # The kernel writes the new slot's records too: no torch op on the host beside it.
        out = hostattn.attend(
            host_keys, host_values, self._bits, self._dtype, staged[0], staged[1], staged[2],
            valid, self._row_index, out=out, new_records=staged_records, threads=self.threads,
        )  # fmt: skip
        self.bytes_moved += step.numel() * 4 + records.numel() + out.numel() * 4
        # On a GPU the output travels from pinned memory; the next layer's call reuses it only
        # after a synchronisation of the compute stream, which this move is queued on.
        if by_kernel:
            context = torch.empty(out.shape, dtype=self._dtype, device=self._device)
            kernels.move_pinned(out, context)
        else:
            context = out.to(self._device, non_blocking=self._cuda).to(self._dtype)
        return context.reshape(live, 1, -1)


class SlotMajorHostKV(_PinnedKV):
    """``HostKV`` with the host cache laid out slot-major, (slots, rows, heads, record): a
    layer's old slots travel in one copy per cache, and a decode step's new slot in one copy
    back, instead of one copy per row each way (which costs ~5 us of host time apiece).

    All host rows travel, finished ones too; once fewer than ``COMPACT_AT`` of them are live,
    the next pass writes each layer's live rows back densely (one extra layer-sized copy each)
    and the layout shrinks to the live rows. Live rows are gathered out of the staging area
    into the row-major device slot on the compute stream. Same contract as ``HostKV``.
    """

    COMPACT_AT = 0.75

    def __init__(
        self,
        config: ModelConfig,
        batch: int,
        slots: int,
        device: torch.device,
        dtype: torch.dtype,
        bits: int = 16,
        arena: HostArena | None = None,
        stream: torch.cuda.Stream | None = None,
    ):
        super().__init__(config, batch, slots, device, dtype, bits, arena, stream)
        self._max_slots = slots
        self._record = self._record_shape[2:]  # (heads, record)
        count, kind = math.prod(self._record_shape), self._kind
        # self._host: flat storage per layer and cache, viewed as (slots, rows, heads, record)
        # for the current number of host rows (it shrinks when the layout is compacted).
        self._incoming = [
            [torch.zeros(count, dtype=kind, device=device) for _ in range(2)] for _ in range(2)
        ]
        self._host_rows = [batch] * config.num_layers  # rows in each layer's layout
        self._positions = [list(range(batch)) for _ in range(config.num_layers)]
        self._compact = [False] * config.num_layers
        self._rewritten = [False] * config.num_layers  # re-encoded since the last export

    def _view(self, flat: torch.Tensor, rows: int, slots: int | None = None) -> torch.Tensor:
        heads, record = self._record
        slots = self._max_slots if slots is None else slots
        return flat[: slots * rows * heads * record].view(slots, rows, heads, record)

    def _fetch_copies(self, layer_idx: int, slot: int, start: int) -> None:
        """Every host row's slots ``0 .. start-1`` of ``layer_idx``: one copy per cache."""
        rows = self._host_rows[layer_idx]
        if start:
            for host, incoming in zip(self._host[layer_idx], self._incoming[slot], strict=True):
                self._copy(self._view(incoming, rows)[:start], self._view(host, rows)[:start])

    def _live(self, layer_idx: int) -> int:
        return len(self._positions[layer_idx])

    def _expand(self, layer_idx: int, slot: int, start: int) -> None:
        """Gather the live rows out of the slot-major staging into the row-major slot."""
        positions = self._positions[layer_idx]
        live, host_rows = len(positions), self._host_rows[layer_idx]
        keys = self._slots[slot][0]
        identity = live == host_rows and positions == list(range(live))
        index = None if identity else torch.tensor(positions, device=keys.device)
        for incoming, target in zip(self._incoming[slot], self._slots[slot], strict=True):
            staged = self._view(incoming, host_rows)[:start]
            for first, last in self._row_groups(live, start):
                picked = (
                    staged[:, first:last]
                    if index is None
                    else staged.index_select(1, index[first:last])
                )
                decode_kv(picked.transpose(0, 1), self._bits, target[first:last, :start])

    def stored(self, layer_idx: int, start: int, end: int) -> None:
        """Send the slots ``start .. end-1`` that layer ``layer_idx`` wrote back to RAM. They are
        encoded slot-major into this slot's staging area (free again once the layer's rows were
        expanded out of it), a group of rows at a time, and travel in one copy per cache when
        the rows span the layout (always for a decode step)."""
        slot = layer_idx % 2
        positions = self._positions[layer_idx]
        if self._compact[layer_idx]:
            self._write_dense(layer_idx, slot, end)
            return
        host_rows = self._host_rows[layer_idx]
        low, high = min(positions), max(positions) + 1
        count = end - start
        heads, record = self._record
        device = self._slots[slot][0].device
        gaps = positions != list(range(low, high))  # finished rows in between: scatter
        index = torch.tensor([p - low for p in positions], device=device) if gaps else None
        staged = []
        for incoming, values in zip(self._incoming[slot], self._slots[slot], strict=True):
            block = incoming[: count * (high - low) * heads * record].view(
                count, high - low, heads, record
            )
            for first, last in self._row_groups(len(positions), count):
                encoded = encode_kv(values[first:last, start:end], self._bits).transpose(0, 1)
                if index is None:
                    block[:, first:last] = encoded
                else:
                    block.index_copy_(1, index[first:last], encoded)
            staged.append(block)
        self._after_compute(slot)

        def work() -> None:
            for host, block in zip(self._host[layer_idx], staged, strict=True):
                target = self._view(host, host_rows)
                if count == 1 or (low == 0 and high == host_rows):
                    self._copy(target[start:end, low:high], block)
                else:  # rows finished at the layout's edges: one copy per position
                    for offset in range(count):
                        self._copy(target[start + offset, low:high], block[offset])
            self._sent_back(slot)

        self._on_copy_stream(work)

    def _write_dense(self, layer_idx: int, slot: int, end: int) -> None:
        """Write the live rows' slots ``0 .. end-1`` back densely: the layout shrinks to them."""
        live = len(self._positions[layer_idx])
        staged = []
        for incoming, values in zip(self._incoming[slot], self._slots[slot], strict=True):
            dense = self._view(incoming, live, end)  # the staging area is free again
            for first, last in self._row_groups(live, end):
                encoded = encode_kv(values[first:last, :end], self._bits)
                dense[:, first:last] = encoded.transpose(0, 1)
            staged.append(dense)
        self._after_compute(slot)

        def work() -> None:
            for host, dense in zip(self._host[layer_idx], staged, strict=True):
                self._copy(self._view(host, live, end), dense)
            self._sent_back(slot)

        self._on_copy_stream(work)
        self._host_rows[layer_idx] = live
        self._positions[layer_idx] = list(range(live))
        self._compact[layer_idx] = False
        # The old slots went through the device and back: re-encoded, maybe not to the same bits.
        self._rewritten[layer_idx] = True

    def keep(self, rows: list[int]) -> None:
        for layer_idx in range(self._layers):
            self._positions[layer_idx] = [self._positions[layer_idx][row] for row in rows]
            if len(rows) < self.COMPACT_AT * self._host_rows[layer_idx]:
                self._compact[layer_idx] = True

    def records(self, layer_idx: int, first: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        self.settle()
        rows = self._host_rows[layer_idx]
        index = torch.tensor(self._positions[layer_idx], dtype=torch.long)
        return tuple(
            self._view(host, rows)[first:end].index_select(1, index).transpose(0, 1)
            for host in self._host[layer_idx]
        )

    def load(
        self, layer_idx: int, rows: list[int], first: int, keys: torch.Tensor, values: torch.Tensor
    ) -> None:
        self.settle()
        end = first + keys.shape[1]
        positions = self._positions[layer_idx]
        index = torch.tensor([positions[row] for row in rows], dtype=torch.long)
        for host, source in zip(self._host[layer_idx], (keys, values), strict=True):
            self._view(host, self._host_rows[layer_idx])[first:end, index] = source.transpose(0, 1)

    def rewritten(self, layer_idx: int) -> bool:
        return self._rewritten[layer_idx]

    def exported(self) -> None:
        self._rewritten = [False] * self._layers

    def layout(self) -> dict:
        """Each layer's rows in the layout, the live rows' places in it, and whether its next
        pass compacts it (a compaction re-encodes the old slots: it must come at the same step)."""
        return {
            "host_rows": list(self._host_rows),
            "positions": [list(positions) for positions in self._positions],
            "compact": list(self._compact),
        }

    def set_layout(self, layout: dict) -> None:
        self._host_rows = [int(rows) for rows in layout["host_rows"]]
        self._positions = [[int(p) for p in positions] for positions in layout["positions"]]
        self._compact = [bool(flag) for flag in layout["compact"]]
