"""The prompt queue and its results: what the generation task reads and writes.

Owns saving rendered prompts (idempotent by key; a prompt whose template declares a signal
queues it for scoring in the same transaction, see ``flows.store.signals``), listing the pending
ones, keeping partial generation state for resume, recording a finished forecast with its
provenance (which marks the prompt done in the same transaction, and is idempotent), and marking
a prompt failed. It knows nothing of the model, the tokenizer or Prefect: callers hand in ids,
texts and numbers.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import select

from flows.errors import StoreError
from flows.prompting.templates import RenderedPrompt
from flows.store.database import Store, utc_now
from flows.store.models import Generation, GenerationState, Prompt, SignalPrompt
from flows.store.provenance import code_version as current_code_version


@dataclass(frozen=True)
class PendingPrompt:
    """A prompt waiting for the model, with the settings to generate it with."""

    key: str
    text: str
    token_count: int
    max_new_tokens: int
    sampling: Mapping[str, Any]
    template_name: str
    template_version: int
    template_hash: str
    language: str
    ticker: str | None
    as_of: str
    created_at: datetime


def _json(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, sort_keys=True, separators=(",", ":"))


def save_prompt(store: Store, prompt: RenderedPrompt, *, run_id: int | None = None) -> bool:
    """Store a rendered prompt as pending; returns False if its key was already stored."""
    now = utc_now()
    with store.transaction() as session:
        if session.get(Prompt, prompt.key) is not None:
            return False
        session.add(
            Prompt(
                key=prompt.key,
                template_name=prompt.template_name,
                template_version=prompt.template_version,
                template_hash=prompt.template_hash,
                language=prompt.language,
                scope=prompt.scope,
                ticker=prompt.ticker,
                as_of=prompt.as_of,
                text=prompt.text,
                token_count=prompt.token_count,
                max_new_tokens=prompt.max_new_tokens,
                sampling_json=_json(dict(prompt.sampling)),
                item_keys_json=_json(list(prompt.item_keys)),
                items_dropped=prompt.items_dropped,
                status="pending",
                run_id=run_id,
                created_at=now,
                updated_at=now,
            )
        )
        if prompt.signal is not None:
            session.flush()  # the prompt first: the signal's row refers to it
            session.add(
                SignalPrompt(
                    prompt_key=prompt.key,
                    prefix=prompt.signal["prefix"],
                    content_free_prefix=prompt.signal["content_free_prefix"],
                    answers_json=json.dumps(dict(prompt.signal["answers"]), ensure_ascii=False),
                    status="pending",
                    updated_at=now,
                )
            )
        return True


def pending_prompts(
    store: Store, *, limit: int | None = None, template: str | None = None
) -> list[PendingPrompt]:
    """Prompts not yet generated (nor failed), oldest first."""
    query = select(Prompt).where(Prompt.status == "pending").order_by(Prompt.created_at, Prompt.key)
    if template:
        query = query.where(Prompt.template_name == template)
    if limit is not None:
        query = query.limit(limit)
    with store.reading() as session:
        return [_pending(row) for row in session.scalars(query)]


def done_prompts(store: Store, keys: Sequence[str]) -> list[PendingPrompt]:
    """The prompts among ``keys`` that already have their forecast (a resumed job recomputes
    the batch they shared with unfinished prompts, exactly as it first ran)."""
    if not keys:
        return []
    query = select(Prompt).where(Prompt.key.in_(list(keys)), Prompt.status == "done")
    with store.reading() as session:
        return [_pending(row) for row in session.scalars(query.order_by(Prompt.key))]


def _pending(row: Prompt) -> PendingPrompt:
    return PendingPrompt(
        key=row.key,
        text=row.text,
        token_count=row.token_count,
        max_new_tokens=row.max_new_tokens,
        sampling=json.loads(row.sampling_json),
        template_name=row.template_name,
        template_version=row.template_version,
        template_hash=row.template_hash,
        language=row.language,
        ticker=row.ticker,
        as_of=row.as_of,
        created_at=row.created_at,
    )


def prompt_status(store: Store, prompt_key: str) -> str | None:
    with store.reading() as session:
        prompt = session.get(Prompt, prompt_key)
        return prompt.status if prompt else None


def save_generation_state(
    store: Store, prompt_key: str, token_ids: Sequence[int], *, fingerprint: str | None = None
) -> None:
    """Remember the ids generated so far for ``prompt_key`` (replacing what was there)."""
    save_generation_states(store, {prompt_key: token_ids}, fingerprint=fingerprint)


def save_generation_states(
    store: Store, states: Mapping[str, Sequence[int]], *, fingerprint: str | None = None
) -> None:
    """Remember the ids generated so far for several prompts, all in one transaction.

    ``fingerprint`` names what produced the ids (model, dtype, device); ``load_generation_state``
    with a different fingerprint ignores them, so ids from another model are never continued.
    """
    if not states:
        return
    with store.transaction() as session:
        for prompt_key, token_ids in states.items():
            _require_prompt(session, prompt_key)
            ids = [int(token) for token in token_ids]
            stored = _json(ids if fingerprint is None else {"ids": ids, "fingerprint": fingerprint})
            state = session.get(GenerationState, prompt_key)
            if state is None:
                session.add(
                    GenerationState(
                        prompt_key=prompt_key, token_ids_json=stored, updated_at=utc_now()
                    )
                )
            else:
                state.token_ids_json, state.updated_at = stored, utc_now()


def load_generation_state(
    store: Store, prompt_key: str, *, fingerprint: str | None = None
) -> list[int] | None:
    """The ids saved for ``prompt_key``, or None when there is nothing to resume.

    With ``fingerprint``, ids saved under another fingerprint count as nothing to resume.
    """
    with store.reading() as session:
        state = session.get(GenerationState, prompt_key)
        if state is None:
            return None
        stored = json.loads(state.token_ids_json)
    if isinstance(stored, list):  # saved without a fingerprint
        return stored
    if fingerprint is not None and stored.get("fingerprint") != fingerprint:
        return None
    return stored["ids"]


def discard_generation_state(store: Store, prompt_key: str) -> None:
    """Forget the partial ids of ``prompt_key`` (a fresh start for that prompt)."""
    with store.transaction() as session:
        state = session.get(GenerationState, prompt_key)
        if state is not None:
            session.delete(state)


def record_generation(
    store: Store,
    prompt_key: str,
    *,
    text: str,
    token_ids: Sequence[int],
    prompt_tokens: int,
    finish_reason: str,
    model_manifest_hash: str,
    timings_s: Mapping[str, float],
    tokens_per_s: float | None = None,
    sampling: Mapping[str, Any] | None = None,
    code_version: str | None = None,
    run_id: int | None = None,
) -> int:
    """Store a finished forecast and mark its prompt done, in one transaction.

    ``token_ids`` are the new ids only. ``sampling`` defaults to the prompt's settings. Calling
    this again for the same prompt changes nothing and returns the first forecast's id. The
    prompt's resume state is deleted in the same transaction.
    """
    with store.transaction() as session:
        prompt = _require_prompt(session, prompt_key)
        existing = session.scalar(select(Generation).where(Generation.prompt_key == prompt_key))
        if existing is not None:
            return existing.id
        generation = Generation(
            prompt_key=prompt_key,
            run_id=run_id,
            text=text,
            token_ids_json=_json([int(token) for token in token_ids]),
            prompt_tokens=int(prompt_tokens),
            new_tokens=len(token_ids),
            finish_reason=finish_reason,
            model_manifest_hash=model_manifest_hash,
            template_name=prompt.template_name,
            template_version=prompt.template_version,
            template_hash=prompt.template_hash,
            sampling_json=_json(
                dict(sampling) if sampling is not None else json.loads(prompt.sampling_json)
            ),
            timings_json=_json({key: float(value) for key, value in timings_s.items()}),
            tokens_per_s=tokens_per_s,
            code_version=code_version or current_code_version(),
            created_at=utc_now(),
        )
        session.add(generation)
        prompt.status, prompt.error, prompt.updated_at = "done", None, utc_now()
        state = session.get(GenerationState, prompt_key)
        if state is not None:
            session.delete(state)
        session.flush()
        return generation.id


def mark_prompt_failed(store: Store, prompt_key: str, reason: str) -> None:
    """Take a prompt out of the queue with the reason it could not be generated."""
    with store.transaction() as session:
        prompt = _require_prompt(session, prompt_key)
        if prompt.status != "done":
            prompt.status, prompt.error, prompt.updated_at = "failed", reason, utc_now()


def retry_failed_prompts(store: Store) -> int:
    """Put every failed prompt back in the queue; returns how many."""
    with store.transaction() as session:
        failed = list(session.scalars(select(Prompt).where(Prompt.status == "failed")))
        for prompt in failed:
            prompt.status, prompt.error, prompt.updated_at = "pending", None, utc_now()
        return len(failed)


def _require_prompt(session, prompt_key: str) -> Prompt:
    prompt = session.get(Prompt, prompt_key)
    if prompt is None:
        raise StoreError(f"no prompt with key {prompt_key!r}")
    return prompt
