"""The preflight: everything a night needs, checked before the first feed is fetched.

Owns the checks and their one-line refusals: the config, the model store (opened and validated
cheaply: its manifest and each file's size and header, not the weights' checksums), the
tokenizer, the device, the memory plan at the config's ``max_positions`` and the largest
``max_new_tokens`` any template asks for, and every configured template (loads, compiles,
renders against a sample context built from the watchlist). A problem with any of the first
five refuses the night (``PreflightError``, naming the file or key and what to do); a broken
template does not: it is reported and the night goes on without it.

It fetches nothing, writes nothing and never imports Prefect, so that ``yalm-forecast check``
and a refused ``run`` answer in a second or two.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from flows.config import PipelineConfig, load_config
from flows.errors import PipelineConfigError, TemplateError
from flows.night.summaries import Failure

log = logging.getLogger("flows.preflight")


class PreflightError(PipelineConfigError):
    """Something every night needs is missing or wrong: the night is refused before it starts."""


@dataclass(frozen=True)
class PreflightReport:
    config: PipelineConfig
    device: str
    plan: str  # the memory plan, in words
    templates_ok: tuple[str, ...]
    template_failures: tuple[Failure, ...]

    def lines(self) -> list[str]:
        lines = [f"config {self.config.path}: ok", f"model {self.config.model}: ok",
                 f"device {self.device}: ok", f"memory plan: {self.plan}"]  # fmt: skip
        lines += [f"template {name}: ok" for name in self.templates_ok]
        lines += [f"template {failure.name}: {failure.cause}" for failure in self.template_failures]
        return lines


def preflight(config_path: str | Path) -> PreflightReport:
    """Check what the night needs; raise ``PreflightError`` (one line) for what refuses it."""
    config = load_config(config_path)
    where = config.path or config_path
    store = _model_store(config, where)
    _tokenizer(config, where)
    devices = _devices(config, where)
    plan = _memory_plan(config, store, devices, where)
    ok, failed = check_templates(config)
    return PreflightReport(config, ",".join(map(str, devices)), plan, ok, failed)


def check_templates(config: PipelineConfig) -> tuple[tuple[str, ...], tuple[Failure, ...]]:
    """Each configured template loaded and rendered against a sample context."""
    from flows.prompting.rendering import check_template

    ok, failed = [], []
    for selection in config.templates:
        try:
            check_template(config, selection)
        except TemplateError as exc:
            failed.append(Failure("template", selection.name, str(exc)))
        else:
            ok.append(selection.name)
    return tuple(ok), tuple(failed)


def _model_store(config: PipelineConfig, where: object):
    from yalm_runner.errors import YalmError

    if config.model is None:
        raise PreflightError(
            f"{where}: model: not set; convert the YaLM release with `yalm-runner convert` (or "
            "build a test model with `yalm-runner make-tiny`) and name its folder here"
        )
    if not (config.model / "manifest.json").is_file():  # said before torch is even imported
        what = "an interrupted conversion?" if (config.model / "layers").is_dir() else "no store"
        raise PreflightError(
            f"{where}: model: {config.model} is not a store: manifest.json is missing ({what}); "
            "fix `model:` or convert the store again"
        )
    from yalm_runner.checkpoint import ModelStore

    try:
        return ModelStore.open(config.model)
    except YalmError as exc:
        raise PreflightError(
            f"{where}: model: {exc}; fix `model:` or convert the store again"
        ) from None


def _tokenizer(config: PipelineConfig, where: object) -> None:
    from flows.generation.model import resolve_tokenizer_path
    from yalm_runner.errors import YalmError
    from yalm_runner.tokenizer import Tokenizer

    try:
        Tokenizer(resolve_tokenizer_path(config))
    except (PipelineConfigError, YalmError, OSError, RuntimeError) as exc:
        raise PreflightError(f"{where}: tokenizer: {exc}") from exc


def _devices(config: PipelineConfig, where: object) -> list:
    from yalm_runner.errors import YalmError
    from yalm_runner.session import resolve_devices

    try:
        return resolve_devices(config.generation.device)
    except YalmError as exc:
        raise PreflightError(
            f"{where}: generation.device: {exc}; set `device: cpu` or `auto` to run without one"
        ) from None


def _memory_plan(config: PipelineConfig, store, devices: list, where: object) -> str:
    from yalm_runner.errors import YalmError
    from yalm_runner.offload import OffloadPolicy
    from yalm_runner.planning import plan_memory
    from yalm_runner.session import default_dtype

    settings = config.generation
    device = devices[0]
    try:
        plan = plan_memory(
            store,
            device,
            settings.torch_dtype() or default_dtype(store, device),
            OffloadPolicy.from_settings(settings),
            batch_size=settings.batch_size,
            max_context=min(settings.max_positions, store.config.max_positions),
            rows=settings.batch_size,
            copies=len(devices),
        )
    except YalmError as exc:
        raise PreflightError(
            f"{where}: generation: the memory plan at {settings.max_positions} positions does "
            f"not fit: {exc}"
        ) from None
    return plan.describe()
