"""Several GPUs in one host: each streams the weights over its own link for its share of batches.

Offloaded decoding is bound by the host-to-device link: one step costs the streamed bytes over
the link's bandwidth, whatever the batch. A second GPU brings a second link. ``MultiEngine`` cuts
the requests into batches exactly as one ``Engine`` would and runs batch k on device k mod n, one
thread per device (the GIL is released while CUDA works and while copies fly). Every device
streams from the same pinned host copy of the weights (``StreamingWeights(share_pinned=...)``).

Because a batch holds the same rows in the same order whichever device runs it, and sampling
depends only on (seed, row key, step), the output is identical to one GPU's, token for token,
on GPUs of one model. Throughput grows with the number of links when there are at least as many
batches as devices: a night's prompts beyond what one batch holds.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable

import torch

from yalm_runner.batchstate import BatchCheckpoint, PlannedBatch
from yalm_runner.engine import BatchRunner, Engine, Finished, GenerationStats, Request
from yalm_runner.packing import Scored, ScoreRequest


class MultiEngine(BatchRunner):
    """``Engine``'s interface over one engine per device (``generate`` is ``BatchRunner``'s: its
    callbacks come from the device threads, one at a time)."""

    def __init__(self, engines: list[Engine]):
        if not engines:
            raise ValueError("MultiEngine needs at least one engine")
        self.engines = engines
        # Engines that attend on the host share its cores (each would otherwise take them all
        # and the kernels would fight over them): an equal share each.
        attending = [engine for engine in engines if engine.kv_attention == "host"]
        for engine in attending:
            engine.host_threads = max(1, torch.get_num_threads() // len(attending))
        self.config = engines[0].config
        self.device = engines[0].device
        self.dtype = engines[0].dtype
        self._lock = threading.Lock()
        self._wall_s = 0.0

    @property
    def kv_stored_bits(self) -> int:
        return self.engines[0].kv_stored_bits

    @property
    def arithmetic(self) -> dict:
        """The first engine's, naming every device: a batch's bits are the same on any of
        them only when they are GPUs of one model."""
        facts = dict(self.engines[0].arithmetic)
        facts["device"] = ", ".join(engine.arithmetic["device"] for engine in self.engines)
        return facts

    def check(self, request: Request) -> None:
        self.engines[0].check(request)

    def settle(self, requests: list[Request], on_finished=None):
        return self.engines[0].settle(requests, on_finished)

    def check_score(self, request: ScoreRequest) -> None:
        self.engines[0].check_score(request)

    def cancel(self) -> None:
        for engine in self.engines:
            engine.cancel()

    @property
    def stats(self) -> GenerationStats:
        """The engines' counts added up; times are wall-clock, split as the engines' were."""
        total = GenerationStats()
        for engine in self.engines:
            part = engine.stats
            total.rows += part.rows
            total.prompt_tokens += part.prompt_tokens
            total.new_tokens += part.new_tokens
            total.forward_passes += part.forward_passes
            total.batch_sizes += part.batch_sizes
            total.bytes_moved += part.bytes_moved
        busy = sum(e.stats.prefill_s + e.stats.decode_s for e in self.engines)
        prefill = sum(e.stats.prefill_s for e in self.engines)
        share = prefill / busy if busy else 0.0
        total.prefill_s = self._wall_s * share
        total.decode_s = self._wall_s - total.prefill_s
        return total

    def snapshot(self) -> dict[str, tuple[int, ...]]:
        merged: dict[str, tuple[int, ...]] = {}
        for engine in self.engines:
            merged.update(engine.snapshot())
        return merged

    def run_batches(
        self,
        batches: Iterable[PlannedBatch],
        *,
        on_finished: Callable[[Finished], None] | None = None,
        checkpoint_every: int = 0,
        on_checkpoint: Callable[[BatchCheckpoint], None] | None = None,
        on_batch_done: Callable[[int], None] | None = None,
        stop: Callable[[Request, list[int]], bool] | None = None,
        on_step: Callable[[int], None] | None = None,
    ) -> None:
        """As ``Engine.run_batches``: the k-th batch given runs on device k mod n, each exactly
        as planned (a batch is the same on any device), callbacks one at a time."""
        planned = list(batches)
        shares = [planned[index :: len(self.engines)] for index in range(len(self.engines))]

        def work(engine: Engine, share: list[PlannedBatch]) -> None:
            engine.run_batches(
                share,
                on_finished=self._locked(on_finished),
                checkpoint_every=checkpoint_every,
                on_checkpoint=self._locked(on_checkpoint),
                on_batch_done=self._locked(on_batch_done),
                stop=self._locked(stop),
                on_step=self._locked(on_step),
            )

        self._on_every_device(shares, work)

    def _locked(self, callback):
        """``callback`` made to run one call at a time across the device threads."""
        if callback is None:
            return None

        def call(*args):
            with self._lock:
                return callback(*args)

        return call

    def _deal(self, rows: list, batch_size: int) -> list[list]:
        """Each device's rows: batch k goes to device k mod n."""
        batches = [rows[start : start + batch_size] for start in range(0, len(rows), batch_size)]
        count = len(self.engines)
        return [[row for batch in batches[index::count] for row in batch] for index in range(count)]

    def _on_every_device(self, shares: list[list], work: Callable[[Engine, list], None]) -> None:
        """``work(engine, share)`` for each device that has a share, each in its own thread;
        the first error of any device stops the others and is raised here."""
        errors: list[BaseException] = []

        def guarded(engine: Engine, share: list) -> None:
            try:
                work(engine, share)
            except BaseException as exc:  # handed to the calling thread below
                errors.append(exc)
                self.cancel()

        threads = [
            threading.Thread(target=guarded, args=(engine, share), name=f"yalm-{engine.device}")
            for engine, share in zip(self.engines, shares, strict=True)
            if share
        ]
        began = time.perf_counter()
        try:
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
        except BaseException:
            # A signal in the calling thread (SIGINT, SIGTERM): stop the devices, then let the
            # caller save what they hold.
            self.cancel()
            for thread in threads:
                thread.join()
            raise
        finally:
            self._wall_s += time.perf_counter() - began
        if errors:
            raise errors[0]

    def score(
        self,
        requests: Iterable[ScoreRequest],
        *,
        batch_size: int,
        group_rows: int = 0,
        on_scored: Callable[[Scored], None] | None = None,
    ) -> list[Scored]:
        """As ``Engine.score``: batch k on device k mod n; ``on_scored`` one call at a time."""
        pending = list(requests)
        for request in pending:
            self.check_score(request)
        shares = self._deal(pending, batch_size)
        results: dict[str, Scored] = {}

        def scored(result: Scored) -> None:
            with self._lock:
                results[result.key] = result
                if on_scored is not None:
                    on_scored(result)

        def work(engine: Engine, share: list[ScoreRequest]) -> None:
            engine.score(share, batch_size=batch_size, group_rows=group_rows, on_scored=scored)

        self._on_every_device(shares, work)
        return [results[request.key] for request in pending]
