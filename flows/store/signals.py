"""The scoring queue and its results: what the scoring step reads and writes.

Owns the ``signal_prompts`` rows (saved with their prompt by ``generations.save_prompt``),
listing the pending ones, recording one scored prompt's answers (every label in one transaction,
which also marks it scored, and idempotent: a second recording changes nothing), and marking a
score failed. It knows nothing of the model, the tokenizer, calibration or Prefect: callers hand
in numbers.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from sqlalchemy import select

from flows.errors import StoreError
from flows.store.database import Store, utc_now
from flows.store.models import Prompt, Signal, SignalPrompt
from flows.store.provenance import code_version as current_code_version


@dataclass(frozen=True)
class PendingSignal:
    """A prompt's signal waiting to be scored."""

    key: str
    prefix: str
    content_free_prefix: str
    answers: dict[str, str]  # label -> answer text, in the template's order
    template_name: str
    ticker: str | None


@dataclass(frozen=True)
class SignalAnswer:
    """One label of one scored prompt, as ``signals`` keeps it."""

    label: str
    answer: str
    logprob: float
    answer_tokens: int
    raw_probability: float
    content_free_logprob: float
    content_free_tokens: int
    content_free_probability: float
    probability: float


def pending_signals(store: Store, *, keys: Iterable[str] | None = None) -> list[PendingSignal]:
    """Signals not yet scored (nor failed), oldest prompt first; only ``keys`` if given."""
    query = (
        select(SignalPrompt, Prompt)
        .join(Prompt, Prompt.key == SignalPrompt.prompt_key)
        .where(SignalPrompt.status == "pending")
        .order_by(Prompt.created_at, Prompt.key)
    )
    if keys is not None:
        query = query.where(SignalPrompt.prompt_key.in_(list(keys)))
    with store.reading() as session:
        return [
            PendingSignal(
                key=signal.prompt_key,
                prefix=signal.prefix,
                content_free_prefix=signal.content_free_prefix,
                answers=json.loads(signal.answers_json),
                template_name=prompt.template_name,
                ticker=prompt.ticker,
            )
            for signal, prompt in session.execute(query)
        ]


def record_signal(
    store: Store,
    prompt_key: str,
    answers: Sequence[SignalAnswer],
    *,
    model_manifest_hash: str,
    run_id: int | None = None,
    code_version: str | None = None,
) -> bool:
    """Store every answer of one scored prompt and mark its signal scored, in one transaction;
    returns False (changing nothing) if the prompt was already scored."""
    try:
        return _record(store, prompt_key, answers, model_manifest_hash, run_id, code_version)
    except StoreError:
        # Another worker scored the same prompt at the same instant (PostgreSQL refuses the
        # second set of rows by the unique key): the first stands.
        with store.reading() as session:
            if session.scalar(select(Signal.id).where(Signal.prompt_key == prompt_key)) is None:
                raise
        return False


def _record(store, prompt_key, answers, model_manifest_hash, run_id, code_version) -> bool:
    now = utc_now()
    with store.transaction() as session:
        queued = session.get(SignalPrompt, prompt_key)
        if queued is None:
            raise StoreError(f"no signal to score for prompt {prompt_key!r}")
        if session.scalar(select(Signal.id).where(Signal.prompt_key == prompt_key)) is not None:
            return False
        session.add_all(
            Signal(
                prompt_key=prompt_key,
                label=answer.label,
                answer=answer.answer,
                logprob=answer.logprob,
                answer_tokens=answer.answer_tokens,
                raw_probability=answer.raw_probability,
                content_free_logprob=answer.content_free_logprob,
                content_free_tokens=answer.content_free_tokens,
                content_free_probability=answer.content_free_probability,
                probability=answer.probability,
                model_manifest_hash=model_manifest_hash,
                run_id=run_id,
                code_version=code_version or current_code_version(),
                created_at=now,
            )
            for answer in answers
        )
        queued.status, queued.error, queued.updated_at = "done", None, now
        return True


def mark_signal_failed(store: Store, prompt_key: str, reason: str) -> None:
    """Take a signal out of the queue with the reason it could not be scored."""
    with store.transaction() as session:
        queued = session.get(SignalPrompt, prompt_key)
        if queued is None:
            raise StoreError(f"no signal to score for prompt {prompt_key!r}")
        if queued.status != "done":
            queued.status, queued.error, queued.updated_at = "failed", reason, utc_now()
