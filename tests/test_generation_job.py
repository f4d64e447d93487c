"""The generation job on its own: a tiny model on the CPU and a sink that keeps everything in
memory, its KV checkpoints included (the two real sinks, the JSONL file and the database, have
their own tests; exact resume of real processes is tests/test_resume_exact.py)."""

from __future__ import annotations

import os
import signal

import pytest

from yalm_runner.batchplan import BatchPlan
from yalm_runner.batchstate import BatchRestore, KVDelta
from yalm_runner.config import SamplingParams
from yalm_runner.generation import Checkpoint, FinishedRow, GenerationJob, JobRow
from yalm_runner.job import GenerationInterrupted, SignalGuard
from yalm_runner.session import open_session

SAMPLED = SamplingParams(temperature=1.0, top_p=0.9, seed=11)
GREEDY = SamplingParams(greedy=True)
TEXTS = ["The market", "Oil prices fell", "Analysts expect", "Gold", "Shares of", "Bonds"]


class MemoryExact:
    """A job's plan and KV checkpoints kept in memory as ``kvstate.ExactState`` keeps them in
    files (the plan through its dict, deltas copied out of the engine, headers per batch), so
    that a second job over the same sink resumes as from files."""

    def __init__(self):
        self.plan: BatchPlan | None = None
        self.replayed: bool | None = None
        self.kv: dict[int, tuple[dict, list[KVDelta]]] = {}  # batch -> (header, its deltas)
        self.done_batches: list[int] = []

    def record_plan(self, plan: dict, *, replay: bool) -> None:
        self.plan, self.replayed = BatchPlan.from_dict(plan), replay
        if not replay:
            self.kv = {}

    def restore_point(self, index: int):
        if index not in self.kv:
            return None, None
        header, deltas = self.kv[index]
        return BatchRestore(deltas=lambda: iter(deltas), **header), None

    def write_kv(self, live):
        delta = live.kv_delta()
        copies = [tuple(part.clone() for part in delta.read(n)) for n in range(len(delta.firsts))]
        kept = KVDelta(delta.rows, delta.length, delta.firsts, delta.record_shape, delta.dtype,
                       copies.__getitem__)  # fmt: skip
        header = dict(step=live.step, length=live.length, rows=live.rows,
                      generated=tuple(live.ids.values()), layout=live.layout)  # fmt: skip
        return live.index, header, kept

    def commit(self, frame) -> None:
        index, header, delta = frame
        deltas = self.kv.get(index, ({}, []))[1]
        self.kv[index] = (header, [*deltas, delta])

    def batch_done(self, index: int) -> None:
        self.done_batches.append(index)
        self.kv.pop(index, None)


class MemorySink:
    """Everything the job hands over, in order; ``saved`` is what ``load`` gives back; the plan
    and the KV checkpoints are in ``exact``."""

    location = "memory"

    def __init__(self, saved: dict[str, tuple[int, ...]] | None = None, on_finished=None):
        self.saved = saved or {}
        self.on_finished = on_finished
        self.loaded: list[str] = []
        self.rows: dict[str, FinishedRow] = {}
        self.stored: list[str] = []  # every key handed to ``finished``, repeats included
        self.checkpoints: list[Checkpoint] = []
        self.saves: list[Checkpoint] = []
        self.completed = 0
        self.exact = MemoryExact()

    def load(self, keys):
        self.loaded = list(keys)
        ids = {key: self.saved[key] for key in keys if key in self.saved}
        return Checkpoint(ids, self.exact.plan)

    def finished(self, row: FinishedRow) -> None:
        self.rows[row.key] = row
        self.stored.append(row.key)
        if self.on_finished is not None:
            self.on_finished(row)

    def checkpoint(self, state: Checkpoint) -> None:
        self.checkpoints.append(state)
        self.saved.update(state.ids)
        if state.kv is not None:
            self.exact.commit(state.kv)

    def save(self, state: Checkpoint) -> None:
        self.saves.append(state)
        self.saved.update(state.ids)

    def complete(self) -> None:
        self.completed += 1


def short_first() -> list[JobRow]:
    """A two-token row, then ``rows()``: it finishes while its batch-mate is in flight."""
    return [JobRow("short", "Gold", 2, SAMPLED), *rows()]


def rows(count: int = 6, max_new_tokens: int = 10, sampling=SAMPLED, **extra) -> list[JobRow]:
    return [
        JobRow(f"row-{n}", f"{TEXTS[n % len(TEXTS)]} {n}", max_new_tokens, sampling, **extra)
        for n in range(count)
    ]


@pytest.fixture(scope="module")
def session(tiny_store):
    with open_session(tiny_store, device="cpu", batch_size=2) as session:
        yield session


def run(session, job_rows, sink, *, checkpoint_every=0, kv_every_s=0.0, lines=None, **options):
    job = GenerationJob(job_rows, session.tokenizer, session.store.config, **options)
    assert job.admit() == []
    misfits = job.restore(sink)
    notify = None if lines is None else lines.append
    job.run(session, sink, checkpoint_every=checkpoint_every, kv_checkpoint_interval_s=kv_every_s,
            notify=notify)  # fmt: skip
    return job, misfits


@pytest.fixture(scope="module")
def reference(session):
    """The ids of an uninterrupted job over ``rows()``."""
    sink = MemorySink()
    run(session, rows(), sink)
    return {key: row.new_ids for key, row in sink.rows.items()}


def test_every_row_reaches_the_sink_once_and_the_job_is_completed(session, reference):
    assert sorted(reference) == [f"row-{n}" for n in range(6)]
    assert len(set(reference.values())) == 6
    sink = MemorySink()
    mixed = rows(3) + rows(6, sampling=GREEDY)[3:]
    job, _ = run(session, mixed, sink)
    assert sorted(sink.rows) == sorted(reference) and sink.completed == 1
    # Grouped by sampling settings: the sampled rows' ids are the all-sampled job's.
    assert all(sink.rows[f"row-{n}"].new_ids == reference[f"row-{n}"] for n in range(3))
    for row in sink.rows.values():
        assert row.text == session.tokenizer.continuation(list(row.prompt_ids), list(row.new_ids))
    # The session ran other jobs before: the job's own work is counted.
    assert job.stats.rows == 6 and job.stats.new_tokens == sum(
        len(row.new_ids) for row in sink.rows.values()
    )
    assert job.stats.batch_sizes == [2, 1, 2, 1]  # two groups of three rows


def test_rows_the_model_cannot_take_are_set_aside_with_the_reason(session):
    job_rows = [*rows(2), JobRow("long", "The market rose. " * 400, 8, SAMPLED)]
    job = GenerationJob(job_rows, session.tokenizer, session.store.config)
    rejected = job.admit()
    assert [key for key, _ in rejected] == ["long"]
    assert "new tokens exceed the model's 1024 positions" in rejected[0][1]
    assert [request.key for request in job.requests] == ["row-0", "row-1"]


def test_a_row_restored_from_saved_ids_ends_as_an_uninterrupted_row(session, reference):
    saved = {"row-1": reference["row-1"][:4], "row-4": reference["row-4"][:1]}
    sink, lines = MemorySink(saved), []
    job, misfits = run(session, rows(), sink, lines=lines)
    assert misfits == [] and job.resumed == 2
    # Without the plan they began in (ids another worker left, or a state of an older version).
    assert lines == [
        "resume is not exact: 2 rows go on from saved ids without the batch plan they began in"
    ]
    assert {key: row.new_ids for key, row in sink.rows.items()} == reference


def test_saved_ids_that_do_not_fit_are_named_and_the_row_starts_over(session, reference):
    vocab_size = session.store.config.vocab_size
    saved = {
        "row-0": tuple(range(1, 12)),  # more than its 10 new tokens
        "row-2": (5, vocab_size),  # outside the vocabulary
        "row-3": reference["row-3"][:2],
    }
    sink = MemorySink(saved)
    job, misfits = run(session, rows(), sink)
    assert misfits == ["row-0", "row-2"] and job.resumed == 1
    assert {key: row.new_ids for key, row in sink.rows.items()} == reference


def test_checkpoints_carry_the_ids_of_the_rows_in_flight(session, reference):
    sink = MemorySink()
    run(session, rows(), sink, checkpoint_every=2)
    assert sink.checkpoints and sink.saves == []
    for state in sink.checkpoints:
        assert 0 < len(state.ids) <= session.batch_size
        for key, ids in state.ids.items():
            assert 0 < len(ids) < len(reference[key]) and reference[key][: len(ids)] == ids


def test_every_decode_step_reports_the_tokens_it_added_before_its_rows_finish(session):
    steps: list[int] = []
    finished_at: list[int] = []  # how many steps had been reported when each row finished
    sink = MemorySink(on_finished=lambda row: finished_at.append(len(steps)))
    job_rows = [JobRow("short", "Gold", 2, SAMPLED), *rows(3, max_new_tokens=5)]
    job = GenerationJob(job_rows, session.tokenizer, session.store.config)
    job.restore(sink)
    job.run(session, sink, checkpoint_every=0, on_step=steps.append)
    # Batches of two: (short, row-0) then (row-1, row-2); a row leaves its batch as it ends.
    assert steps == [2, 2, 1, 1, 1, 2, 2, 2, 2, 2]
    assert sum(steps) == job.stats.new_tokens == sum(len(r.new_ids) for r in sink.rows.values())
    assert finished_at == [2, 5, 10, 10]


def test_saved_ids_that_already_end_in_a_stop_string_finish_the_row_at_once(session, reference):
    text = session.tokenizer.continuation(
        list(session.tokenizer.encode(f"{TEXTS[5]} 5")), list(reference["row-5"][:6])
    )
    assert len(text) >= 2
    stop = text[-2:]
    sink = MemorySink({"row-5": reference["row-5"][:6]})
    run(session, rows(), sink, stop=(stop,))
    assert sink.rows["row-5"].finish_reason == "stop"
    assert sink.rows["row-5"].new_ids == reference["row-5"][:6]
    assert sink.rows["row-5"].text.endswith(stop)


def test_an_error_saves_the_rows_in_flight_and_goes_on(session, reference):
    def out_of_memory(row):
        raise RuntimeError("CUDA out of memory (simulated)")

    sink = MemorySink(on_finished=out_of_memory)
    with pytest.raises(RuntimeError, match="simulated"):
        run(session, short_first(), sink)
    assert len(sink.saves) == 1 and sink.completed == 0
    (state,) = sink.saves
    assert state.ids, "the rows in flight were not saved"
    for key, ids in state.ids.items():
        assert reference[key][: len(ids)] == ids


def test_a_failed_save_is_noted_on_the_error_that_stopped_the_job(session):
    class BrokenSink(MemorySink):
        def save(self, state):
            raise OSError("disk full (simulated)")

    def stop_job(row):
        raise RuntimeError("the first failure")

    with pytest.raises(RuntimeError, match="the first failure") as caught:
        run(session, rows(3), BrokenSink(on_finished=stop_job))
    assert any("disk full" in note for note in caught.value.__notes__)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_waits_for_the_sink_then_saves_and_raises_its_number(session, signum):
    def signal_mid_write(row):
        os.kill(os.getpid(), signum)  # lands inside the sink's write: must be deferred
        sink.written_after_signal = row.key

    sink = MemorySink(on_finished=signal_mid_write)
    before = signal.getsignal(signum)
    with pytest.raises(GenerationInterrupted) as caught:
        run(session, rows(), sink, done_before=4)
    assert caught.value.signum == signum
    assert (caught.value.rows_done, caught.value.rows_total) == (5, 10)
    assert str(caught.value).startswith(f"interrupted by {signum.name} with 5/10 rows done")
    assert sink.written_after_signal in sink.rows
    assert len(sink.saves) == 1 and sink.completed == 0
    assert signal.getsignal(signum) is before


def test_with_signals_left_to_the_caller_ctrl_c_still_saves_the_rows_in_flight(session):
    def ctrl_c(row):
        raise KeyboardInterrupt

    sink = MemorySink(on_finished=ctrl_c)
    job = GenerationJob(short_first(), session.tokenizer, session.store.config)
    job.restore(sink)
    before = signal.getsignal(signal.SIGINT)
    with pytest.raises(KeyboardInterrupt):
        job.run(session, sink, checkpoint_every=0, catch_signals=False)
    assert len(sink.saves) == 1 and sink.saves[0].ids
    assert signal.getsignal(signal.SIGINT) is before


def test_the_guard_defers_a_signal_until_the_critical_section_ends():
    seen = []
    with SignalGuard(seen.append) as guard:
        with guard.critical():
            os.kill(os.getpid(), signal.SIGTERM)
            assert seen == []
        assert seen == [signal.SIGTERM]
        os.kill(os.getpid(), signal.SIGTERM)  # fired once: later signals are ignored
        assert seen == [signal.SIGTERM]


def test_a_job_refuses_two_rows_with_one_key(session):
    with pytest.raises(ValueError, match="unique"):
        GenerationJob(rows(2) + rows(1), session.tokenizer, session.store.config)


def stop_after(count: int):
    """An ``on_finished`` that stops the job (as a kill would) once ``count`` rows are stored."""

    def stop(row):
        stop.seen += 1
        if stop.seen == count:
            raise RuntimeError("stopped (simulated)")

    stop.seen = 0
    return stop


def test_a_rerun_replays_the_plan_from_its_kv_checkpoint_and_stores_each_row_once(
    session, reference
):
    sink = MemorySink(on_finished=stop_after(3))
    with pytest.raises(RuntimeError, match="simulated"):
        run(session, short_first(), sink, checkpoint_every=2, kv_every_s=1e-9)
    assert sink.exact.plan is not None and sink.exact.replayed is False and sink.exact.kv
    first_plan, live = sink.exact.plan, sorted(sink.exact.kv)
    (index,) = live
    finished = list(sink.rows)
    sink.on_finished = None
    lines: list[str] = []
    run(session, short_first(), sink, checkpoint_every=2, kv_every_s=1e-9, lines=lines,
        finished=finished)  # fmt: skip
    assert sink.exact.replayed is True and sink.exact.plan.arithmetic == first_plan.arithmetic
    # The same batches; those all done when the plan was recorded again are empty places.
    for again, first in zip(sink.exact.plan.batches, first_plan.batches, strict=True):
        assert again == first or (not again and all(key in finished for key, _ in first))
    assert f"batch {index} goes on from its KV checkpoint" in lines[0] and len(lines) == 1
    assert sorted(sink.stored) == sorted(["short", *reference]), "a row was stored twice"
    assert {key: sink.rows[key].new_ids for key in reference} == reference
    assert sink.exact.done_batches.count(index) == 1 and sink.exact.kv == {}


def test_a_batch_with_no_kv_checkpoint_is_recomputed_with_its_finished_rows(session, reference):
    sink = MemorySink(on_finished=stop_after(2))  # "short" and one more of its batch-mates
    with pytest.raises(RuntimeError, match="simulated"):
        run(session, short_first(), sink, checkpoint_every=2)
    finished = list(sink.rows)
    sink.on_finished = None
    job, _ = run(session, short_first(), sink, checkpoint_every=2, finished=finished)
    assert sorted(sink.stored) == sorted(["short", *reference])
    assert {key: sink.rows[key].new_ids for key in reference} == reference
    # The live batch ran again whole, its finished rows with it: its first batch is full.
    assert job.stats.batch_sizes[0] == session.batch_size


def test_rows_new_to_the_job_run_after_the_plan_in_batches_of_their_own(session, reference):
    sink = MemorySink(on_finished=stop_after(2))
    with pytest.raises(RuntimeError, match="simulated"):
        run(session, rows(4), sink)
    planned = [key for batch in sink.exact.plan.batches for key, _ in batch]
    finished = list(sink.rows)
    sink.on_finished = None
    run(session, rows(), sink, finished=finished)
    assert len(sink.exact.plan.batches) == 3 and sink.exact.plan.batches[0] == ()  # done: forgotten
    assert [key for key, _ in sink.exact.plan.batches[1]] == planned[2:]
    new_batches = sink.exact.plan.batches[2:]
    assert {key for batch in new_batches for key, _ in batch} == {"row-4", "row-5"}
    assert {key: row.new_ids for key, row in sink.rows.items()} == reference


def test_other_arithmetic_resumes_from_ids_in_one_line_and_records_a_new_plan(session, reference):
    sink = MemorySink(on_finished=stop_after(1))  # "short": its batch-mate is in flight
    with pytest.raises(RuntimeError, match="simulated"):
        run(session, short_first(), sink, checkpoint_every=2, kv_every_s=1e-9)
    plan = sink.exact.plan
    sink.exact.plan = BatchPlan({**plan.arithmetic, "batch size": 5}, plan.sizing, plan.batches)
    sink.on_finished, finished, lines = None, list(sink.rows), []
    run(session, short_first(), sink, checkpoint_every=2, lines=lines, finished=finished)
    assert lines == [
        "resume is not exact: batch size 5 -> 2; the unfinished rows go on from their saved ids"
    ]
    assert sink.exact.replayed is False and sink.exact.plan.arithmetic["batch size"] == 2
    assert sorted(sink.stored) == sorted(["short", *reference])
    starts = {key: start for batch in sink.exact.plan.batches for key, start in batch}
    assert "short" not in starts and starts["row-0"] == reference["row-0"][:2]


def test_a_planned_batch_that_lost_a_row_lets_the_others_go_on_and_says_so(session, reference):
    sink = MemorySink(on_finished=stop_after(1))  # "short": batches 1-3 are not started
    with pytest.raises(RuntimeError, match="simulated"):
        run(session, short_first(), sink, checkpoint_every=2, kv_every_s=1e-9)
    assert [key for key, _ in sink.exact.plan.batches[2]] == ["row-3", "row-4"]
    sink.on_finished, lines = None, []
    # "row-4" is no longer this job's (failed, or another worker holds it).
    others = [row for row in short_first() if row.key != "row-4"]
    run(session, others, sink, checkpoint_every=2, lines=lines, finished=["short"])
    assert lines[-1] == (
        "resume is not exact for the rows of 1 planned batches that lost rows to failure or to "
        "another worker; they go on from their saved ids"
    )
    assert sorted(sink.stored) == sorted(["short", *(key for key in reference if key != "row-4")])
    batches = sink.exact.plan.batches
    assert batches[2] == () and [key for key, _ in batches[-1]] == ["row-3"]
