"""How the pending prompts are cut into shards, and what a night's shards did, from the store.

Owns three small rules. A shard's worker id (``shard-0-of-2``) is the same wherever and however
often the shard runs, so a re-run takes back that shard's claims at once
(``flows.store.claims``). The
nightly flow cuts the pending prompts round-robin (oldest first) into explicit key lists, which
become the shard runs' parameters: a re-run of a run keeps its keys. Without explicit keys a
shard is the pending prompts whose key (a SHA-256 in hex) falls in it by ``key mod count``:
stable, whatever else is pending or done, so ``--shard 1/2`` means the same prompts on every host
and every re-run. It also sums up the shards' work from the ``runs`` and ``generations`` tables
(a shard run's own return value lives in another process; the store is the record). It knows
nothing of Prefect or the model.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from sqlalchemy import select

from flows.errors import PipelineError
from flows.store.database import Store
from flows.store.models import Generation, Prompt, Run, SignalPrompt


def check_shard(index: int, count: int) -> None:
    if not (isinstance(count, int) and count >= 1 and isinstance(index, int)):
        raise PipelineError(f"shard {index!r}/{count!r}: index and count must be integers")
    if not 0 <= index < count:
        raise PipelineError(f"shard {index}/{count}: the index must be in 0..{count - 1}")


def shard_worker_id(index: int, count: int) -> str:
    check_shard(index, count)
    return f"shard-{index}-of-{count}"


def in_shard(key: str, index: int, count: int) -> bool:
    """Whether the prompt ``key`` belongs to shard ``index`` of ``count`` (by its hash)."""
    return int(key[:15], 16) % count == index


def split_round_robin(keys: Sequence[str], count: int) -> list[list[str]]:
    """``keys`` dealt into ``count`` lists, the first key to the first list: sizes differ by 1."""
    return [list(keys[index::count]) for index in range(count)]


def shard_report(store: Store, keys: Sequence[str]) -> dict[str, Any]:
    """What became of ``keys``: forecasts, failures, what is still pending, the runs' totals."""
    with store.reading() as session:
        prompts = session.execute(
            select(Prompt.key, Prompt.status, Prompt.error).where(Prompt.key.in_(list(keys)))
        ).all()
        run_ids = sorted(
            {
                run_id
                for run_id in session.scalars(
                    select(Generation.run_id).where(Generation.prompt_key.in_(list(keys)))
                )
                if run_id is not None
            }
        )
        details = [
            json.loads(text or "{}")
            for text in session.scalars(select(Run.details_json).where(Run.id.in_(run_ids)))
        ]
        signals = session.execute(
            select(SignalPrompt.prompt_key, SignalPrompt.status, SignalPrompt.error).where(
                SignalPrompt.prompt_key.in_(list(keys))
            )
        ).all()
    statuses = [status for _, status, _ in prompts]
    new_tokens = sum(int(detail.get("new_tokens") or 0) for detail in details)
    compute_s = sum(
        int(detail.get("new_tokens") or 0) / detail["tokens_per_s"]
        for detail in details
        if detail.get("tokens_per_s")
    )
    return {
        "run_ids": run_ids,
        "pending": statuses.count("pending"),
        "generated": statuses.count("done"),
        "failed": statuses.count("failed"),
        "resumed": sum(int(detail.get("resumed") or 0) for detail in details),
        "new_tokens": new_tokens,
        "tokens_per_s": round(new_tokens / compute_s, 2) if compute_s else 0.0,
        "batch_size": max((detail.get("batch_size") or 0 for detail in details), default=None),
        "device": ", ".join(sorted({d["device"] for d in details if d.get("device")})) or None,
        "failures": [[key, error] for key, status, error in prompts if status == "failed"],
        "signals": sum(status == "done" for _, status, _ in signals),
        "scoring_s": round(sum(float(detail.get("scoring_s") or 0) for detail in details), 2),
        "signal_failures": [[key, error] for key, status, error in signals if status == "failed"],
    }
