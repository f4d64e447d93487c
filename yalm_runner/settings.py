"""The runner's settings, each defined once: name, type, choices, bounds, default, help, flags.

Both front ends are built from this module: the ``yalm-runner`` options (``cli_options`` gives
each flag its parser, help and default) and the ``generation:`` section of the pipeline's YAML
(``flows.config`` extends ``RunnerSettings``). A value is therefore spelled, checked and refused
the same way wherever it comes from; ``explain`` turns a refusal into one line that names the
flag or key at fault (``--top-p: must be in [0, 1], got 1.5``, ``generation.top_p: ...``).

Vocabulary: dtypes are ``bf16``/``fp16``/``fp32`` (``bfloat16``/``float16``/``float32`` are
accepted and mean the same); memory budgets are sizes like ``8GiB``; a device is ``auto``,
``cpu``, ``cuda``, ``cuda:N``, ``cuda:all`` or a list ``cuda:0,cuda:1``. This module checks a
device's spelling only: whether that GPU exists is ``session.resolve_devices``'s to say, once.

It is deliberately light (pure Python and pydantic, no torch at import) so that the pipeline's
config module may import it; ``offload_policy``, ``sampling_params`` and ``torch_dtype`` import
the engine's records only when called.
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Annotated, Any

from pydantic import (
    AfterValidator,
    BeforeValidator,
    ConfigDict,
    Field,
    TypeAdapter,
    model_validator,
)
from pydantic import ValidationError as _ValidationError
from pydantic.dataclasses import dataclass
from pydantic.fields import FieldInfo

from yalm_runner.errors import ConfigError

if TYPE_CHECKING:
    import torch


ValidationError = _ValidationError  # what a refused value raises; ``explain`` reads it

DTYPES = ("bf16", "fp16", "fp32")  # the canonical spellings
DTYPE_ALIASES = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}
WEIGHT_TIERS = ("auto", "gpu", "cpu", "disk")  # where streamed layers live
KV_TIERS = ("auto", "gpu", "cpu")  # where the KV cache lives between layers
KV_BITS = (16, 8, 4)  # 8 or 4: a pinned-RAM KV cache kept compressed
KV_LAYOUTS = ("auto", "rows", "slots")  # of the pinned-RAM KV cache
KV_ATTENTION = ("device", "host")  # where a decode step attends over a RAM-resident KV cache
SAMPLING_KEYS = ("max_new_tokens", "temperature", "top_p", "top_k", "greedy", "seed")
_DEVICE_RE = re.compile(r"auto|cpu|cuda(:\d+)?|cuda:all|cuda:\d+(,cuda:\d+)+")
_UNITS = {
    "": 1,
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}


class InvalidSettings(ConfigError):
    """Settings refused by ``build``: one line naming the flag or key at fault."""


class SettingError(ValueError):
    """A rule between settings broken; ``key`` is the setting to name in the error."""

    def __init__(self, key: str, message: str):
        super().__init__(message)
        self.key = key


def parse_bytes(text: str | int) -> int:
    """``"8GiB"`` -> 8589934592; also plain integers and KB/MB/GB (powers of ten)."""
    if isinstance(text, int):
        return text
    match = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([a-zA-Z]*)\s*", str(text))
    if not match or match.group(2).lower() not in _UNITS:
        raise ConfigError(f"cannot read {text!r} as a size; write e.g. 8GiB, 512MiB or 2GB")
    return int(float(match.group(1)) * _UNITS[match.group(2).lower()])


def canonical_dtype(name: str) -> str:
    """``bfloat16`` -> ``bf16`` (and so on); other spellings are returned as they are."""
    return DTYPE_ALIASES.get(name, name) if isinstance(name, str) else name


def _one_of(choices: tuple) -> Callable[[Any], Any]:
    def check(value: Any) -> Any:
        if value not in choices:
            raise ValueError(f"one of {', '.join(map(str, choices))}, got {value!r}")
        return value

    return check


def _size(value: str | None) -> str | None:
    if value is None:
        return None
    try:
        size = parse_bytes(value)
    except ConfigError:
        raise ValueError(f"a size like 8GiB, got {value!r}") from None
    if size <= 0:
        raise ValueError(f"must be a positive size, got {value!r}")
    return value


def _device(value: str) -> str:
    if not _DEVICE_RE.fullmatch(value):
        raise ValueError(f"auto, cpu, cuda, cuda:N, cuda:all or cuda:0,cuda:1, got {value!r}")
    return value


def _in_unit_range(value: float) -> float:
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"must be in [0, 1], got {value}")
    return value


def _auto_is_none(value: Any) -> Any:
    return None if value == "auto" else value


def _setting(
    help_text: str, *flags: str, metavar: str | None = None, choices: tuple = (), **bounds: Any
) -> Any:
    """A setting's help, command-line flags and numeric bounds (pydantic's ``Field``)."""
    if choices:
        metavar = "{" + ",".join(map(str, choices)) + "}"
    extra = {"flags": flags, "metavar": metavar}
    return Field(description=help_text, json_schema_extra=extra, **bounds)


# One annotated type per setting: its type, choices or bounds, help text and command-line flags.
# The defaults are the fields' below.
Device = Annotated[
    str,
    AfterValidator(_device),
    _setting("auto, cpu, cuda, cuda:N, or several GPUs: cuda:0,cuda:1 or cuda:all", "--device"),
]
Dtype = Annotated[
    str,
    BeforeValidator(canonical_dtype),
    AfterValidator(_one_of(("auto", *DTYPES))),
    _setting(
        "compute dtype: bf16, fp16 or fp32 (bfloat16, float16, float32 too); auto: fp32 on the "
        "CPU, the store's 16-bit dtype on a GPU",
        "--dtype",
        choices=("auto", *DTYPES),
    ),
]
BatchSize = Annotated[
    Annotated[int, Field(ge=1)] | None,
    BeforeValidator(_auto_is_none),
    _setting("rows per batch; auto: the fastest batch the memory budgets allow", "--batch-size"),
]
GpuMemory = Annotated[
    str | None,
    AfterValidator(_size),
    _setting("GPU budget, e.g. 8GiB", "--gpu-memory", metavar="SIZE"),
]
CpuMemory = Annotated[
    str | None,
    AfterValidator(_size),
    _setting(
        "RAM budget, e.g. 48GiB: pinned RAM for streamed layers and KV on a GPU run, the whole "
        "RAM on a CPU-only run",
        "--cpu-memory",
        metavar="SIZE",
    ),
]
WeightsOn = Annotated[
    str,
    AfterValidator(_one_of(WEIGHT_TIERS)),
    _setting(
        "where layers that do not fit on the GPU live (auto: GPU, then RAM, then disk)",
        "--weights-on",
        choices=WEIGHT_TIERS,
    ),
]
KvOn = Annotated[
    str,
    AfterValidator(_one_of(KV_TIERS)),
    _setting(
        "where the KV cache lives (auto: whichever the plan predicts faster)",
        "--kv-on",
        choices=KV_TIERS,
    ),
]
KvBits = Annotated[
    int,
    AfterValidator(_one_of(KV_BITS)),
    _setting(
        "8 or 4: keep the pinned-RAM KV cache compressed (1/2 or ~1/3.6 the RAM and traffic)",
        "--kv-bits",
        choices=KV_BITS,
    ),
]
KvAttention = Annotated[
    str,
    AfterValidator(_one_of(KV_ATTENTION)),
    _setting(
        "where decode attention runs over a KV cache kept in RAM in 8 or 4 bits: device (the "
        "cache travels to the GPU a layer at a time) or host (the CPU's cores attend where it "
        "lies and only the step's queries, keys and values cross the link; needs a C compiler)",
        "--kv-attention",
        choices=KV_ATTENTION,
    ),
]
KvLayout = Annotated[
    str,
    AfterValidator(_one_of(KV_LAYOUTS)),
    _setting(
        "pinned-RAM KV layout: rows (a copy per row), slots (a copy per layer; needs a staging "
        "area on the GPU) or auto (the planner picks the faster)",
        "--kv-layout",
        choices=KV_LAYOUTS,
    ),
]
Overlap = Annotated[
    bool,
    _setting(
        "copies overlap compute; --no-overlap waits for every copy (to measure)", "--no-overlap"
    ),
]
MaxNewTokens = Annotated[int, _setting("new tokens per row", "-n", "--max-new-tokens", ge=1)]
Temperature = Annotated[
    float, _setting("sampling temperature", "--temp", ge=0.0, allow_inf_nan=False)
]
TopP = Annotated[
    float, AfterValidator(_in_unit_range), _setting("nucleus threshold (0 = off)", "--top-p")
]
TopK = Annotated[int, _setting("top-k filter (0 = off)", "--top-k", ge=0)]
Greedy = Annotated[bool, _setting("argmax instead of sampling", "--greedy")]
Seed = Annotated[int, _setting("sampling seed", "-s", "--seed")]
CheckpointEvery = Annotated[
    int,
    _setting(
        "save the unfinished rows' state every N decode steps (0 = only on SIGINT/SIGTERM)",
        "--checkpoint-every",
        metavar="N",
        ge=0,
    ),
]

KvCheckpointInterval = Annotated[
    float,
    _setting(
        "at a state save, also save the live batch's KV cache once this many seconds passed since "
        "the batch began or its last KV save, so a resume goes on from there (0 = never: a "
        "resume recomputes the live batch)",
        "--kv-checkpoint-interval",
        metavar="SECONDS",
        ge=0.0,
        allow_inf_nan=False,
    ),
]

LinkGbps = Annotated[
    float,
    _setting(
        "host-to-device GB/s the planner compares plans at (PCIe 4 x16: 25; PCIe 5: ~55)",
        "--link-gbps",
        metavar="GB/S",
        gt=0.0,
        allow_inf_nan=False,
    ),
]

DiskGbps = Annotated[
    float,
    _setting(
        "drive read GB/s the planner compares plans at: a faster drive gets more layers on disk "
        "and more rows (`yalm-runner bench --disk DIR` measures yours)",
        "--disk-gbps",
        metavar="GB/S",
        gt=0.0,
        allow_inf_nan=False,
    ),
]

# YAML and the command line both come through here: a YAML `16` must be an int, not "16", and
# `yes` is no number (strict); the command line's text is parsed by each option (``cli_options``).
SETTINGS_CONFIG = ConfigDict(extra="forbid", strict=True)


@dataclass(frozen=True, config=SETTINGS_CONFIG)
class SamplingSettings:
    """How logits become tokens, and how many: the settings a pipeline template may override."""

    max_new_tokens: MaxNewTokens = 128
    temperature: Temperature = 1.0  # the original scripts' defaults (SPEC §4.1)
    top_p: TopP = 0.9
    top_k: TopK = 0
    greedy: Greedy = False
    seed: Seed = 1234

    @model_validator(mode="after")
    def _sampling_rules(self) -> SamplingSettings:
        if not self.greedy and self.temperature == 0:
            raise SettingError("temperature", "must be > 0 unless greedy is set")
        return self

    def sampling(self) -> dict[str, Any]:
        """The sampling settings as the plain mapping a stored prompt carries."""
        return {key: getattr(self, key) for key in SAMPLING_KEYS}


@dataclass(frozen=True, config=SETTINGS_CONFIG)
class RunnerSettings(SamplingSettings):
    """Everything a generation run is told: device, dtype, batch, budgets, placement, sampling."""

    device: Device = "auto"
    dtype: Dtype = "auto"
    batch_size: BatchSize = None
    gpu_memory: GpuMemory = None
    cpu_memory: CpuMemory = None
    weights_on: WeightsOn = "auto"
    kv_on: KvOn = "auto"
    kv_bits: KvBits = 16
    kv_layout: KvLayout = "auto"
    kv_attention: KvAttention = "device"
    overlap: Overlap = True
    checkpoint_every: CheckpointEvery = 16
    # A kill costs at most this much work; YaLM-100B's batch (~160 s on an H200) writes none.
    kv_checkpoint_interval: KvCheckpointInterval = 600.0
    # The machine's rates, for choosing between plans (``planning``); the defaults are the
    # target's class: PCIe 4 x16 and an NVMe drive.
    link_gbps: LinkGbps = 25.0
    disk_gbps: DiskGbps = 3.0

    @model_validator(mode="after")
    def _offload_rules(self) -> RunnerSettings:
        check_kv(self.kv_bits, self.kv_on, self.kv_attention)
        return self

    @property
    def gpu_memory_bytes(self) -> int | None:
        return None if self.gpu_memory is None else parse_bytes(self.gpu_memory)

    @property
    def cpu_memory_bytes(self) -> int | None:
        return None if self.cpu_memory is None else parse_bytes(self.cpu_memory)

    def torch_dtype(self) -> torch.dtype | None:
        """The compute dtype; None for ``auto`` (the session picks it for the device)."""
        return None if self.dtype == "auto" else torch_dtype(self.dtype)


def check_kv(kv_bits: int, kv_on: str, kv_attention: str = "device") -> None:
    """Compressed KV exists only for the pinned-RAM cache; attention on the host only over
    such a cache."""
    if kv_bits != 16 and kv_on == "gpu":
        raise SettingError(
            "kv_bits", f"{kv_bits}-bit KV is for a cache in pinned RAM; set kv_on to auto or cpu"
        )
    if kv_attention == "host" and (kv_bits == 16 or kv_on == "gpu"):
        raise SettingError(
            "kv_attention",
            "attention on the host reads a KV cache kept in RAM in 8 or 4 bits; set kv_bits to "
            f"8 or 4 and kv_on to auto or cpu (got kv_bits {kv_bits}, kv_on {kv_on})",
        )


def torch_dtype(name: str) -> torch.dtype:
    """``bf16`` (or ``bfloat16``) -> ``torch.bfloat16``; any other name is a ``ConfigError``."""
    import torch

    by_name = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
    try:
        return by_name[canonical_dtype(name)]
    except KeyError:
        choices = ", ".join(DTYPES)
        raise ConfigError(f"unknown dtype {name!r}; one of {choices} (or long names)") from None


def field_info(model: type, name: str) -> FieldInfo:
    return model.__pydantic_fields__[name]


def check(model: type, name: str, value: Any, *, strict: bool = True) -> Any:
    """One setting's value, checked (and converted from text when not ``strict``) alone."""
    info = field_info(model, name)
    annotation = info.annotation
    if info.metadata:
        annotation = Annotated[(annotation, *info.metadata)]
    adapter = TypeAdapter(annotation)
    return adapter.validate_python(value, strict=strict)


def build(model: type, values: Mapping[str, Any], where: str = "", name_of=None):
    """``model(**values)``, or ``InvalidSettings`` naming the key at fault (see ``explain``)."""
    unknown = sorted(str(key) for key in values if not isinstance(key, str))
    if unknown:
        raise InvalidSettings(f"{_join(where, unknown[0])}: unknown key")
    try:
        return model(**values)
    except ValidationError as exc:
        raise InvalidSettings(explain(exc, where, name_of)) from None


def explain(exc: ValidationError, where: str = "", name_of=None) -> str:
    """The first error of ``exc`` as ``key: what is wrong``; ``where`` prefixes the key (a YAML
    section), ``name_of`` maps a setting's name to what the user typed (a flag)."""
    error = exc.errors()[0]
    loc = list(error["loc"])
    cause = (error.get("ctx") or {}).get("error")
    if isinstance(cause, SettingError):
        loc.append(cause.key)
    key = ""
    for part in loc:
        if isinstance(part, int):
            key += f"[{part}]"
        else:
            part = name_of(part) if name_of else part
            key = f"{key}.{part}" if key else part
    key = _join(where, key) if key else (where or "config")
    return f"{key}: {_message(error)}"


def _join(where: str, key: str) -> str:
    return f"{where}.{key}" if where and not key.startswith("[") else f"{where}{key}"


_EXPECTED = {
    "int": "an integer",
    "float": "a number",
    "bool": "true or false",
    "string": "a string",
    "list": "a list",
    "tuple": "a list",
    "dict": "a mapping",
}


def _message(error: Mapping[str, Any]) -> str:
    kind, got, ctx = error["type"], error.get("input"), error.get("ctx") or {}
    if isinstance(ctx.get("error"), ValueError):  # our validators' own words
        return str(ctx["error"])
    if kind in ("unexpected_keyword_argument", "extra_forbidden"):
        return "unknown key"
    if kind in ("missing", "missing_argument", "missing_keyword_only_argument"):
        return "required"
    stem = kind.split("_")[0]
    if stem in _EXPECTED and kind.endswith(("_type", "_parsing", "_from_float")):
        return f"expected {_EXPECTED[stem]}, got {got!r}"
    if kind == "finite_number":
        return f"expected a finite number, got {got!r}"
    bounds = {
        "greater_than_equal": (">=", "ge"),
        "greater_than": (">", "gt"),
        "less_than_equal": ("<=", "le"),
        "less_than": ("<", "lt"),
    }
    if kind in bounds:
        sign, name = bounds[kind]
        return f"must be {sign} {ctx[name]}, got {got}"  # a number, typed or as text
    if kind == "string_too_short":
        return "must not be empty"
    return str(error["msg"])


# The command line: every option a setting defines, parsed by that setting's own validation.


def flags(model: type, name: str) -> tuple[str, ...]:
    return field_info(model, name).json_schema_extra["flags"]


def flag_of(model: type, name: str) -> str:
    """The long flag of a setting (``--top-p``): what CLI errors name."""
    return next(flag for flag in flags(model, name) if flag.startswith("--"))


def cli_options(
    names: Iterable[str], model: type = RunnerSettings, **defaults: Any
) -> Iterable[tuple[tuple[str, ...], dict[str, Any]]]:
    """``(flags, argparse keywords)`` for each setting in ``names``; ``defaults`` overrides a
    setting's default for one command (``quality`` compares in fp32 by default)."""
    for name in names:
        info = field_info(model, name)
        default = defaults.get(name, info.default)
        extra = info.json_schema_extra
        help_text = info.description
        if info.annotation is bool:
            action = "store_false" if extra["flags"][0].startswith("--no-") else "store_true"
            yield extra["flags"], {"dest": name, "action": action, "help": help_text}
            continue
        shown = "no limit" if default is None and "memory" in name else default
        yield (
            extra["flags"],
            {
                "dest": name,
                "type": option_parser(name, model),
                "default": default,
                "metavar": extra.get("metavar"),
                "help": f"{help_text} (default: {'auto' if shown is None else shown})",
            },
        )


def option_parser(name: str, model: type = RunnerSettings) -> Callable[[str], Any]:
    """An argparse ``type`` that reads one setting from text by that setting's own rules."""

    def parse(text: str) -> Any:
        try:
            return check(model, name, text, strict=False)
        except ValidationError as exc:
            raise argparse.ArgumentTypeError(_message(exc.errors()[0])) from None

    parse.__name__ = name  # argparse names the type in some messages
    return parse


def from_args(args: argparse.Namespace, model: type = RunnerSettings):
    """The settings a command's options gave; rules between them are checked here, and an
    error names the flag (``--kv-bits: 4-bit KV is for a cache in pinned RAM; ...``)."""
    names = [name for name in model.__pydantic_fields__ if hasattr(args, name)]
    return build(
        model,
        {name: getattr(args, name) for name in names},
        name_of=lambda name: flag_of(model, name) if name in names else name,
    )


def check_setting(name: str, value: Any) -> None:
    """One runner setting checked alone, for records built in code (``OffloadPolicy``)."""
    try:
        check(RunnerSettings, name, value)
    except ValidationError as exc:
        raise ConfigError(explain(exc, name)) from None


def check_offload_rules(kv_bits: int, kv_on: str, kv_attention: str = "device") -> None:
    """``check_kv`` for records built in code: a ``ConfigError`` naming the setting."""
    try:
        check_kv(kv_bits, kv_on, kv_attention)
    except SettingError as exc:
        raise ConfigError(f"{exc.key}: {exc}") from None
