"""Several devices: batches alternate between engines and the output is one engine's."""

import pytest
import torch

from yalm_runner import hostattn
from yalm_runner.checkpoint import ModelStore
from yalm_runner.config import SamplingParams
from yalm_runner.engine import Engine, Request
from yalm_runner.errors import ConfigError, GenerationError
from yalm_runner.multigpu import MultiEngine
from yalm_runner.offload import OffloadPolicy, plan_placement
from yalm_runner.session import open_session, resolve_devices
from yalm_runner.streaming import StreamingWeights, part_bytes_in

SAMPLED = SamplingParams(temperature=1.0, top_p=0.9, seed=11)
REQUESTS = [
    Request(f"row{n}", tuple([1, *range(100 + n, 100 + n + 1 + n % 4)]), 4 + n % 5)
    for n in range(7)
]


def two_sources(store, placement):
    first = StreamingWeights(store, "cpu", torch.float32, placement)
    second = StreamingWeights(store, "cpu", torch.float32, placement, share_pinned=first)
    return first, second


@pytest.fixture(scope="module")
def store(tiny_store):
    return ModelStore.open(tiny_store)


@pytest.fixture(scope="module")
def placement(store):
    return plan_placement(part_bytes_in(store, torch.float32), OffloadPolicy(weights_on="cpu"))


def test_two_engines_give_one_engines_output_and_share_pinned_layers(store, placement):
    first, second = two_sources(store, placement)
    with first, second:
        assert second._pinned[0] is first._pinned[0]
        expected = Engine(first).generate(REQUESTS, SAMPLED, batch_size=2)
        seen = []
        multi = MultiEngine([Engine(first), Engine(second)])
        got = multi.generate(REQUESTS, SAMPLED, batch_size=2, on_finished=seen.append)
    assert got == expected
    assert sorted(done.key for done in seen) == sorted(r.key for r in REQUESTS)
    # Four batches of two, alternating: both engines worked.
    assert [len(engine.stats.batch_sizes) for engine in multi.engines] == [2, 2]
    assert multi.stats.new_tokens == sum(len(done.new_ids) for done in got)


def test_a_failure_on_one_device_stops_the_others_and_is_raised(store, placement):
    first, second = two_sources(store, placement)

    def stop(request, generated):
        if request.key == "row2":  # the second batch: the second engine's
            raise GenerationError("row2: broken stop rule")
        return False

    with first, second:
        multi = MultiEngine([Engine(first), Engine(second)])
        with pytest.raises(GenerationError, match="row2: broken stop rule"):
            multi.generate(REQUESTS, SAMPLED, batch_size=2, stop=stop)


def test_several_engines_report_the_width_their_kv_cache_is_kept_in(store, placement):
    # A saved job's fingerprint reads it from the session, whatever engine the session holds.
    # With kv_on auto, a 4-bit policy whose plan keeps the KV cache on the GPU keeps 16 bits.
    first, second = two_sources(store, placement)
    with first, second:
        for kv_on, bits, kept in (("gpu", 4, 16), ("cpu", 16, 16), ("cpu", 4, 4)):
            engines = [Engine(source, kv_on=kv_on, kv_bits=bits) for source in (first, second)]
            assert engines[0].kv_stored_bits == MultiEngine(engines).kv_stored_bits == kept


@pytest.mark.skipif(not hostattn.available(), reason=f"{hostattn.unavailable_reason()}")
def test_engines_attending_on_the_host_share_its_cores_and_give_one_engines_output(
    store, placement
):
    first, second = two_sources(store, placement)
    with first, second:

        def engine(source):
            return Engine(source, kv_on="cpu", kv_bits=4, kv_attention="host")

        expected = engine(first).generate(REQUESTS, SAMPLED, batch_size=2)
        multi = MultiEngine([engine(first), engine(second), Engine(first)])
        share = max(1, torch.get_num_threads() // 2)  # two of the three attend on the host
        assert [e.host_threads for e in multi.engines] == [share, share, None]
        multi = MultiEngine(multi.engines[:2])
        assert multi.generate(REQUESTS, SAMPLED, batch_size=2) == expected


def test_device_lists_are_checked():
    assert resolve_devices("cpu") == [torch.device("cpu")]
    with pytest.raises(ConfigError, match="named twice"):
        resolve_devices("cuda:1,cuda:1")
    with pytest.raises(ConfigError, match=r"^device: auto, cpu, cuda, cuda:N, .* got 'tpu'$"):
        resolve_devices("tpu")
    with pytest.raises(ConfigError, match=r"^device: .* got 'cpu,cuda:0'$"):
        resolve_devices("cpu,cuda:0")  # a list is of GPUs only
    resolved = resolve_devices("cpu")
    assert resolve_devices(resolved) is not resolved and resolve_devices(resolved) == resolved
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="no CUDA device is available"):
            resolve_devices("cuda:0,cuda:1")


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_two_gpus_give_one_gpus_output_in_bf16(tiny_store):
    policy = OffloadPolicy(weights_on="cpu")
    results = {}
    for devices in ("cuda:0", "cuda:0,cuda:1"):
        with open_session(tiny_store, device=devices, policy=policy, batch_size=2) as session:
            results[devices] = session.engine.generate(REQUESTS, SAMPLED, batch_size=2)
    assert results["cuda:0"] == results["cuda:0,cuda:1"]


def test_the_scaling_report_reads_as_a_table():
    from yalm_runner.bench.multigpu import format_report

    report = {
        "shape": "13b",
        "layers": 40,
        "links_pinned_gbps": [55.1, 54.9],
        "plan": "batch 128 rows",
        "runs": [
            {"gpus": 1, "rows": 256, "batch": 128, "elapsed_s": 60.0, "tokens_per_s": 136.5,
             "peak_gpu_bytes": 7 * 2**30},
            {"gpus": 2, "rows": 256, "batch": 128, "elapsed_s": 31.0, "tokens_per_s": 264.2,
             "peak_gpu_bytes": 7 * 2**30},
        ],
        "identical_output": True,
    }  # fmt: skip
    text = format_report(report, OffloadPolicy(gpu_memory_bytes=8 * 2**30))
    assert "| 2 | 256 | 128 | 31.0 s | 264.2 | 7.00 GiB (8 GiB) | 1.94x |" in text
    assert "pinned GB/s per GPU link: 55.1, 54.9" in text
    assert "identical output, token for token: True" in text


def test_a_plan_replayed_over_two_engines_resumes_each_live_batch_exactly(
    store, placement, flat_store
):
    """Batches are dealt over the devices; each live batch checkpoints its own KV, and a re-run
    restores every one of them. (Engines on the CPU stand in for two GPUs of one model.)"""
    from test_generation_job import MemorySink

    from yalm_runner.generation import GenerationJob, JobRow
    from yalm_runner.session import GenerationSession

    flat = ModelStore.open(flat_store)
    texts = ["The market", "Oil prices fell", "Analysts expect", "Gold", "Shares of", "Bonds"]
    job_rows = [JobRow(f"row-{n}", f"{texts[n % 6]} {n}", 6 + 3 * n, SAMPLED) for n in range(8)]
    flat_placement = plan_placement(part_bytes_in(flat, torch.float32), OffloadPolicy())

    def run(sink, finished=(), lines=None):
        first, second = two_sources(flat, flat_placement)
        with first, second, open_session(flat, device="cpu", batch_size=2) as plain:
            multi = MultiEngine([Engine(first), Engine(second)])
            session = GenerationSession(flat, plain.tokenizer, multi, plain.plan)
            job = GenerationJob(job_rows, plain.tokenizer, flat.config, finished=finished)
            job.restore(sink)
            job.run(session, sink, checkpoint_every=2, kv_checkpoint_interval_s=1e-9,
                    notify=None if lines is None else lines.append)  # fmt: skip

    class BothInFlight(MemorySink):
        """Stops the job (as a kill would) at the first checkpoint at which both devices' live
        batches hold a KV checkpoint: by state, not by how the threads happened to run."""

        stop = True

        def checkpoint(self, state):
            super().checkpoint(state)
            if self.stop and len(self.exact.kv) == 2:
                raise RuntimeError("stopped (simulated)")

    reference = MemorySink()
    run(reference)
    sink = BothInFlight()
    with pytest.raises(RuntimeError, match="simulated"):
        run(sink)
    assert len(sink.exact.kv) == 2, "both devices had a batch in flight with a KV checkpoint"
    sink.stop, lines = False, []
    run(sink, finished=list(sink.rows), lines=lines)
    assert sum("goes on from its KV checkpoint" in line for line in lines) == 2, lines
    assert sorted(sink.stored) == sorted(reference.stored)
    assert {k: r.new_ids for k, r in sink.rows.items()} == {
        k: r.new_ids for k, r in reference.rows.items()
    }
