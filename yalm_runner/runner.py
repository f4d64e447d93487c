"""Generation jobs over files: JSONL prefixes in, JSONL continuations out.

This is the one place where text, the store and the engine meet for the command line. The input
format is the original repo's conditional-generation format: one JSON object per line with a
``prefix``; each output line keeps the input's fields and adds ``suffix`` (the text the new
tokens add) and ``token_ids`` (the new ids). A line may carry its own ``max_new_tokens`` and an
``id`` (the row's key for sampling; the line number otherwise).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from yalm_runner.checkpoint import Store
from yalm_runner.config import SamplingParams
from yalm_runner.engine import Engine, GenerationStats, Request
from yalm_runner.errors import ConfigError, GenerationError
from yalm_runner.offload import ResidentWeights
from yalm_runner.tokenizer import Tokenizer

MEASURED_PINNED_GBPS = 55.0  # the lent H200's pinned host-to-device copies (PCIe 5)


def read_prompts(path: Path) -> list[dict[str, Any]]:
    """The input rows of ``path``; raises ``GenerationError`` naming the bad line."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise GenerationError(f"input file not found: {path}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise GenerationError(f"cannot read {path}: {exc}") from exc
    rows = []
    for line_no, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise GenerationError(f"{path} line {line_no}: not JSON ({exc.msg})") from None
        if not isinstance(row, dict) or not isinstance(row.get("prefix"), str):
            raise GenerationError(
                f"{path} line {line_no}: expected an object with a 'prefix' string"
            )
        limit = row.get("max_new_tokens")
        if limit is not None and (not isinstance(limit, int) or limit < 1):
            raise GenerationError(
                f"{path} line {line_no}: max_new_tokens must be a positive integer"
            )
        rows.append({"__key__": str(row.get("id", f"line-{line_no}")), **row})
    if not rows:
        raise GenerationError(f"{path}: no prompts")
    keys = [row["__key__"] for row in rows]
    duplicates = sorted({key for key in keys if keys.count(key) > 1})
    if duplicates:
        raise GenerationError(f"{path}: duplicate ids {duplicates[:5]}")
    return rows


def default_dtype(store: Store, device: torch.device) -> torch.dtype:
    if device.type == "cpu":
        return torch.float32
    return store.dtype if store.dtype in (torch.bfloat16, torch.float16) else torch.bfloat16


def write_jsonl_atomic(path: Path, rows: list[dict[str, Any]]) -> None:
    temp_path = path.with_name(path.name + ".partial")
    try:
        with open(temp_path, "w", encoding="utf-8") as handle:
            for row in rows:
                handle.write(json.dumps(row, ensure_ascii=False) + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp_path, path)
    except OSError as exc:
        temp_path.unlink(missing_ok=True)
        raise GenerationError(f"cannot write {path}: {exc.strerror or exc}") from exc


def generate_file(
    store_path: Path,
    input_path: Path,
    output_path: Path,
    *,
    sampling: SamplingParams,
    max_new_tokens: int,
    device: torch.device,
    dtype: torch.dtype | None = None,
    batch_size: int = 32,
    verify: bool = True,
) -> GenerationStats:
    """Continue every prefix of ``input_path`` and write ``output_path``."""
    if max_new_tokens < 1:
        raise ConfigError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if batch_size < 1:
        raise ConfigError(f"batch size must be >= 1, got {batch_size}")
    rows = read_prompts(input_path)
    store = Store.open(store_path)
    tokenizer = Tokenizer(store.tokenizer_path)
    requests = [
        Request(
            row["__key__"],
            tuple(tokenizer.encode(row["prefix"])),
            row.get("max_new_tokens", max_new_tokens),
        )
        for row in rows
    ]
    weights = ResidentWeights(store, device, dtype or default_dtype(store, device), verify=verify)
    engine = Engine(weights)
    finished = engine.generate(requests, sampling, batch_size=batch_size)
    output = []
    for row, done in zip(rows, finished, strict=True):
        fields = {key: value for key, value in row.items() if key != "__key__"}
        fields["suffix"] = tokenizer.continuation(list(done.prompt_ids), list(done.new_ids))
        fields["token_ids"] = list(done.new_ids)
        output.append(fields)
    write_jsonl_atomic(Path(output_path), output)
    return engine.stats


def describe_store(store: Store) -> str:
    """A human summary: shape, sizes, and what one decode step must move when streamed."""
    config = store.config
    layer_bytes = [store.parts[f"layer_{idx}"].data_bytes for idx in range(config.num_layers)]
    embedding_bytes = store.parts["embedding"].data_bytes
    head_bytes = store.parts["head"].data_bytes
    step_bytes = sum(layer_bytes) + head_bytes + embedding_bytes
    lines = [
        f"store            {store.path}",
        f"manifest sha256  {store.manifest_sha256}",
        f"dtype            {store.manifest['dtype']}",
        f"layers           {config.num_layers} x hidden {config.hidden_size}, {config.num_heads} "
        f"heads of {config.head_dim}, GeGLU {config.ffn_size}",
        f"embedding        {config.vocab_size} x {config.embedding_size}",
        f"max positions    {config.max_positions}",
        f"parameters       {config.param_count():,}",
        f"weights          {store.weight_bytes / 2**30:.3f} GiB",
        f"bytes per layer  {max(layer_bytes) / 2**20:.2f} MiB "
        f"(layer 0: {layer_bytes[0] / 2**20:.2f} MiB)",
        f"embedding/head   {embedding_bytes / 2**20:.2f} MiB / {head_bytes / 2**20:.2f} MiB",
        f"KV per token     {config.kv_bytes_per_token(2) / 2**20:.3f} MiB in 16 bits",
        f"one decode step  moves {step_bytes / 2**30:.3f} GiB if nothing is resident: "
        f"{step_bytes / (MEASURED_PINNED_GBPS * 1e9) * 1e3:.1f} ms at "
        f"{MEASURED_PINNED_GBPS:.0f} GB/s pinned",
    ]
    return "\n".join(lines)
