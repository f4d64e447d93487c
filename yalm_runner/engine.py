"""Prefill and decode over token ids for a whole batch, layer by layer.

The engine speaks token ids only: text stays with the tokenizer and the callers. A batch holds
prompts of different lengths, left-padded so that every row writes its next token into the same
cache slot; each row has its own rotary positions (0 at its BOS) and a mask that hides its
padding. Rows that finish (EOS or their own ``max_new_tokens``) leave the batch at once, so they
stop costing compute and cache traffic.

Weights come from a ``WeightSource`` (resident or streamed); the math comes from ``model``
unchanged. A request may carry ids it already generated (a resumed row): they are prefilled with
the prompt in one pass and the row goes on from there.

Batches can also be given as a plan (``run_batches``: ``batchstate.PlannedBatch``), each run
exactly as given, and the live batch's state goes out at checkpoints and comes back
(``batchstate``): a restored batch holds what the uninterrupted one held, bit for bit, and goes
on with the same next forward. ``arithmetic`` names what else shapes the numbers (device,
dtype, KV cache, prefill groups, weights' kernels, threads), so that a caller can tell whether a
saved plan can be replayed exactly.

Scoring (``score``) is the other use of a pass, ``scorepass.ScoringPass``'s: the engine
inherits it.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from yalm_runner import hostattn, model
from yalm_runner.batchstate import (
    SLOT_RULE,
    BatchCheckpoint,
    BatchRestore,
    KVDelta,
    PlannedBatch,
)
from yalm_runner.config import ModelConfig, SamplingParams
from yalm_runner.errors import ConfigError, GenerationError
from yalm_runner.kvcache import DeviceKV, HostArena, HostAttentionKV, HostKV, SlotMajorHostKV
from yalm_runner.kvformat import host_elements
from yalm_runner.offload import WeightSource
from yalm_runner.sampling import sample_next
from yalm_runner.scorepass import PAD_ID, ScoringPass
from yalm_runner.settings import check_offload_rules, check_setting
from yalm_runner.tokenizer import EOS_ID

if TYPE_CHECKING:  # the plan's type only: the engine runs plans, it does not make them
    from yalm_runner.planning import MemoryPlan


@dataclass(frozen=True)
class Request:
    """One row to generate. ``generated`` holds ids already produced before a resume."""

    key: str
    prompt_ids: tuple[int, ...]
    max_new_tokens: int
    generated: tuple[int, ...] = ()

    @property
    def remaining(self) -> int:
        return self.max_new_tokens - len(self.generated)


@dataclass(frozen=True)
class Finished:
    """A finished row: its new ids (EOS included when produced) and why it stopped."""

    key: str
    prompt_ids: tuple[int, ...]
    new_ids: tuple[int, ...]
    finish_reason: str  # "eos", "length" or "stop"


@dataclass
class GenerationStats:
    """What a ``generate`` call did and how long it took."""

    rows: int = 0
    prompt_tokens: int = 0
    new_tokens: int = 0
    forward_passes: int = 0
    prefill_s: float = 0.0
    decode_s: float = 0.0
    batch_sizes: list[int] = field(default_factory=list)
    bytes_moved: int = 0  # streamed weights and KV over the host-device link, both ways

    @property
    def tokens_per_s(self) -> float:
        elapsed = self.prefill_s + self.decode_s
        return self.new_tokens / elapsed if elapsed > 0 else 0.0

    def since(self, earlier: GenerationStats) -> GenerationStats:
        """The work done after ``earlier``, a copy of these totals taken before it."""
        left = Counter(earlier.batch_sizes)  # several engines' lists are concatenated: no prefix
        sizes = []
        for size in self.batch_sizes:
            if left[size]:
                left[size] -= 1
            else:
                sizes.append(size)
        return GenerationStats(
            rows=self.rows - earlier.rows,
            prompt_tokens=self.prompt_tokens - earlier.prompt_tokens,
            new_tokens=self.new_tokens - earlier.new_tokens,
            forward_passes=self.forward_passes - earlier.forward_passes,
            prefill_s=self.prefill_s - earlier.prefill_s,
            decode_s=self.decode_s - earlier.decode_s,
            batch_sizes=sizes,
            bytes_moved=self.bytes_moved - earlier.bytes_moved,
        )


@dataclass
class _Batch:
    """The rows in flight and their caches; every row's next token goes to slot ``length``."""

    requests: list[Request]
    generated: list[list[int]]
    pad: torch.Tensor  # (B,) left padding per row
    key_valid: torch.Tensor  # (B, S_max)
    kv: DeviceKV | HostKV
    length: int
    places: list[int]  # each row's place in the planned batch (rows only ever leave)
    exported: int = 0  # slots whose records went out in the last KV export

    def keep(self, rows: list[int]) -> None:
        index = torch.tensor(rows, device=self.pad.device, dtype=torch.long)
        self.places = [self.places[row] for row in rows]
        self.requests = [self.requests[row] for row in rows]
        self.generated = [self.generated[row] for row in rows]
        self.pad = self.pad[index]
        self.key_valid = self.key_valid[index]
        self.kv.keep(rows)


def request_problem(config: ModelConfig, request: Request) -> str | None:
    """Why ``request`` cannot run on a model of ``config``, or None when it can."""
    if not request.prompt_ids:
        return "empty prompt (it needs at least BOS)"
    if request.max_new_tokens < 1:
        return "max_new_tokens must be >= 1"
    bad = [token for token in request.prompt_ids if not 0 <= token < config.vocab_size]
    if bad:
        return f"token ids {bad[:5]} outside the vocabulary"
    if len(request.prompt_ids) + request.max_new_tokens > config.max_positions:
        return (
            f"{len(request.prompt_ids)} prompt tokens + {request.max_new_tokens} new tokens "
            f"exceed the model's {config.max_positions} positions"
        )
    return None


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class BatchRunner:
    """``generate`` over ``settle`` and ``run_batches``, which a subclass provides (``Engine``;
    ``multigpu.MultiEngine``, whose callbacks come from its device threads one at a time)."""

    def generate(
        self,
        requests: Iterable[Request],
        sampling: SamplingParams,
        *,
        batch_size: int = 32,
        on_finished: Callable[[Finished], None] | None = None,
        checkpoint_every: int = 0,
        on_checkpoint: Callable[[dict[str, tuple[int, ...]]], None] | None = None,
        stop: Callable[[Request, list[int]], bool] | None = None,
        on_step: Callable[[int], None] | None = None,
    ) -> list[Finished]:
        """Run every request; return the finished rows in request order: the rows a resume
        left unfinished, cut in order into batches of ``batch_size``, each run as planned.

        ``on_finished`` is called as each row finishes (in finishing order), so a caller can
        store it at once. Every ``checkpoint_every`` decode steps, ``on_checkpoint`` receives
        the ids generated so far by every row in flight (the state a resume needs; see
        ``snapshot``). ``stop(request, generated)`` may end a row early (a stop sequence, say);
        such a row finishes with reason ``"stop"``. ``on_step(new_tokens)`` follows every
        step's sampling with the tokens it added (one per row in flight): progress, not state;
        it must return at once.
        """
        pending = list(requests)
        finished, runnable = self.settle(pending, on_finished)
        batches = [
            PlannedBatch(index, tuple(runnable[start : start + batch_size]), sampling)
            for index, start in enumerate(range(0, len(runnable), batch_size))
        ]

        def keep(done: Finished) -> None:
            finished[done.key] = done
            if on_finished is not None:
                on_finished(done)

        self.run_batches(
            batches,
            on_finished=keep,
            checkpoint_every=checkpoint_every,
            on_checkpoint=None if on_checkpoint is None else lambda live: on_checkpoint(live.ids),
            stop=stop,
            on_step=on_step,
        )
        return [finished[request.key] for request in pending]


class Engine(BatchRunner, ScoringPass):
    """Generates token ids for batches of requests with the weights of one source."""

    def __init__(
        self,
        weights: WeightSource,
        eos_id: int = EOS_ID,
        kv_on: str = "gpu",
        kv_bits: int = 16,
        prefill_rows: int = 0,
        kv_layout: str = "rows",
        kv_attention: str = "device",
    ):
        if kv_on not in ("gpu", "cpu"):
            raise GenerationError(f"kv_on must be gpu or cpu, got {kv_on!r}")
        try:  # the settings' own rules, in their words
            check_setting("kv_attention", kv_attention)
            if kv_attention == "host":
                check_offload_rules(kv_bits, kv_on, kv_attention)
        except ConfigError as exc:
            raise GenerationError(str(exc)) from None
        if kv_attention == "host":
            if not hostattn.available():
                raise GenerationError(
                    f"attention on the host is unavailable: {hostattn.unavailable_reason()}"
                )
            kv_layout = "rows"  # the host attention cache is row-major
        self.kv_attention = kv_attention
        # The host's cores the attention kernel takes (None: all of torch's threads);
        # ``MultiEngine`` gives each engine its share, so that they do not fight over them.
        self.host_threads: int | None = None
        # How its decode steps move q/k/v and the output (``HostAttentionKV``'s ``moves``).
        self.host_moves = "auto"
        self.weights = weights
        self.kv_on = kv_on
        self.kv_bits = kv_bits
        self.kv_layout = kv_layout
        self.prefill_rows = prefill_rows  # 0: prefill every row of a batch as one group
        self.config = weights.config
        self.device = weights.device
        self.dtype = weights.dtype
        self.eos_id = eos_id
        self.rotary = model.Rotary.build(self.config, self.device, self.dtype)
        self.stats = GenerationStats()
        self._live: _Batch | None = None
        self._cancelled = False
        # Pinned KV memory, kept from batch to batch (locking it is slow).
        self._arena = HostArena(self.config.num_layers, pin=self.device.type == "cuda")

    @classmethod
    def for_plan(
        cls, weights: WeightSource, plan: MemoryPlan, kv_bits: int, eos_id: int = EOS_ID
    ) -> Engine:
        """An engine that runs ``plan`` (a ``planning.MemoryPlan``): its KV cache's place and
        layout and its prefill groups, the cache kept in ``kv_bits`` (the policy's width)."""
        return cls(
            weights,
            eos_id=eos_id,
            kv_on=plan.kv_on,
            kv_bits=kv_bits,
            prefill_rows=plan.prefill_rows,
            kv_layout=plan.kv_layout,
            kv_attention=plan.kv_attention,
        )

    def reserve(self, rows: int, slots: int) -> None:
        """Lock the pinned KV memory for batches up to ``rows`` x ``slots`` now, not in the
        first batch (a no-op when the KV cache lives on the device)."""
        if self.kv_on == "cpu":
            self._arena.take(*host_elements(self.config, rows, slots, self.kv_bits, self.dtype))

    def cancel(self) -> None:
        """Make a ``generate`` running in another thread stop at its next step."""
        self._cancelled = True

    @property
    def kv_stored_bits(self) -> int:
        """The width the KV cache is kept in between steps: 16, or 8/4 when the pinned-RAM
        cache is kept compressed (lossy: the ids depend on it)."""
        return self.kv_bits if self.kv_on == "cpu" else 16

    @property
    def arithmetic(self) -> dict[str, Any]:
        """What shapes this engine's numbers besides the model and the batches, in words: the
        same batches on an engine that says the same give the same bits."""
        device = self.device.type
        if device == "cuda":
            device += f" ({torch.cuda.get_device_name(self.device)})"
        if self.kv_on == "gpu":
            kv = "on the device"
        else:
            kv = f"in host RAM, {self.kv_bits}-bit, {self.kv_layout}-major"
            if self.kv_attention == "host":
                kv += ", decode attention on the host"
        quantization = getattr(self.weights, "quantization", None)
        weights = "as stored" if quantization is None else quantization.scheme
        if quantization is not None and quantization.scheme == "int4":
            from yalm_runner import quant  # the fused kernel's switch and its availability

            fused = quant.USE_FUSED_KERNEL and device.startswith("cuda")
            fused = fused and quant.fused_int4_available()
            weights += f" g{quantization.group_size}, " + ("fused kernel" if fused else "torch")
        facts: dict[str, Any] = {
            "device": device,
            "dtype": str(self.dtype).removeprefix("torch."),
            "KV cache": kv,
            "prefill group rows": self.prefill_rows,
            "weights": weights,
            "slot rule": SLOT_RULE,
            "torch": torch.__version__,
        }
        if self.device.type == "cpu":
            facts["CPU threads"] = torch.get_num_threads()  # they split some reductions
        else:  # process-wide switches of cuBLAS's reduced-precision paths
            reduced = torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction
            facts["matmul precision"] = f"fp32 {torch.get_float32_matmul_precision()}, " + (
                "bf16 reduced-precision reductions" if reduced else "bf16 full reductions"
            )
        return facts

    def check(self, request: Request) -> None:
        """Raise ``GenerationError`` if ``request`` cannot run on this model."""
        problem = request_problem(self.config, request)
        if problem:
            raise GenerationError(f"row {request.key}: {problem}")

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
        """Run each batch exactly as planned (its rows, their order, the ids each starts from),
        from its start or from its ``restore`` state.

        ``on_finished`` gets each row as it finishes; every ``checkpoint_every`` decode steps
        ``on_checkpoint`` gets the live batch (``BatchCheckpoint``: its ids, and its KV records
        on request); ``on_batch_done`` gets a batch's index once its last row has finished;
        ``on_step`` as in ``generate``.
        """
        for planned in batches:
            for done in self._run_batch(planned, checkpoint_every, on_checkpoint, stop, on_step):
                if on_finished is not None:
                    on_finished(done)
            if on_batch_done is not None:
                on_batch_done(planned.index)

    def settle(
        self, requests: list[Request], on_finished: Callable[[Finished], None] | None = None
    ) -> tuple[dict[str, Finished], list[Request]]:
        """Check every request; finish those a resume left complete; return them and the rest
        (in order: the batches are cut from that list)."""
        for request in requests:
            self.check(request)
        finished: dict[str, Finished] = {}
        for request in requests:
            ended = request.generated and request.generated[-1] == self.eos_id
            if request.remaining <= 0 or ended:
                reason = "eos" if ended else "length"
                done = Finished(request.key, request.prompt_ids, request.generated, reason)
                finished[request.key] = done
                if on_finished is not None:
                    on_finished(done)
        return finished, [request for request in requests if request.key not in finished]

    def snapshot(self) -> dict[str, tuple[int, ...]]:
        """The ids generated so far by each row in flight; safe to call from a signal handler."""
        live = self._live
        if live is None:
            return {}
        return {
            request.key: tuple(generated)
            for request, generated in zip(live.requests, live.generated, strict=True)
        }

    @torch.inference_mode()
    def _run_batch(
        self,
        planned: PlannedBatch,
        checkpoint_every: int = 0,
        on_checkpoint: Callable[[BatchCheckpoint], None] | None = None,
        stop: Callable[[Request, list[int]], bool] | None = None,
        on_step: Callable[[int], None] | None = None,
    ) -> Iterable[Finished]:
        config, device = self.config, self.device
        requests, sampling, restore = list(planned.requests), planned.sampling, planned.restore
        contexts = [list(request.prompt_ids) + list(request.generated) for request in requests]
        lengths = [len(context) for context in contexts]
        prompt_len = max(lengths)
        slots = prompt_len + max(request.remaining for request in requests)  # SLOT_RULE
        batch = len(requests)
        self.stats.batch_sizes.append(batch)

        pad = torch.tensor([prompt_len - length for length in lengths], device=device)
        tokens = torch.full((batch, prompt_len), PAD_ID, dtype=torch.long)
        for row, context in enumerate(contexts):
            tokens[row, prompt_len - len(context) :] = torch.tensor(context)
        slot_index = torch.arange(slots, device=device)
        key_valid = slot_index[None, :] >= pad[:, None]
        key_valid[:, prompt_len:] = False
        if self.kv_on == "cpu":
            host_type = SlotMajorHostKV if self.kv_layout == "slots" else HostKV
            extra = {}
            if self.kv_attention == "host":  # device slots for the prefill alone
                host_type = HostAttentionKV
                extra = {
                    "prefill_slots": prompt_len,
                    "threads": self.host_threads,
                    "moves": self.host_moves,
                }
            kv = host_type(
                config,
                batch,
                slots,
                device,
                self.dtype,
                bits=self.kv_bits,
                arena=self._arena,
                stream=getattr(self.weights, "copy_stream", None),
                **extra,
            )
        else:
            kv = DeviceKV(config, batch, slots, device, self.dtype)
        state = _Batch(
            list(requests),
            [list(request.generated) for request in requests],
            pad,
            key_valid,
            kv,
            0,
            list(range(batch)),
        )
        self._live = state
        streamed_before = getattr(self.weights, "bytes_streamed", 0)

        began = taken_up = time.perf_counter()
        if restore is None:
            self.stats.rows += batch
            self.stats.prompt_tokens += sum(lengths)
            logits = self._forward(state, tokens.to(device))
            _synchronize(device)
            self.stats.prefill_s += time.perf_counter() - began
            began = time.perf_counter()
            step = 0
        else:
            self._restore(state, restore, prompt_len)
            self.stats.rows += len(restore.rows)
            step = restore.step
            # The forward the uninterrupted batch made right after this checkpoint.
            last = [generated[-1] for generated in state.generated]
            logits = self._forward(state, torch.tensor(last, device=device).unsqueeze(1))
        while True:
            steps = [len(generated) for generated in state.generated]
            next_ids = sample_next(
                logits, sampling, [r.key for r in state.requests], steps
            ).tolist()
            keep, done = [], []
            for row, token in enumerate(next_ids):
                state.generated[row].append(token)
                self.stats.new_tokens += 1
                request = state.requests[row]
                if token == self.eos_id:
                    reason = "eos"
                elif len(state.generated[row]) >= request.max_new_tokens:
                    reason = "length"
                elif stop is not None and stop(request, state.generated[row]):
                    reason = "stop"
                else:
                    reason = ""
                if reason:
                    done.append(
                        Finished(
                            request.key, request.prompt_ids, tuple(state.generated[row]), reason
                        )
                    )
                else:
                    keep.append(row)
            if on_step is not None:
                on_step(len(next_ids))
            if len(keep) < len(next_ids):
                next_ids = [next_ids[row] for row in keep]
                state.keep(keep)
            yield from done
            if not keep:
                break
            if self._cancelled:
                raise GenerationError("generation cancelled")
            step += 1
            if checkpoint_every and on_checkpoint is not None and step % checkpoint_every == 0:
                on_checkpoint(self._checkpoint(planned.index, step, state, taken_up))
            step_tokens = torch.tensor(next_ids, device=device).unsqueeze(1)  # (B, 1)
            logits = self._forward(state, step_tokens)
        self._live = None
        _synchronize(device)
        self.stats.decode_s += time.perf_counter() - began
        streamed = getattr(self.weights, "bytes_streamed", 0)
        self.stats.bytes_moved += state.kv.bytes_moved + streamed - streamed_before

    def _checkpoint(self, index: int, step: int, state: _Batch, began_s: float) -> BatchCheckpoint:
        """The live batch at the top of a step, with its KV export (see ``batchstate``)."""
        ids = {
            request.key: tuple(generated)
            for request, generated in zip(state.requests, state.generated, strict=True)
        }

        def export() -> KVDelta:
            kv, length = state.kv, state.length
            firsts = tuple(
                0 if kv.rewritten(layer_idx) else state.exported
                for layer_idx in range(self.config.num_layers)
            )
            state.exported = length
            kv.exported()
            sample, _ = kv.records(0, length, length)  # no slots: its shape and width
            return KVDelta(
                tuple(state.places),
                length,
                firsts,
                tuple(sample.shape[2:]),
                sample.dtype,
                lambda layer_idx: kv.records(layer_idx, firsts[layer_idx], length),
            )

        return BatchCheckpoint(
            index, step, state.length, tuple(state.places), ids, state.kv.layout(), began_s, export
        )

    def _restore(self, state: _Batch, restore: BatchRestore, prompt_len: int) -> None:
        """Make the freshly built ``state`` what the batch was at ``restore``'s checkpoint: its
        live rows and their ids, the slots written, the cache's layout and records. The rows'
        padding, masks and slot count come from the plan, as they did the first time."""
        batch = len(state.requests)
        assert restore.rows and all(0 <= row < batch for row in restore.rows), restore.rows
        assert prompt_len <= restore.length <= state.key_valid.shape[1], restore.length
        state.keep(list(restore.rows))
        state.generated = [list(ids) for ids in restore.generated]
        decoded = torch.arange(prompt_len, restore.length, device=self.device)
        state.key_valid[:, prompt_len : restore.length] = (
            decoded[None, :] >= state.pad[:, None]
        )  # what each decode forward set
        state.length = state.exported = restore.length
        state.kv.set_layout(restore.layout)
        place = {row: position for position, row in enumerate(restore.rows)}
        for delta in restore.deltas():
            picked = [index for index, row in enumerate(delta.rows) if row in place]
            targets = [place[delta.rows[index]] for index in picked]
            for layer_idx, first in enumerate(delta.firsts):
                keys, values = delta.read(layer_idx)
                if len(picked) < len(delta.rows):
                    chosen = torch.tensor(picked, dtype=torch.long)
                    keys, values = keys.index_select(0, chosen), values.index_select(0, chosen)
                state.kv.load(layer_idx, targets, first, keys, values)
        state.kv.exported()

    def _decode_on_host(
        self, state: _Batch, hidden: list[torch.Tensor], positions: torch.Tensor, valid
    ) -> None:
        """A decode step whose attention runs on the host (``HostAttentionKV``): each layer's
        queries, keys and values on the device, attention where the cache lies, the rest of
        the layer on the device again."""
        (h,) = hidden
        start = state.length
        for layer_idx, weights in self.weights.layers():
            query, key, value = model.attention_inputs(
                h, weights, self.config, self.rotary, positions
            )
            context = state.kv.attend(layer_idx, start, query, key, value, valid)
            h = model.block_output(h, context, weights, self.config)
        hidden[0] = h

    def _forward(self, state: _Batch, tokens: torch.Tensor) -> torch.Tensor:
        """Run ``tokens`` (B, T) at slots ``state.length ..``; return last-position logits.

        One pass over the weights, layer by layer, for the whole batch. A prefill of more than
        ``prefill_rows`` rows runs each layer over groups of rows in turn, so that its
        activations fit the GPU budget the plan gave them; only the groups' hidden states wait
        on the device between layers, and every layer is still loaded once."""
        batch, num_new = tokens.shape
        start = state.length
        end = start + num_new
        state.key_valid[:, start:end] |= (
            torch.arange(start, end, device=self.device)[None, :] >= state.pad[:, None]
        )
        size = batch if num_new == 1 or not self.prefill_rows else self.prefill_rows
        groups = [slice(first, min(first + size, batch)) for first in range(0, batch, size)]
        positions = (
            torch.arange(start, end, device=self.device)[None, :] - state.pad[:, None]
        ).clamp(min=0)  # (B, T)
        valid = state.key_valid[:, :end]
        embedding = self.weights.embedding()
        hidden = [model.embed(tokens[rows], embedding, self.config) for rows in groups]
        if num_new == 1 and isinstance(state.kv, HostAttentionKV):
            self._decode_on_host(state, hidden, positions, valid[:, :start].cpu())
        else:
            masks = [model.attention_mask(valid[rows], start, num_new) for rows in groups]
            for layer_idx, weights in self.weights.layers():
                keys, values = state.kv.layer(layer_idx, start)
                for group, rows in enumerate(groups):
                    hidden[group] = model.block(
                        hidden[group], weights, self.config, self.rotary, positions[rows],
                        keys[rows], values[rows], start, masks[group],
                    )  # fmt: skip
                state.kv.stored(layer_idx, start, end)
        self.stats.forward_passes += 1
        state.length = end
        head = self.weights.head()
        words = embedding["word_embeddings.weight"]
        if len(groups) == 1:
            return model.head(hidden[0][:, -1], head, words, self.config)
        # Each group's logits land in the batch's as they come, and its hidden states go: the
        # batch's logits are held once, not once in pieces and again concatenated.
        logits = torch.empty(batch, self.config.vocab_size, device=self.device)
        for group, rows in enumerate(groups):
            logits[rows] = model.head(hidden[group][:, -1], head, words, self.config)
            hidden[group] = None
        return logits
