"""The converter: the release layout in, an exact store out, bad releases named, memory bounded."""

import json
import subprocess
import sys
import textwrap

import pytest
import torch

from yalm_runner.checkpoint import ModelStore
from yalm_runner.config import SamplingParams
from yalm_runner.convert import convert_release
from yalm_runner.engine import Engine, Request
from yalm_runner.errors import CheckpointError, ConfigError
from yalm_runner.offload import QuantizedResidentWeights, ResidentWeights
from yalm_runner.quant import Quantization
from yalm_runner.release import load_release_file, release_file_name
from yalm_runner.tiny import TinySpec, make_tiny


def release_tensors(release, slot):
    return load_release_file(release / "weights" / release_file_name(slot))


def test_round_trip_is_exact(tiny_release, tiny_store):
    store = ModelStore.open(tiny_store)
    embedding = store.read_part("embedding")
    assert torch.equal(
        embedding["word_embeddings.weight"],
        release_tensors(tiny_release, 0)["word_embeddings.weight"],
    )
    assert torch.equal(
        embedding["input_layernorm.bias"], release_tensors(tiny_release, 1)["input_layernorm.bias"]
    )
    for layer_idx in range(store.config.num_layers):
        ours = store.read_part(f"layer_{layer_idx}")
        theirs = release_tensors(tiny_release, layer_idx + 3)
        assert set(ours) == set(theirs)
        assert all(torch.equal(ours[name], theirs[name]) for name in ours)
    head = store.read_part("head")
    theirs = release_tensors(tiny_release, store.config.num_layers + 4)
    assert all(torch.equal(head[name], theirs[name]) for name in head)
    assert store.config.num_layers == 3 and store.config.num_heads == 4
    assert store.config.ffn_size == 172 and store.config.vocab_size == 1000


def test_dtype_is_kept_or_cast(tiny_release, tmp_path):
    store = ModelStore.open(
        convert_release(tiny_release, tmp_path / "bf16", num_heads=4, dtype=torch.bfloat16).parent
    )
    assert store.dtype == torch.bfloat16
    weight = store.read_part("layer_0")["attention.dense.weight"]
    assert weight.dtype == torch.bfloat16
    assert torch.equal(
        weight, release_tensors(tiny_release, 3)["attention.dense.weight"].bfloat16()
    )


def test_tensor_parallel_shards_merge_to_the_same_model(tmp_path):
    spec = dict(
        num_layers=2, hidden_size=96, num_heads=6, ffn_size=172, dtype=torch.float32, seed=3
    )
    make_tiny(tmp_path / "tp1", TinySpec(**spec))
    make_tiny(tmp_path / "tp3", TinySpec(**spec, tensor_parallel=3))
    assert (tmp_path / "tp3/weights" / release_file_name(3, 2)).exists()
    stores = [
        ModelStore.open(
            convert_release(tmp_path / f"tp{n}", tmp_path / f"s{n}", num_heads=6).parent
        )
        for n in (1, 3)
    ]
    assert stores[1].config.ffn_size == 174  # zero-padded to a multiple of 3, which is exact
    requests = [Request("a", (1, 50, 60, 70), 10), Request("b", (1, 9), 10)]
    outputs = [
        Engine(ResidentWeights(store, "cpu", torch.float32)).generate(
            requests, SamplingParams(greedy=True)
        )
        for store in stores
    ]
    assert [row.new_ids for row in outputs[0]] == [row.new_ids for row in outputs[1]]


def test_tensor_parallel_shards_quantize_to_the_same_store(tmp_path):
    spec = dict(num_layers=2, hidden_size=96, num_heads=6, ffn_size=172, dtype=torch.bfloat16)
    make_tiny(tmp_path / "tp1", TinySpec(**spec))
    make_tiny(tmp_path / "tp2", TinySpec(**spec, tensor_parallel=2))
    stores = [
        ModelStore.open(
            convert_release(
                tmp_path / f"tp{n}",
                tmp_path / f"s{n}",
                num_heads=6,
                quantization=Quantization("int4"),
            ).parent
        )
        for n in (1, 2)
    ]
    for part in stores[0].parts:
        ours, theirs = stores[0].read_part(part), stores[1].read_part(part)
        assert all(torch.equal(ours[name], theirs[name]) for name in ours)
    ids = Engine(QuantizedResidentWeights(stores[1], "cpu", torch.float32)).generate(
        [Request("a", (1, 50, 60), 4)], SamplingParams(greedy=True)
    )
    assert len(ids[0].new_ids) == 4


def test_fp16_overflow_is_refused_and_no_store_is_claimed(tmp_path):
    make_tiny(tmp_path / "rel", TinySpec(dtype=torch.float32))
    path = tmp_path / "rel/weights" / release_file_name(4)
    tensors = load_release_file(path)
    tensors = {name: tensor.clone() for name, tensor in tensors.items()}
    tensors["mlp.dense_ffn_gate.weight"][0, 0] = 1.0e5
    torch.save(tensors, path)
    with pytest.raises(CheckpointError, match=r"mlp\.dense_ffn_gate\.weight.*fp16.*layer_04"):
        convert_release(tmp_path / "rel", tmp_path / "store", num_heads=4, dtype=torch.float16)
    assert not (tmp_path / "store/manifest.json").exists()
    convert_release(tmp_path / "rel", tmp_path / "ok", num_heads=4, dtype=torch.bfloat16)


def test_broken_releases_are_named(tmp_path):
    make_tiny(tmp_path / "rel", TinySpec())
    weights = tmp_path / "rel/weights"
    (weights / release_file_name(4)).rename(tmp_path / "aside.pt")
    with pytest.raises(CheckpointError, match=r"missing file .*layer_04-model_00-model_states\.pt"):
        convert_release(tmp_path / "rel", tmp_path / "s1", num_heads=4)
    (tmp_path / "aside.pt").rename(weights / release_file_name(4))

    (weights / release_file_name(3)).write_bytes(b"PK\x03\x04 definitely not a checkpoint")
    with pytest.raises(CheckpointError, match=r"layer_03-model_00-model_states\.pt: cannot load"):
        convert_release(tmp_path / "rel", tmp_path / "s2", num_heads=4)

    torch.save({"weights": [1, 2, 3]}, weights / release_file_name(3))
    with pytest.raises(CheckpointError, match=r"layer_03.*flat dict of tensors"):
        convert_release(tmp_path / "rel", tmp_path / "s3", num_heads=4)


def test_a_tensor_missing_from_the_release_is_named(tmp_path):
    make_tiny(tmp_path / "rel", TinySpec())
    path = tmp_path / "rel/weights" / release_file_name(4)
    tensors = {name: tensor.clone() for name, tensor in load_release_file(path).items()}
    del tensors["mlp.dense_ffn_output.bias"]
    torch.save(tensors, path)
    with pytest.raises(
        CheckpointError, match=r"missing tensors \['mlp\.dense_ffn_output\.bias'\].*layer_04"
    ):
        convert_release(tmp_path / "rel", tmp_path / "store", num_heads=4)


def test_head_count_must_divide_the_hidden_size(tiny_release, tmp_path):
    with pytest.raises(ConfigError, match="--num-heads 128"):
        convert_release(tiny_release, tmp_path / "store", num_heads=128)


def test_an_existing_store_is_never_overwritten(tiny_release, tiny_store):
    before = (tiny_store / "manifest.json").read_bytes()
    with pytest.raises(CheckpointError, match="already holds a store"):
        convert_release(tiny_release, tiny_store, num_heads=4)
    assert (tiny_store / "manifest.json").read_bytes() == before


def test_a_full_disk_is_a_clear_error_and_leaves_no_partial_file(tiny_release, tmp_path):
    script = textwrap.dedent(f"""
        import resource, signal
        from yalm_runner.convert import convert_release
        from yalm_runner.errors import CheckpointError
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (40_000, 40_000))
        try:
            convert_release({str(tiny_release)!r}, {str(tmp_path / "store")!r}, num_heads=4)
        except CheckpointError as exc:
            print("ERROR", exc)
    """)
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120
    )
    assert "ERROR cannot write" in result.stdout, result.stdout + result.stderr
    assert "embedding.safetensors" in result.stdout
    assert not list((tmp_path / "store").rglob("*.partial"))
    assert not (tmp_path / "store/manifest.json").exists()


@pytest.mark.slow
@pytest.mark.parametrize("quantize", [None, "int8", "int4"])
def test_peak_memory_stays_near_one_release_file(tmp_path, quantize):
    """Peak RSS <= 2 x the largest input file + 1 GiB, on a ~460 MB checkpoint, compressed too
    (a part's compressed matrices wait in memory for their turn in the file: a quarter of the
    fp32 input with int8)."""
    release = tmp_path / "rel"
    make_tiny(
        release,
        TinySpec(
            num_layers=2,
            embedding_size=256,
            hidden_size=2048,
            num_heads=16,
            ffn_size=5460,
            dtype=torch.float32,
            seed=1,
        ),
    )
    files = list((release / "weights").iterdir())
    largest = max(path.stat().st_size for path in files)
    total = sum(path.stat().st_size for path in files)
    assert total > 400e6
    script = textwrap.dedent(f"""
        import json, resource
        import torch
        from yalm_runner.convert import convert_release
        from yalm_runner.quant import Quantization

        def rss_kib(field):
            for line in open("/proc/self/status"):
                if line.startswith(field):
                    return int(line.split()[1])

        baseline = rss_kib("VmRSS:")
        quantization = Quantization({quantize!r}) if {quantize!r} else None
        convert_release(
            {str(release)!r}, {str(tmp_path / "store")!r}, num_heads=16, quantization=quantization
        )
        print(json.dumps({{"baseline": baseline * 1024, "peak": rss_kib("VmHWM:") * 1024}}))
    """)
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=600, check=True
    )
    figures = json.loads(result.stdout.strip().splitlines()[-1])
    growth = (figures["peak"] - figures["baseline"]) / largest
    print(
        f"\nconvert ({quantize or 'fp32'}): total {total / 1e6:.0f} MB, "
        f"largest file {largest / 1e6:.0f} MB, "
        f"baseline RSS {figures['baseline'] / 1e6:.0f} MB, peak RSS {figures['peak'] / 1e6:.0f} "
        f"MB (bound {(2 * largest + 2**30) / 1e6:.0f} MB; growth {growth:.2f}x largest file)"
    )
    assert figures["peak"] <= 2 * largest + 2**30
    ModelStore.open(tmp_path / "store").verify()
