"""How long one pass over the layers takes: the step-time model behind the planner's predictions.

A decode step is a pipeline of three stages per layer, and the step is as slow as its busiest
stage plus what nothing hides at its two ends:

- **arrival**: the layer's streamed weights and its live rows' old keys and values cross the
  host-to-device link (one link, shared), and the KV cache's copies are issued one call at a time
  from Python on one copy stream (row-major: a call per row, cache and direction; slot-major: one
  per cache and direction): the KV copy stream costs its bytes over the link plus a fixed cost
  per call (the host issuing it and the copy engine running it, as they overlap at a run's
  sizes); a disk-tier layer is first read from the drive by the reader thread, one layer after
  another, at most two layers ahead (two relay buffers);
- **device work**: the layer's math (its matmuls, its attention over the cache, a compressed
  store's dequantization) and, for a pinned-RAM cache, expanding the old records into the 16-bit
  device slot and encoding the new slot;
- **host attention** (a cache attended on the host, ``hostattn``): between the layer's q/k/v
  and the rest of its math the device waits while the step's queries, keys and values go out,
  the host's cores read the layer's records, and the output comes back: it adds to the
  layer's device work, and the cache crosses no link;
- and a layer's arrival may start only once the device is done with the layer two back (two
  device slots), while its work starts only once it has arrived and the layer before is done.

``predict_pass`` walks the layers through exactly these rules (a max for every wait, a sum for
every piece of work), so the busiest stage sets the pace, the first layer's arrival and the last
layer's device work show once, and layers in different tiers mix correctly. What the pass
moves and computes (``PassWork``) is counted from the plan; the rates (``StepRates``) are
measured in the same run where a device exists (``yalm_runner.bench.calibrate``), or are the
defaults below. This module knows nothing of devices, streams or files, and nothing of the
caches' code: it counts what the plan implies and applies rates.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields, replace

from yalm_runner.config import ModelConfig
from yalm_runner.errors import ConfigError
from yalm_runner.kvformat import kv_bytes_per_token

# The KV record widths and host layouts whose device-side expansion costs time, named as
# ``codec_key`` names them. A 16-bit row-major cache lands in the device slot as it is: no key.
CODEC_KEYS = ("16/slots", "8/rows", "8/slots", "4/rows", "4/slots")


def _codec_defaults() -> dict[str, float]:
    # Elements (keys and values counted apart) expanded or encoded per second on the device by
    # the fused KV kernel (``kernels.fused_kv_decode``), as the H200 measured them through the
    # caches' own code in session 8 (docs/benchmarks.md, "The step-time model").
    return {
        "16/slots": 300e9,
        "8/rows": 150e9,
        "8/slots": 170e9,
        "4/rows": 150e9,
        "4/slots": 140e9,
    }


@dataclass(frozen=True)
class StepRates:
    """The rates the model multiplies by. The link and the drive default to the planner's
    machine class (PCIe 4 x16, an NVMe drive); the device-side rates default to what an H200
    measured, since none of them can be known without a device (a smaller GPU is slower at
    every one of them). Calibration measures all but the overheads (``bench.link`` the link,
    ``bench.calibrate`` the rest)."""

    link_bytes_per_s: float = 25e9  # pinned host-to-device
    disk_bytes_per_s: float = 3e9  # the drive, read as the streamer reads it (reads in flight)
    # What one KV copy issued from Python costs a row-major cache's copy stream beyond its
    # bytes: the slicing, the call and its bookkeeping on the host, and the copy engine's own
    # cost per copy, as they overlap. Fitted on the H200's host; it varies with that host's load
    # by +-20% from run to run (docs/benchmarks.md, "The step-time model").
    copy_call_s: float = 10.5e-6
    codec_elements_per_s: dict[str, float] = field(default_factory=_codec_defaults)
    matmul_flops_per_s: float = 400e12  # bf16 matmuls at decode batch sizes
    device_bytes_per_s: float = 3e12  # device memory, as attention reads the cache
    dequant_elements_per_s: float = 530e9  # a compressed matrix dequantized (the fused kernel)
    # What a step costs beside its layers: the head, sampling, the synchronisation, the engine's
    # per-row bookkeeping in Python and the gaps between launches. Fitted on the H200 (it cannot
    # be measured apart from a whole step); not calibrated.
    step_overhead_s: float = 5.5e-3
    row_overhead_s: float = 7.4e-6
    # Decode attention on the host (``hostattn``): KV elements (keys and values apart) its cores
    # read per second, and what each layer's call costs beside (the device's synchronisation,
    # the staging moves' launches, the encoding launches; estimated, not measured). The lent
    # H200's 16 host cores gave 55-72 G while the link streamed weights flat out (session 11;
    # 4-6 G a core); the default is a desktop's 8 cores at ~4 G each, an estimate: calibrate it
    # on the machine (``bench.calibrate``).
    host_attention_elements_per_s: float = 30e9
    host_call_s: float = 150e-6

    def codec_rate(self, key: str) -> float:
        return self.codec_elements_per_s[key]

    def to_dict(self) -> dict[str, object]:
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        values["codec_elements_per_s"] = dict(self.codec_elements_per_s)
        return values

    @classmethod
    def from_dict(cls, data: object, source: str = "rates") -> StepRates:
        """Rates as ``to_dict`` writes them (a bench's JSON): missing ones keep their defaults;
        an unknown name or a rate that is not a positive number is a ``ConfigError`` naming
        it and ``source``."""
        if not isinstance(data, dict):
            raise ConfigError(f"{source}: rates must be a mapping, got {type(data).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"{source}: unknown rates {unknown}; known: {sorted(known)}")
        values = dict(data)
        codec = values.pop("codec_elements_per_s", {})
        if not isinstance(codec, dict):
            raise ConfigError(f"{source}: codec_elements_per_s must be a mapping of rates")
        wrong = sorted(set(codec) - set(CODEC_KEYS))
        if wrong:
            raise ConfigError(
                f"{source}: codec_elements_per_s: unknown widths/layouts {wrong}; known: "
                f"{list(CODEC_KEYS)}"
            )
        for name, value in [*values.items(), *(("codec " + k, v) for k, v in codec.items())]:
            number = isinstance(value, (int, float)) and not isinstance(value, bool)
            if not (number and math.isfinite(value) and value > 0):
                raise ConfigError(f"{source}: {name} must be a positive number, got {value!r}")
        rates = cls(**{name: float(value) for name, value in values.items()})
        for key, value in codec.items():
            rates = rates.with_codec(key, float(value))
        return rates

    def with_codec(self, key: str, elements_per_s: float) -> StepRates:
        """These rates with one codec rate replaced (a calibrated one)."""
        rates = {**self.codec_elements_per_s, key: elements_per_s}
        return replace(self, codec_elements_per_s=rates)


@dataclass(frozen=True)
class PassWork:
    """What one pass over the layers moves and computes, per layer (every layer alike but for
    its tier). Counted from a plan by ``decode_work`` and ``prefill_work``."""

    rows: int
    context: float  # positions each row's attention reads (a prefill: its prompt)
    tiers: tuple[str, ...]  # per layer: gpu (resident), cpu (pinned RAM) or disk
    layer_bytes: tuple[int, ...]  # per layer: bytes it streams over the link (0 if resident)
    kv_in_bytes: float  # per layer: old keys and values fetched to the device
    kv_out_bytes: float  # per layer: new keys and values sent back to RAM
    copy_calls: int  # per layer: KV copies issued from Python, both directions
    codec_key: str | None  # which codec rate expands/encodes this cache (None: no such work)
    codec_elements: float  # per layer: elements expanded and encoded on the device
    flops: float  # per layer: matmul and attention arithmetic
    device_bytes: float  # per layer: the cache bytes attention reads on the device
    dequant_elements: float  # per layer: compressed weights dequantized (0: a 16-bit store)
    # Attention on the host, per layer: KV elements its cores read, the bytes the step stages
    # through the link (queries, keys, values and the output), its calls (0 or 1).
    host_elements: float = 0.0
    host_bytes: float = 0.0
    host_calls: int = 0


@dataclass(frozen=True)
class PassTime:
    """A predicted pass: its total and each resource's busy time (their sum is not the total:
    the stages overlap)."""

    total_s: float
    link_s: float
    disk_s: float
    copy_calls_s: float
    codec_s: float
    compute_s: float
    overhead_s: float
    host_s: float = 0.0

    @property
    def bound(self) -> str:
        """The busiest resource: what to buy more of."""
        busy = {
            "the link": self.link_s,
            "the drive": self.disk_s,
            "KV copy calls": self.copy_calls_s,
            "device work": self.codec_s + self.compute_s,
        }
        if self.host_s:  # the device waits for the host's attention: one chain
            busy["device work and host attention"] = busy.pop("device work") + self.host_s
        return max(busy, key=busy.__getitem__)


def predict_pass(work: PassWork, rates: StepRates) -> PassTime:
    """Walk the layers through the pipeline's rules (module docstring); return the pass time."""
    link_bps, disk_bps = rates.link_bytes_per_s, rates.disk_bytes_per_s
    codec_rate = rates.codec_rate(work.codec_key) if work.codec_key else 0.0
    codec_s = work.codec_elements / codec_rate if codec_rate else 0.0
    compute_s = (
        work.flops / rates.matmul_flops_per_s
        + work.device_bytes / rates.device_bytes_per_s
        + work.dequant_elements / rates.dequant_elements_per_s
    )
    device_s = codec_s + compute_s  # the compute stream runs them one after another
    host_s = 0.0
    if work.host_calls:
        host_s = (
            work.host_elements / rates.host_attention_elements_per_s
            + work.host_bytes / link_bps
            + work.host_calls * rates.host_call_s
        )
    calls_s = work.copy_calls * rates.copy_call_s
    kv_moves = work.kv_in_bytes > 0 or work.kv_out_bytes > 0 or work.copy_calls > 0
    link_end = kv_stream_end = reader_end = 0.0
    done = [0.0, 0.0]  # device end of the layer two back, and of the layer before
    arrived: list[float] = []
    disk_layers: list[int] = []
    totals = dict.fromkeys(("link", "disk", "calls"), 0.0)
    for layer_idx, tier in enumerate(work.tiers):
        weights = work.layer_bytes[layer_idx] if tier != "gpu" else 0
        slot_free = done[0]  # the device slot it lands in held the layer two back
        arrival = 0.0
        if weights or kv_moves:
            ready = slot_free
            if tier == "disk":
                # The reader is serial; a read reuses the relay of the disk layer two back,
                # free once that layer crossed the link.
                relay_free = arrived[disk_layers[-2]] if len(disk_layers) >= 2 else 0.0
                reader_end = max(reader_end, relay_free) + weights / disk_bps
                totals["disk"] += weights / disk_bps
                disk_layers.append(layer_idx)
                ready = max(ready, reader_end)
            moved = (weights + work.kv_in_bytes) / link_bps
            link_end = max(ready, link_end) + moved
            totals["link"] += moved
            arrival = link_end
            if kv_moves:  # the KV copy stream: its bytes and its calls, one after another
                stream = (work.kv_in_bytes + work.kv_out_bytes) / link_bps + calls_s
                kv_stream_end = max(slot_free, kv_stream_end) + stream
                totals["calls"] += calls_s
                arrival = max(arrival, kv_stream_end)
        arrived.append(arrival)
        done = [done[1], max(arrival, done[1]) + device_s + host_s]
    layers = len(work.tiers)
    overhead_s = rates.step_overhead_s + rates.row_overhead_s * work.rows  # the head, sampling
    return PassTime(
        total_s=done[1] + overhead_s,
        link_s=totals["link"],
        disk_s=totals["disk"],
        copy_calls_s=totals["calls"],
        codec_s=codec_s * layers,
        compute_s=compute_s * layers,
        overhead_s=overhead_s,
        host_s=host_s * layers,
    )


@dataclass(frozen=True)
class CacheShape:
    """Where the KV cache lives and how (what the plan chose), for counting its traffic."""

    kv_on: str  # gpu or cpu
    bits: int = 16
    layout: str = "rows"
    attention: str = "device"  # or host: decode attention where the cache lies (``hostattn``)

    @property
    def codec_key(self) -> str | None:
        """The codec rate this cache's device-side work runs at (None: it has none)."""
        if self.kv_on != "cpu" or (self.bits == 16 and self.layout == "rows"):
            return None
        return f"{self.bits}/{self.layout}"


def _layer_flops(config: ModelConfig, tokens: float, context: float) -> float:
    """Matmul and attention arithmetic of one layer over ``tokens`` new tokens in all."""
    hidden, ffn = config.hidden_size, config.ffn_size
    matrices = 4 * hidden * hidden + 3 * ffn * hidden  # qkv, dense, GeGLU's three
    return 2 * tokens * matrices + 4 * tokens * context * hidden


def _dequant_elements(config: ModelConfig, compressed: bool) -> float:
    hidden, ffn = config.hidden_size, config.ffn_size
    return float(4 * hidden * hidden + 3 * ffn * hidden) if compressed else 0.0


def mean_decode_context(prompt_tokens: int, max_context: int) -> float:
    """The positions an average decode step reads: the first reads the prompt, the last one
    fewer than ``max_context``."""
    return (prompt_tokens + max_context) / 2 - 1


def decode_work(
    config: ModelConfig,
    rows: int,
    context: float,
    tiers: tuple[str, ...],
    layer_bytes: tuple[int, ...],
    cache: CacheShape,
    element: int,
    compressed: bool,
) -> PassWork:
    """One decode step of ``rows`` rows reading ``context`` positions each."""
    per_token = kv_bytes_per_token(config, cache.bits, element) / config.num_layers
    hidden = config.hidden_size
    if cache.attention == "host":
        # Only the new slot is encoded on the device; its records, the step's q/k/v in fp32
        # and the output cross the link; the host reads every old slot's records.
        return PassWork(
            rows=rows,
            context=context,
            tiers=tiers,
            layer_bytes=layer_bytes,
            kv_in_bytes=0.0,
            kv_out_bytes=0.0,
            copy_calls=0,
            codec_key=cache.codec_key,
            codec_elements=2.0 * rows * hidden,
            flops=_layer_flops(config, rows, 0.0),
            device_bytes=0.0,
            dequant_elements=_dequant_elements(config, compressed),
            host_elements=2.0 * rows * context * hidden,
            host_bytes=rows * (4 * hidden * 4 + per_token),
            host_calls=1,
        )
    pinned = cache.kv_on == "cpu"
    calls = (4 * rows if cache.layout == "rows" else 4) if pinned else 0
    # Old slots expanded into the device slot, and the new one encoded, keys and values apart.
    codec = 2.0 * rows * (context + 1) * hidden if cache.codec_key else 0.0
    return PassWork(
        rows=rows,
        context=context,
        tiers=tiers,
        layer_bytes=layer_bytes,
        kv_in_bytes=rows * context * per_token if pinned else 0.0,
        kv_out_bytes=rows * per_token if pinned else 0.0,
        copy_calls=calls,
        codec_key=cache.codec_key,
        codec_elements=codec,
        flops=_layer_flops(config, rows, context),
        device_bytes=2.0 * rows * context * hidden * element,
        dequant_elements=_dequant_elements(config, compressed),
    )


def prefill_work(
    config: ModelConfig,
    rows: int,
    prompt_tokens: int,
    group_rows: int,
    tiers: tuple[str, ...],
    layer_bytes: tuple[int, ...],
    cache: CacheShape,
    element: int,
    compressed: bool,
) -> PassWork:
    """The prefill of ``rows`` prompts of ``prompt_tokens``: every layer loaded once, run over
    groups of ``group_rows`` rows (0: all in one), the prompts' keys and values sent to RAM."""
    per_token = kv_bytes_per_token(config, cache.bits, element) / config.num_layers
    groups = -(-rows // group_rows) if group_rows else 1
    pinned = cache.kv_on == "cpu"
    tokens = rows * prompt_tokens
    return PassWork(
        rows=rows,
        context=prompt_tokens,
        tiers=tiers,
        layer_bytes=layer_bytes,
        kv_in_bytes=0.0,
        kv_out_bytes=tokens * per_token if pinned else 0.0,
        copy_calls=(2 * rows if cache.layout == "rows" else 2) if pinned else 0,
        codec_key=cache.codec_key,
        codec_elements=2.0 * tokens * config.hidden_size if cache.codec_key else 0.0,
        flops=_layer_flops(config, tokens, prompt_tokens / 2),
        device_bytes=0.0,
        dequant_elements=groups * _dequant_elements(config, compressed),
    )


def machine_class(rates: StepRates) -> str:
    """The machine ``rates`` describe, in words: the planner's default class by its name."""
    link, disk = rates.link_bytes_per_s / 1e9, rates.disk_bytes_per_s / 1e9
    named_link = "PCIe 4 x16 at 25 GB/s" if link == 25 else f"a {link:g} GB/s host-to-device link"
    named_disk = "NVMe at 3 GB/s" if disk == 3 else f"a drive at {disk:g} GB/s"
    return f"{named_link}, {named_disk}"


@dataclass(frozen=True)
class BatchTime:
    """A batch of ``rows`` texts of ``new_tokens``, predicted: its prefill gives each row its
    first token, then ``new_tokens - 1`` decode steps give the rest."""

    rows: int
    new_tokens: int
    step: PassTime
    prefill: PassTime

    @property
    def batch_s(self) -> float:
        return self.prefill.total_s + (self.new_tokens - 1) * self.step.total_s

    @property
    def decode_tokens_per_s(self) -> float:
        return self.rows / self.step.total_s

    @property
    def texts_per_hour(self) -> float:
        return self.rows * 3600 / self.batch_s

    def lines(self) -> list[str]:
        step, prefill = self.step, self.prefill
        return [
            f"  decode step   {step.total_s * 1e3:.1f} ms, bound by {step.bound} (busy: link "
            f"{step.link_s * 1e3:.1f} ms, drive {step.disk_s * 1e3:.1f} ms, KV copy calls "
            f"{step.copy_calls_s * 1e3:.1f} ms, device {(step.codec_s + step.compute_s) * 1e3:.1f}"
            f" ms; overhead {step.overhead_s * 1e3:.1f} ms)",
            f"  tokens/s      {self.decode_tokens_per_s:.1f} while decoding ({self.rows} rows a "
            "step)",
            f"  prefill       {prefill.total_s:.2f} s per batch, bound by {prefill.bound}",
            f"  texts/hour    {self.texts_per_hour:.0f} of {self.new_tokens} new tokens (a batch "
            f"of {self.rows} every {self.batch_s:.1f} s, prefill included)",
        ]
