"""Scoring jobs over files: JSONL prefixes with candidate answers in, their log-probs out.

The command line's scoring front end (``yalm-runner score``), beside the generation one
(``runner.py``). Each input line is a JSON object with a ``prefix`` string and a ``candidates``
list of strings (and, optionally, an ``id``); each output line keeps the input's fields and adds
``logprobs`` (per candidate, the summed log-probability of its tokens given the prefix and its
earlier tokens) and ``tokens`` (how many tokens each candidate has). A line that cannot be scored
(no candidates, an empty candidate, a prefix + candidate longer than the model's positions) gets
``error`` instead, and the others are still scored. A line that is not a JSON object with those
fields is an error naming the line, before anything is written.

Scored rows are appended to the output as each batch ends (``resume.OutputLog``); at the end the
output is rewritten in input order. A scoring pass is short (one pass over the weights per
batch), so an interrupted job is not resumed: running the command again scores every line again.
The job itself is ``scoring.py``'s; this module owns only the files' side.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from yalm_runner.checkpoint import ModelStore
from yalm_runner.engine import GenerationStats
from yalm_runner.errors import ConfigError
from yalm_runner.offload import OffloadPolicy
from yalm_runner.resume import OutputLog, read_input
from yalm_runner.scoring import ScoredRow, ScoreRow, ScoringJob
from yalm_runner.session import default_dtype, open_session, resolve_devices
from yalm_runner.tokenizer import Tokenizer


@dataclass
class ScoreFileReport:
    """What ``score_file`` did: the engine's work, and the lines that could not be scored."""

    stats: GenerationStats
    scored: int = 0
    failed: list[tuple[int, str]] = field(default_factory=list)  # (input line, reason)
    plan: str = ""


def read_score_rows(path: Path) -> list[dict[str, Any]]:
    """The input rows of ``path`` with their line numbers; ``GenerationError`` names a line
    that is not an object with a ``prefix`` string and a ``candidates`` list of strings."""
    return read_input(path, _candidates_problem, with_line=True)


def _candidates_problem(row: dict[str, Any]) -> str | None:
    candidates = row.get("candidates", [])
    if not isinstance(candidates, list) or not all(isinstance(c, str) for c in candidates):
        return "'candidates' must be a list of strings"
    return None


class JsonlScoreSink:
    """A scoring job's sink in a file: rows appended as they are scored, the output rewritten
    in input order at the end (failed lines carry ``error``)."""

    def __init__(self, output_path: Path, rows: list[dict[str, Any]]):
        self.log = OutputLog(output_path)
        self.location = str(output_path)
        self.keys = [row["__key__"] for row in rows]
        self.fields_by_key = {
            row["__key__"]: {k: v for k, v in row.items() if k not in ("__key__", "__line__")}
            for row in rows
        }
        self.done: dict[str, dict[str, Any]] = {}

    def __enter__(self) -> JsonlScoreSink:
        self.log.remove()  # no resume: a run starts the output over
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.log.close()

    def stored(self, keys: Sequence[str]) -> set[str]:
        return {key for key in keys if key in self.done}

    def failed(self, key: str, reason: str) -> None:
        self._add(key, {**self.fields_by_key[key], "error": reason})

    def finished(self, result: ScoredRow) -> None:
        row = {
            **self.fields_by_key[result.key],
            "logprobs": list(result.logprobs),
            "tokens": list(result.tokens),
        }
        self._add(result.key, row)

    def _add(self, key: str, row: dict[str, Any]) -> None:
        self.log.append(key, row)
        self.done[key] = row

    def complete(self) -> None:
        self.log.finish(self.done[key] for key in self.keys)


def score_file(
    store_path: Path,
    input_path: Path,
    output_path: Path,
    *,
    device: torch.device | str,
    dtype: torch.dtype | None = None,
    batch_size: int | None = None,
    policy: OffloadPolicy | None = None,
    verify: bool = True,
    notify: Callable[[str], None] | None = None,
) -> ScoreFileReport:
    """Score every line of ``input_path`` into ``output_path`` (see the module docstring).

    Lines that cannot be scored are in the report (input line, reason) and carry ``error`` in
    the output; ``notify`` gets the plan for a human.
    """
    if batch_size is not None and batch_size < 1:
        raise ConfigError(f"batch size must be >= 1, got {batch_size}")
    notify = notify or (lambda message: None)
    input_path, output_path = Path(input_path), Path(output_path)
    rows = read_score_rows(input_path)
    line_of = {row["__key__"]: row["__line__"] for row in rows}
    store = ModelStore.open(store_path)
    tokenizer = Tokenizer(store.tokenizer_path)
    devices = resolve_devices(device)
    dtype = dtype or default_dtype(store, devices[0])
    job = ScoringJob(
        [ScoreRow(row["__key__"], row["prefix"], tuple(row.get("candidates", []))) for row in rows],
        tokenizer,
        store.config,
    )
    report = ScoreFileReport(GenerationStats())
    with ExitStack() as stack:
        sink = stack.enter_context(JsonlScoreSink(output_path, rows))
        for key, reason in job.admit():
            report.failed.append((line_of[key], reason))
            sink.failed(key, reason)
        if len(job):
            session = stack.enter_context(
                open_session(
                    store,  # opened above for the tokenizer: not opened and checked twice
                    device=",".join(str(each) for each in devices),
                    dtype=dtype,
                    policy=policy,
                    batch_size=batch_size,
                    verify=verify,
                    tokenizer=tokenizer,
                    score_only=job.shape,
                )
            )
            report.plan = session.score_plan(job.shape, session.batch_size).describe()
            notify(f"plan: {session.plan.describe()}; {report.plan}")
            report.stats = job.run(session, sink, batch_size=session.batch_size)
        else:
            sink.complete()
    report.scored = len(job)
    return report
