"""Scoring the pending signals: the scoring queue in the store meets the model's scoring job.

Owns the database's side of one scoring job, run in the generation's model session before any
forecast is generated (``forecasting.generate_pending`` builds a ``SignalScoring``, opens the
session, runs it): hand each pending signal to ``yalm_runner.scoring.ScoringJob`` twice (after
its prompt, and after its content-free prompt: the same template with no news items; identical
content-free prompts are scored once), turn the log-likelihoods into probabilities
(``calibrate``), and be the job's sink (``SignalSink``): commit each prompt's answers on their
own, every label in one transaction, as soon as both of its scores are in. A killed job loses
at most the batch in flight; a re-run finds the committed prompts no longer pending and does
not score them again.

A signal that cannot be scored (its prompt and answer longer than the model's positions, an
answer that adds no tokens) is marked failed with the reason and the others go on. Of the model
runner it uses the session and the job, nothing of the engine. It knows nothing of Prefect.

Probabilities (docs/signals.md): an answer's probability is its summed log-likelihood, softmaxed
over the template's answers (no length normalization: the sum is the probability of the whole
answer text, and calibration divides out what an answer's length costs it). Calibration follows
"Calibrate Before Use" (Zhao et al., 2021): the raw probabilities divided by the content-free
ones, renormalized.
"""

from __future__ import annotations

import hashlib
import logging
import math
import time
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from flows.generation.progress import PublisherFactory, RowProgress
from flows.store.database import Store
from flows.store.signals import PendingSignal, SignalAnswer, mark_signal_failed, record_signal

if TYPE_CHECKING:
    from yalm_runner.config import ModelConfig
    from yalm_runner.planning import ScoreShape
    from yalm_runner.scoring import ScoredRow
    from yalm_runner.session import GenerationSession
    from yalm_runner.tokenizer import Tokenizer

log = logging.getLogger(__name__)


def softmax(logprobs: Sequence[float]) -> list[float]:
    """``exp(x_i) / sum_j exp(x_j)``, computed from the largest term down (no overflow)."""
    top = max(logprobs)
    weights = [math.exp(value - top) for value in logprobs]
    total = sum(weights)
    return [weight / total for weight in weights]


def calibrate(raw_logprobs: Sequence[float], free_logprobs: Sequence[float]) -> tuple[
    list[float], list[float], list[float]
]:  # fmt: skip
    """(raw, content-free, calibrated) probabilities over one template's answers: each set
    sums to 1; calibrated is raw / content-free, renormalized (in log space: the two
    normalizing constants cancel)."""
    raw, free = softmax(raw_logprobs), softmax(free_logprobs)
    calibrated = softmax([r - f for r, f in zip(raw_logprobs, free_logprobs, strict=True)])
    return raw, free, calibrated


@dataclass
class ScoreReport:
    """What one scoring step did (counts are prompts)."""

    pending: int = 0
    stored: int = 0
    failed: int = 0
    scoring_s: float = 0.0  # wall time of the step, admission and commits included
    batch_size: int | None = None
    failures: list[tuple[str, str]] = field(default_factory=list)  # (prompt key, reason)


def _free_key(signal: PendingSignal) -> str:
    text = signal.content_free_prefix + "\x00" + "\x00".join(signal.answers.values())
    return "content-free:" + hashlib.sha256(text.encode("utf-8")).hexdigest()


class SignalSink:
    """The scoring job's sink in the store: a prompt's answers are committed once both its
    scores (after the prompt, after the content-free prompt) are in."""

    location = "the database"

    def __init__(
        self,
        store: Store,
        signals: list[PendingSignal],
        report: ScoreReport,
        *,
        model_hash: str,
        run_id: int | None,
        progress: RowProgress | None = None,
    ):
        self.store = store
        self.progress = progress  # the Prefect UI's share of rows scored
        self.by_key = {signal.key: signal for signal in signals}
        self.free_key = {signal.key: _free_key(signal) for signal in signals}
        self.report = report
        self.model_hash = model_hash
        self.run_id = run_id
        self.results: dict[str, ScoredRow] = {}

    def stored(self, keys: Sequence[str]) -> set[str]:
        """Nothing: the pending list already leaves out what an earlier run stored."""
        return set()

    def finished(self, result: ScoredRow) -> None:
        self.results[result.key] = result
        if self.progress is not None:
            self.progress.advance()
        waiting = [result.key] if result.key in self.by_key else [
            key for key, free in self.free_key.items() if free == result.key
        ]  # fmt: skip
        for key in waiting:
            free = self.results.get(self.free_key[key])
            if key in self.results and free is not None:
                self._commit(self.by_key[key], self.results[key], free)

    def _commit(self, signal: PendingSignal, raw: ScoredRow, free: ScoredRow) -> None:
        raw_p, free_p, calibrated = calibrate(raw.logprobs, free.logprobs)
        answers = [
            SignalAnswer(
                label=label,
                answer=signal.answers[label],
                logprob=raw.logprobs[index],
                answer_tokens=raw.tokens[index],
                raw_probability=raw_p[index],
                content_free_logprob=free.logprobs[index],
                content_free_tokens=free.tokens[index],
                content_free_probability=free_p[index],
                probability=calibrated[index],
            )
            for index, label in enumerate(signal.answers)
        ]
        if record_signal(self.store, signal.key, answers, model_manifest_hash=self.model_hash,
                         run_id=self.run_id):  # fmt: skip
            self.report.stored += 1

    def complete(self) -> None:
        """Nothing to do: each prompt's answers were committed as their scores came in."""


class SignalScoring:
    """One scoring step over ``signals``: built (and its rows admitted: those that cannot be
    scored are marked failed) before the session opens, so that ``shape`` can plan one; then
    ``run`` in the session (see the module docstring)."""

    def __init__(
        self,
        store: Store,
        tokenizer: Tokenizer,
        config: ModelConfig,
        signals: list[PendingSignal],
    ):
        from yalm_runner.scoring import ScoreRow, ScoringJob

        self.began = time.perf_counter()
        self.store = store
        self.report = ScoreReport(pending=len(signals))
        rows, free_rows = [], {}
        for signal in signals:
            answers = tuple(signal.answers.values())
            rows.append(ScoreRow(signal.key, signal.prefix, answers))
            free = _free_key(signal)
            free_rows.setdefault(free, ScoreRow(free, signal.content_free_prefix, answers))
        self.job = ScoringJob([*rows, *free_rows.values()], tokenizer, config)
        rejected = dict(self.job.admit())
        self.runnable = []
        for signal in signals:
            reason = rejected.get(signal.key) or rejected.get(_free_key(signal))
            if reason is None:
                self.runnable.append(signal)
                continue
            where = "prompt" if signal.key in rejected else "content-free prompt"
            self._fail(signal, f"{where}: {reason}", mark=True)
        needed = {signal.key for signal in self.runnable}
        needed |= {_free_key(signal) for signal in self.runnable}
        self.job.requests = [request for request in self.job.requests if request.key in needed]

    @property
    def shape(self) -> ScoreShape:
        return self.job.shape

    def run(
        self,
        session: GenerationSession,
        *,
        run_id: int | None,
        publish: PublisherFactory | None = None,
    ) -> ScoreReport:
        """Score the admitted signals in ``session``. An error of the model (out of memory,
        say) ends the step, not the night: it is reported as every unscored signal's failure,
        and they stay pending for the next run. Ctrl-C goes on to the caller. ``publish`` gives
        a publisher of the share of rows scored (``flows.generation.progress``)."""
        report = self.report
        publisher = publish("scoring") if publish is not None and self.runnable else None
        progress = None if publisher is None else RowProgress(publisher, len(self.job),
                                                              "prompts scored")  # fmt: skip
        sink = SignalSink(
            self.store, self.runnable, report, model_hash=session.store.manifest_sha256,
            run_id=run_id, progress=progress,
        )  # fmt: skip
        try:
            if self.runnable:
                log.info("score: %d signals on %s", len(self.runnable), session.device)
                # Signals stay with the caller (Prefect, the command line), as for generation.
                with publisher or nullcontext():
                    self.job.run(session, sink, catch_signals=False)
        except Exception as exc:  # the model failed: the night goes on to its forecasts
            for signal in self.runnable:
                if signal.key not in sink.results or _free_key(signal) not in sink.results:
                    self._fail(signal, f"scoring stopped: {exc}", mark=False)
        finally:
            report.batch_size = self.job.plan.batch_size if self.job.plan else None
            report.scoring_s = time.perf_counter() - self.began
        return report

    def _fail(self, signal: PendingSignal, reason: str, *, mark: bool) -> None:
        if mark:
            mark_signal_failed(self.store, signal.key, reason)
        self.report.failed += 1
        self.report.failures.append((signal.key, reason))
        log.error("score: %s %s: %s", signal.template_name, signal.ticker or "", reason)
