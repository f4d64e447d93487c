"""One scoring job, whatever keeps its results: prefixes and candidate answers in, log-probs out.

Scoring is the second kind of job on ``job.py``'s core (generation, ``generation.py``, is the
first): both front ends (the JSONL file, ``scorefile.py``, and the pipeline's database,
``flows/generation/signals.py``) hand their rows to ``ScoringJob``, which owns everything between
text and the engine: encoding each candidate as lm-evaluation-harness does (``encode_row``),
setting aside the rows that cannot be scored (``admit``), skipping those an earlier run stored
(``restore``), sizing the batch in the session (``GenerationSession.score_plan``), and stopping
safely (``job.stopping_safely``). A row's result is the sum of the log-probabilities of each
candidate's tokens and their count; what they mean (probabilities, calibration) is the caller's.

Tokenization follows lm-evaluation-harness's ``loglikelihood``: whitespace at the end of the
prefix moves to the front of the candidate; the candidate's tokens are those that encoding
``prefix + candidate`` gives after as many tokens as the prefix alone has (BOS first, ``[NL]``
for newlines, as ``tokenizer.Tokenizer.encode`` does everywhere). The model reads the encoding of
``prefix + candidate`` itself, so where a token merges across the boundary the candidate is
scored after the prefix as that whole text tokenizes, and the candidates' shared part is shorter.

Nothing is saved mid-batch: a pass is all or nothing, and every scored row goes to its sink as
its batch ends, so an interrupted job loses at most the batch in flight. This module knows
nothing of files, SQL or the pipeline.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from yalm_runner.config import ModelConfig
from yalm_runner.engine import GenerationStats
from yalm_runner.job import GenerationInterrupted, JobSink, stopping_safely
from yalm_runner.packing import Scored, ScoreRequest, score_problem
from yalm_runner.planning import ScorePlan, ScoreShape
from yalm_runner.tokenizer import Tokenizer

if TYPE_CHECKING:
    from yalm_runner.session import GenerationSession


@dataclass(frozen=True)
class ScoreRow:
    """One prefix and its candidate answers, as a front end hands them over."""

    key: str
    prefix: str
    candidates: tuple[str, ...]


@dataclass(frozen=True)
class ScoredRow:
    """A row scored: per candidate, the summed log-probability of its tokens and their count."""

    key: str
    logprobs: tuple[float, ...]
    tokens: tuple[int, ...]
    stats: GenerationStats  # the job's totals when the row's batch ended (for timings)


class ScoringSink(JobSink[ScoredRow], Protocol):
    """Where a scoring job's rows go. Besides ``finished`` and ``complete``: ``stored``."""

    def stored(self, keys: Sequence[str]) -> set[str]:
        """The rows among ``keys`` an earlier run of this job already stored."""
        ...


def encode_row(tokenizer: Tokenizer, prefix: str, candidate: str) -> tuple[int, tuple[int, ...]]:
    """(prefix tokens, ids of prefix + candidate), lm-evaluation-harness's way: the prefix's
    trailing whitespace moves to the candidate, and the candidate's tokens are what the whole
    text's encoding has after as many tokens as the prefix alone."""
    spaces = len(prefix) - len(prefix.rstrip())
    if spaces:
        prefix, candidate = prefix[:-spaces], prefix[-spaces:] + candidate
    context = tokenizer.encode(prefix)
    return len(context), tuple(tokenizer.encode(prefix + candidate))


def row_problem(row: ScoreRow) -> str | None:
    """What is wrong with a row before any token is counted, or None."""
    if not row.candidates:
        return "no candidates"
    for number, candidate in enumerate(row.candidates, start=1):
        if not candidate:
            return f"candidate {number} is empty"
    return None


class ScoringJob:
    """Rows to score on one model: ``admit``, then ``restore``, then ``run`` in a session."""

    def __init__(self, rows: Sequence[ScoreRow], tokenizer: Tokenizer, config: ModelConfig):
        self.rows = {row.key: row for row in rows}
        if len(self.rows) != len(rows):
            raise ValueError("a job's row keys must be unique")
        self.config = config
        self.problems: dict[str, str] = {}
        self.requests: list[ScoreRequest] = []
        for row in rows:
            problem = row_problem(row)
            if problem:
                self.problems[row.key] = problem
                continue
            encoded = [encode_row(tokenizer, row.prefix, text) for text in row.candidates]
            # Every candidate's context is the same prefix: its token count is one number.
            context_len = encoded[0][0]
            request = ScoreRequest(row.key, context_len, tuple(ids for _, ids in encoded))
            self.requests.append(request)
        self.done_before = 0
        self.finished_count = 0
        self.plan: ScorePlan | None = None
        self._engine = None
        self._stats_before = GenerationStats()

    def __len__(self) -> int:
        """The rows to score (those ``admit`` or ``restore`` took out no longer count)."""
        return len(self.requests)

    @property
    def shape(self) -> ScoreShape:
        """What the rows ask of the memory (for the session's plan)."""
        return ScoreShape(
            tokens=max((request.packed_len for request in self.requests), default=1),
            positions=max((request.scored_positions for request in self.requests), default=1),
            rows=max(len(self.requests), 1),
        )

    @property
    def stats(self) -> GenerationStats:
        """What the engine has done for this job so far (nothing before ``run``)."""
        if self._engine is None:
            return GenerationStats()
        return self._engine.stats.since(self._stats_before)

    def admit(self) -> list[tuple[str, str]]:
        """Take out the rows that cannot be scored; return them as (row key, reason)."""
        rejected = [(key, reason) for key, reason in self.problems.items()]
        kept = []
        for request in self.requests:
            problem = score_problem(self.config, request)
            if problem:
                rejected.append((request.key, problem))
            else:
                kept.append(request)
        self.requests = kept
        self.problems = {}
        order = {key: index for index, key in enumerate(self.rows)}
        return sorted(rejected, key=lambda pair: order[pair[0]])

    def restore(self, sink: ScoringSink) -> int:
        """Take out the rows ``sink`` already stored; return how many."""
        stored = sink.stored([request.key for request in self.requests])
        self.requests = [request for request in self.requests if request.key not in stored]
        self.done_before += len(stored)
        return len(stored)

    def run(
        self,
        session: GenerationSession,
        sink: ScoringSink,
        *,
        batch_size: int | None = None,
        catch_signals: bool = True,
    ) -> GenerationStats:
        """Score every row into ``sink``, longest first (less padding), in batches the session's
        plan sizes (``batch_size`` if given and it fits); return what the engine did for it.
        On SIGINT/SIGTERM (when ``catch_signals``) ``GenerationInterrupted`` is raised once the
        row being stored is stored; the batch in flight is scored again by a re-run."""
        engine = self._engine = session.engine
        self._stats_before = copy.deepcopy(engine.stats)
        total = self.done_before + len(self.requests)
        self.plan = session.score_plan(self.shape, batch_size) if self.requests else None

        def interrupted(signum: int) -> GenerationInterrupted:
            done = self.done_before + self.finished_count
            return GenerationInterrupted(signum, sink.location, done, total)

        def on_scored(scored: Scored) -> None:
            row = ScoredRow(scored.key, scored.logprobs, scored.tokens, self.stats)
            with guard.critical():
                sink.finished(row)
                self.finished_count += 1

        # Nothing to save on the way out: every scored row is already in the sink.
        with stopping_safely(lambda: None, interrupted, catch_signals=catch_signals) as guard:
            if self.plan is not None:
                ordered = sorted(self.requests, key=lambda request: -request.packed_len)
                engine.score(
                    ordered,
                    batch_size=self.plan.batch_size,
                    group_rows=self.plan.group_rows,
                    on_scored=on_scored,
                )
            with guard.critical():
                sink.complete()
                guard.disarm()
        return self.stats
