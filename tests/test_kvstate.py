"""Exact resume's files on their own: KV frames written by a real batch, read back into a
rebuilt one, and state folders that cannot be trusted (the kill tests of whole processes are
tests/test_resume_exact.py)."""

from __future__ import annotations

import json

import pytest
import torch

from yalm_runner.batchstate import PlannedBatch
from yalm_runner.checkpoint import ModelStore
from yalm_runner.config import SamplingParams
from yalm_runner.engine import Engine, Request
from yalm_runner.kvstate import STATE_NAME, ExactState
from yalm_runner.offload import ResidentWeights

SAMPLED = SamplingParams(temperature=0.8, top_p=0.9, seed=7)
REQUESTS = tuple(
    Request(f"row-{n}", (1, *range(100 + n, 104 + 2 * n)), 5 + 3 * n) for n in range(5)
)


class Stop(Exception):
    pass


@pytest.fixture(scope="module")
def weights(tiny_store):
    return ResidentWeights(ModelStore.open(tiny_store), "cpu", torch.float32)


@pytest.mark.parametrize(
    ("kv_on", "bits", "layout"), [("gpu", 16, "rows"), ("cpu", 8, "rows"), ("cpu", 4, "slots")]
)
def test_frames_read_back_into_a_rebuilt_batch_go_on_to_the_same_ids(
    weights, tmp_path, kv_on, bits, layout
):
    def engine() -> Engine:
        return Engine(weights, kv_on=kv_on, kv_bits=bits, kv_layout=layout)

    straight = {}
    engine().run_batches([PlannedBatch(0, REQUESTS, SAMPLED)],
                         on_finished=lambda done: straight.update({done.key: done}))  # fmt: skip
    state = ExactState(tmp_path / "kv", None, lambda: None)

    def checkpoint(live) -> None:
        state.commit(state.write_kv(live))
        if live.step == 9:  # rows have left: the slot-major layout compacted on the way
            raise Stop

    with pytest.raises(Stop):
        engine().run_batches([PlannedBatch(0, REQUESTS, SAMPLED)], checkpoint_every=3,
                             on_checkpoint=checkpoint)  # fmt: skip
    header = state.batches["0"]["current"]
    assert len(header["frames"]) == 3 and header["step"] == 9 and len(header["rows"]) < 5
    # A fresh state as a re-run reads it from the record alone.
    again = ExactState(tmp_path / "kv", json.loads(json.dumps(state.to_dict())), lambda: None)
    restore, problem = again.restore_point(0)
    assert problem is None and restore.rows == tuple(header["rows"])
    resumed = {}
    engine().run_batches([PlannedBatch(0, REQUESTS, SAMPLED, restore)],
                         on_finished=lambda done: resumed.update({done.key: done}))  # fmt: skip
    assert resumed == {key: straight[key] for key in header["keys"]}


def test_a_state_folder_of_another_model_or_a_damaged_one_is_dropped_with_one_line(tmp_path):
    folder = tmp_path / "worker"
    state, problem = ExactState.in_folder(folder, "model-a")
    assert problem is None and state.plan is None
    state.record_plan({"batches": []}, replay=False)
    (folder / "batch-00000.kv").write_bytes(b"frames")
    kept, problem = ExactState.in_folder(folder, "model-a")
    assert problem is None and kept.plan == {"batches": []}

    other, problem = ExactState.in_folder(folder, "model-b")
    assert problem == f"{folder / STATE_NAME} belongs to another model or worker; dropped"
    assert other.plan is None and not folder.exists()

    state.record_plan({"batches": []}, replay=False)
    (folder / STATE_NAME).write_text('{"format": "yalm-runner-exact-state", "owner": "mo', "utf-8")
    damaged, problem = ExactState.in_folder(folder, "model-a")
    assert problem.startswith(f"{folder / STATE_NAME} is damaged (")
    assert problem.endswith("); dropped: rows go on from their saved ids")
    assert damaged.plan is None and not folder.exists()
