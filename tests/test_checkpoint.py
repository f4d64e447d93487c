"""The store: every kind of damage gives one clear CheckpointError naming the file and tensor."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from yalm_runner.checkpoint import MANIFEST_NAME, ModelStore
from yalm_runner.errors import CheckpointError
from yalm_runner.tensorfile import TensorSpec, read_layout, write_tensor_file


@pytest.fixture
def store_copy(tiny_store, tmp_path):
    target = tmp_path / "store"
    shutil.copytree(tiny_store, target)
    return target


def edit_manifest(store_path, change):
    manifest = json.loads((store_path / MANIFEST_NAME).read_text())
    change(manifest)
    (store_path / MANIFEST_NAME).write_text(json.dumps(manifest))


def test_a_good_store_opens_and_verifies(tiny_store):
    store = ModelStore.open(tiny_store)
    store.verify()
    assert next(iter(store.parts)) == "embedding" and list(store.parts)[-1] == "head"
    assert len(store.manifest_sha256) == 64


def test_files_are_plain_safetensors_with_aligned_data(tiny_store):
    store = ModelStore.open(tiny_store)
    layer = store.parts["layer_1"].path
    ours = store.read_part("layer_1")
    theirs = load_file(str(layer))
    assert set(ours) == set(theirs)
    for name, tensor in ours.items():
        assert torch.equal(tensor, theirs[name])
    assert read_layout(layer).data_start % 64 == 0


def test_missing_manifest_says_the_store_is_incomplete(store_copy):
    (store_copy / MANIFEST_NAME).unlink()
    with pytest.raises(CheckpointError, match=r"manifest.json is missing \(an interrupted"):
        ModelStore.open(store_copy)


def test_missing_layer_file_is_named(store_copy):
    (store_copy / "layers/layer_001.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"missing file .*layer_001\.safetensors"):
        ModelStore.open(store_copy)


def test_truncated_file_is_named(store_copy):
    path = store_copy / "layers/layer_002.safetensors"
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match=r"layer_002\.safetensors: truncated file"):
        ModelStore.open(store_copy)


def test_flipped_byte_is_a_checksum_error_naming_the_tensor(store_copy):
    store = ModelStore.open(store_copy)
    record = next(r for r in store.parts["layer_0"].records if r.name == "attention.dense.weight")
    path = store.parts["layer_0"].path
    data = bytearray(path.read_bytes())
    data[read_layout(path).data_start + record.begin + 5] ^= 0xFF
    path.write_bytes(bytes(data))
    store = ModelStore.open(store_copy)  # sizes and headers are still fine
    with pytest.raises(
        CheckpointError, match=r"layer_000.*checksum mismatch in tensor attention\.dense\.weight"
    ):
        store.read_part("layer_0")


def test_wrong_shape_is_named(store_copy):
    edit_manifest(store_copy, lambda m: m["model"].update(ffn_size=m["model"]["ffn_size"] + 4))
    with pytest.raises(
        CheckpointError, match=r"layer_000\.safetensors: tensor mlp\.dense_ffn_\w+\.\w+ has shape"
    ):
        ModelStore.open(store_copy)


def test_extra_and_missing_tensors_are_named(store_copy):
    store = ModelStore.open(store_copy)
    tensors = {name: t.clone() for name, t in store.read_part("layer_1").items()}
    tensors["rogue.weight"] = torch.zeros(3)
    path = store_copy / "layers/layer_001.safetensors"
    specs = [TensorSpec(n, tuple(t.shape), t.dtype) for n, t in tensors.items()]
    path.unlink()
    records = write_tensor_file(path, specs, lambda spec: tensors[spec.name])

    def add_rogue(manifest):
        entry = manifest["files"][2]
        entry["bytes"] = path.stat().st_size
        entry["tensors"] = [
            {
                "name": r.name,
                "shape": list(r.shape),
                "dtype": "F32",
                "offset": r.begin,
                "nbytes": r.end - r.begin,
                "sha256": r.sha256,
            }
            for r in records
        ]

    edit_manifest(store_copy, add_rogue)
    with pytest.raises(
        CheckpointError, match=r"layer_001\.safetensors: unexpected tensor rogue\.weight"
    ):
        ModelStore.open(store_copy)

    def drop_bias(manifest):
        manifest["files"][2]["tensors"] = [
            t for t in manifest["files"][2]["tensors"] if t["name"] != "attention.dense.bias"
        ]

    edit_manifest(store_copy, drop_bias)
    with pytest.raises(
        CheckpointError, match=r"layer_001\.safetensors: missing tensor attention\.dense\.bias"
    ):
        ModelStore.open(store_copy)


def test_garbage_header_and_unknown_format_version(store_copy):
    (store_copy / "head.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}")
    with pytest.raises(CheckpointError, match=r"head\.safetensors"):
        ModelStore.open(store_copy)
    edit_manifest(store_copy, lambda m: m.update(format_version=99))
    with pytest.raises(CheckpointError, match="format version 99"):
        ModelStore.open(store_copy)
    (store_copy / MANIFEST_NAME).write_text("{")
    with pytest.raises(CheckpointError, match="malformed manifest"):
        ModelStore.open(store_copy)


def test_tokenizer_checksum_is_checked(store_copy):
    with open(store_copy / "tokenizer.sp", "ab") as handle:
        handle.write(b"x")
    with pytest.raises(CheckpointError, match=r"tokenizer\.sp: checksum mismatch"):
        ModelStore.open(store_copy)


def test_a_failed_write_leaves_no_partial_file(tmp_path):
    specs = [TensorSpec("a", (4,), torch.float32), TensorSpec("b", (4,), torch.float32)]

    def produce(spec):
        if spec.name == "b":
            raise CheckpointError("source tensor b is unreadable")
        return torch.zeros(4)

    with pytest.raises(CheckpointError, match="unreadable"):
        write_tensor_file(tmp_path / "part.safetensors", specs, produce)
    assert list(tmp_path.iterdir()) == []
