"""The host attention kernel against the plain expansion of the same records."""

from __future__ import annotations

import pytest
import torch

from yalm_runner import hostattn
from yalm_runner.kvformat import encode_kv

pytestmark = pytest.mark.skipif(
    not hostattn.available(), reason=f"no host attention kernel: {hostattn.unavailable_reason()}"
)


def case(bits, dtype, dim, batch=3, host_rows=5, slots=17, heads=12, old=13, seed=0):
    generator = torch.Generator().manual_seed(seed)

    def normal(*shape):
        return torch.randn(*shape, generator=generator)

    keys = encode_kv(normal(host_rows, slots, heads, dim).to(dtype), bits)
    values = encode_kv(normal(host_rows, slots, heads, dim).to(dtype), bits)
    step = [normal(batch, heads, dim) for _ in range(3)]
    valid = torch.rand(batch, old, generator=generator) > 0.2
    rows = torch.tensor([4, 0, 2])[:batch]
    return keys, values, bits, dtype, *step, valid, rows


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("dim", [80, 6])  # YaLM's head size; one that leaves a scalar tail
def test_the_kernel_gives_the_expanded_records_attention(bits, dtype, dim):
    args = case(bits, dtype, dim)
    got, expected = hostattn.attend(*args), hostattn.reference(*args)
    assert torch.allclose(got, expected, rtol=1e-5, atol=1e-5), (got - expected).abs().max()


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("dim", [80, 6])
def test_many_slots_in_tiles_with_a_ragged_end_give_the_expanded_records_attention(bits, dim):
    # The kernel walks slots sixteen at a time, four records' sums side by side: 45 old slots
    # are two whole tiles and a ragged one, masks leave groups of four short.
    args = case(bits, torch.bfloat16, dim, slots=50, old=45, seed=1)
    got, expected = hostattn.attend(*args, threads=2), hostattn.reference(*args)
    assert torch.allclose(got, expected, rtol=1e-5, atol=1e-5), (got - expected).abs().max()


def test_a_compiler_without_openmps_runtime_is_named_with_what_to_install(monkeypatch, tmp_path):
    # clang without libomp: its last line says only that the link failed; the line before
    # says what is missing.
    compiler = tmp_path / "cc"
    compiler.write_text(
        "#!/bin/sh\n"
        "echo '/usr/bin/ld: cannot find -lomp: No such file or directory' >&2\n"
        "echo 'clang: error: linker command failed with exit code 1' >&2\n"
        "exit 1\n"
    )
    compiler.chmod(0o755)
    monkeypatch.setattr(hostattn, "_library", None)
    monkeypatch.setattr(hostattn, "_why_not", None)
    monkeypatch.setenv("CC", str(compiler))
    monkeypatch.setenv("YALM_CACHE_DIR", str(tmp_path / "cache"))
    assert not hostattn.available()
    assert hostattn.unavailable_reason() == (
        f"{compiler} could not build the host attention kernel: /usr/bin/ld: cannot find "
        "-lomp: No such file or directory (the compiler's OpenMP runtime is missing: for "
        "clang install libomp-dev, or build with gcc: CC=gcc)"
    )


def test_the_build_says_which_compiler_options_and_vector_path_it_took():
    said = hostattn.build_description()
    path, built = said.split("; ", 1)
    assert path in ("AVX-512 intrinsics", "AVX2 intrinsics", "generic vectors"), said
    assert built.endswith(" ".join(hostattn._flags())), said


def test_the_same_bits_in_either_layout_and_at_any_thread_count():
    keys, values, *rest = case(4, torch.bfloat16, 80)
    by_rows = hostattn.attend(keys, values, *rest, threads=3)
    slot_major = [x.permute(1, 0, 2, 3).contiguous().permute(1, 0, 2, 3) for x in (keys, values)]
    assert torch.equal(hostattn.attend(*slot_major, *rest, threads=1), by_rows)


def test_a_masked_slot_weighs_nothing_and_the_new_slot_is_always_seen():
    keys, values, bits, dtype, query, new_keys, new_values, valid, rows = case(4, torch.float32, 8)
    nothing = torch.zeros_like(valid)
    # Every old slot masked: the output is the new value itself, whatever the records hold.
    got = hostattn.attend(keys, values, bits, dtype, query, new_keys, new_values, nothing, rows)
    assert torch.allclose(got, new_values, atol=1e-6)
    # A masked slot's record does not matter.
    valid[:, 3] = False
    scrambled = [x.clone() for x in (keys, values)]
    for x in scrambled:
        x[:, 3] = 255
    args = (bits, dtype, query, new_keys, new_values, valid, rows)
    assert torch.equal(hostattn.attend(keys, values, *args), hostattn.attend(*scrambled, *args))


def test_records_of_another_width_are_refused():
    keys, values, _, dtype, *rest = case(8, torch.bfloat16, 8)
    with pytest.raises(ValueError, match="8- or 4-bit"):
        hostattn.attend(keys, values, 16, dtype, *rest)


def test_the_new_slots_records_are_written_into_the_steps_rows_only():
    keys, values, bits, dtype, query, new_keys, new_values, valid, rows = case(
        4, torch.bfloat16, 80
    )
    old = valid.shape[1]
    records = torch.stack([encode_kv(x.to(dtype), bits) for x in (new_keys, new_values)])
    before = [x.clone() for x in (keys, values)]
    args = (bits, dtype, query, new_keys, new_values, valid, rows)
    got = hostattn.attend(keys, values, *args, new_records=records)
    # The step's result is the same with or without the write (it reads slots before ``old``).
    assert torch.equal(got, hostattn.attend(*before, *args))
    for which, (cache, earlier) in enumerate(zip((keys, values), before, strict=True)):
        assert torch.equal(cache[rows, old], records[which])
        cache[rows, old] = earlier[rows, old]
        assert torch.equal(cache, earlier)  # nothing else was touched


def test_a_machine_that_cannot_build_the_kernel_is_told_why_and_the_engine_refuses(
    monkeypatch, tmp_path, tiny_store
):
    from yalm_runner.checkpoint import ModelStore
    from yalm_runner.engine import Engine
    from yalm_runner.errors import GenerationError
    from yalm_runner.offload import ResidentWeights

    # A fresh process's state, a compiler that fails, an empty cache folder.
    monkeypatch.setattr(hostattn, "_library", None)
    monkeypatch.setattr(hostattn, "_why_not", None)
    monkeypatch.setenv("CC", "/bin/false")
    monkeypatch.setenv("YALM_CACHE_DIR", str(tmp_path))
    assert not hostattn.available()
    assert "/bin/false could not build the host attention kernel" in hostattn.unavailable_reason()
    assert hostattn.build_description().startswith("unavailable: /bin/false could not build")
    weights = ResidentWeights(ModelStore.open(tiny_store), "cpu", torch.float32)
    with pytest.raises(GenerationError, match="attention on the host is unavailable: /bin/false"):
        Engine(weights, kv_on="cpu", kv_bits=4, kv_attention="host")
    Engine(weights, kv_on="cpu", kv_bits=4)  # the device path needs no compiler
    assert not list(tmp_path.rglob("*.so"))  # nothing half-built was left to be loaded later
