"""A batch in flight as data: what the engine hands out at a checkpoint and takes back to go on.

Exact resume rests on two facts: a batch holds the same rows in the same order whenever it
runs (the job's recorded plan), and a batch restored from its saved state holds what the
uninterrupted batch held at that point, bit for bit. This module owns the small records the
engine's state API speaks (``engine.Engine.run_batches``):

- ``PlannedBatch``: one batch of a job's plan, its rows in order (each with the ids it starts
  from), its sampling, and the state to restore it from (None: run it from its start).
- ``BatchCheckpoint``: the live batch at an ids checkpoint, at the top of a decode step (after
  sampling and dropping finished rows, before the next forward): its rows, their ids, the
  cache's layout, and ``kv_delta()``.
- ``KVDelta``: what the batch's KV cache gained since its last export, for the rows live now,
  read lazily one layer at a time (a batch's cache can be tens of GB).
- ``BatchRestore``: a batch as a KV checkpoint left it, with every delta since the batch began.

Rows are named by their place in the planned batch (0 .. B-1), which never changes while rows
leave. This module knows nothing of files (``kvstate`` writes these records), of jobs or sinks.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

from yalm_runner.config import SamplingParams

# The engine's rule for a batch's slot count: the longest prompt (with its start ids) plus the
# most new tokens any row still needs. It is part of the arithmetic a plan was recorded under.
SLOT_RULE = "longest prompt + most remaining"


@dataclass(frozen=True)
class PlannedBatch:
    """One batch of a plan. ``requests`` carry the ids each row starts from (``generated``)."""

    index: int  # the batch's place in the job's plan: how its saved state is found
    requests: tuple[Any, ...]  # engine.Request, in the plan's order
    sampling: SamplingParams
    restore: BatchRestore | None = None


@dataclass(frozen=True)
class KVDelta:
    """Records of slots ``firsts[layer] .. length-1`` of every layer for ``rows``, in the width
    the cache keeps them. ``read(layer)`` gives keys and values, each (rows, slots, *record)
    on the CPU; it is valid only until the batch's next forward."""

    rows: tuple[int, ...]
    length: int
    firsts: tuple[int, ...]  # per layer: 0 for a layer re-encoded since the last export
    record_shape: tuple[int, ...]  # one slot of one row: (NH, D), or (NH, record bytes)
    dtype: torch.dtype
    read: Callable[[int], tuple[torch.Tensor, torch.Tensor]]

    def layer_bytes(self, layer_idx: int) -> int:
        """Bytes of one layer's keys (or values) in this delta."""
        slots = self.length - self.firsts[layer_idx]
        element = torch.empty((), dtype=self.dtype).element_size()
        return len(self.rows) * slots * math.prod(self.record_shape) * element

    @property
    def nbytes(self) -> int:
        return sum(2 * self.layer_bytes(layer) for layer in range(len(self.firsts)))


@dataclass(frozen=True)
class BatchRestore:
    """A planned batch as one of its KV checkpoints left it: the engine rebuilds the batch,
    keeps ``rows``, loads every delta in order (a later one overwrites what it re-encoded) and
    goes on with the forward of ``generated``'s last ids, as the uninterrupted batch did."""

    step: int  # decode steps the batch had taken (the checkpoint schedule goes on from it)
    length: int  # cache slots written
    rows: tuple[int, ...]  # the live rows, as places in the planned batch
    generated: tuple[tuple[int, ...], ...]  # their ids so far (the last one not yet fed)
    layout: dict
    deltas: Callable[[], Iterator[KVDelta]]  # every delta since the batch began, oldest first


@dataclass(frozen=True)
class BatchCheckpoint:
    """The live batch at an ids checkpoint, as the engine hands it to ``on_checkpoint``."""

    index: int
    step: int
    length: int
    rows: tuple[int, ...]
    ids: dict[str, tuple[int, ...]]  # each live row's ids so far, in the rows' order
    layout: dict
    began_s: float  # perf_counter() when this run took the batch up (started or restored it)
    export: Callable[[], KVDelta]

    def kv_delta(self) -> KVDelta:
        """The cache's records gained since the last export (the first: everything); the next
        export starts from here, so a delta must be kept once asked for."""
        return self.export()
