"""fetch: the release over real loopback HTTP into a store, resumable, checked, disk bounded.

A ``FaultyMirror`` (the real mirror server with faults armed per file) serves a copy of the
tiny release; fetched stores are compared byte for byte with ``convert``'s store of the same
files, and the mirror's request log proves what was and was not downloaded again.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from release_server import FaultyMirror, FillingDisk, store_files, tree_bytes

from yalm_runner.checkpoint import PROGRESS_NAME, ModelStore
from yalm_runner.config import SamplingParams
from yalm_runner.convert import convert_release
from yalm_runner.downloader import TransferPolicy
from yalm_runner.engine import Engine, Request
from yalm_runner.errors import CheckpointError, DownloadError
from yalm_runner.fetch import PROVENANCE_NAME, WORK_DIR_NAME, FetchMonitor, fetch_release
from yalm_runner.offload import ResidentWeights
from yalm_runner.quant import Quantization
from yalm_runner.release import load_release_file, release_path
from yalm_runner.tiny import TinySpec, make_tiny

FAST = TransferPolicy(timeout_s=10.0, retries=3, backoff_s=0.01, max_backoff_s=0.05)
KILL_CHILD = Path(__file__).resolve().parent / "runner_kill_child.py"
LAYER_04 = release_path(4)
LAYER_05 = release_path(5)


class Recorder(FetchMonitor):
    def __init__(self):
        self.notes: list[str] = []
        self.parts: list[str] = []

    def note(self, message):
        self.notes.append(message)

    def part_done(self, progress):
        self.parts.append(progress.part)


@pytest.fixture
def served(tiny_release, tmp_path) -> Path:
    """A private copy of the tiny release (tests change its files), served as ``/tiny/``."""
    root = tmp_path / "mirror"
    shutil.copytree(tiny_release, root / "tiny")
    return root


def fetch(server, dst, **kwargs):
    kwargs.setdefault("policy", FAST)
    return fetch_release(dst, source=server.url + "tiny/", num_heads=4, **kwargs)


def gets(server, name):
    return server.gets(name)


def first_etag(server) -> str:
    """The ETag the mirror announced for slot 04 in its HEAD answer (before any change)."""
    return next(e for e in server.log if e.method == "HEAD" and e.path.endswith(LAYER_04)).etag


def test_a_fetched_store_equals_the_converted_one_byte_for_byte(served, tiny_store, tmp_path):
    with FaultyMirror(served) as server:
        manifest = fetch(server, tmp_path / "store")
    assert store_files(manifest.parent) == store_files(tiny_store)
    assert not (tmp_path / "store" / WORK_DIR_NAME).exists()
    assert not (tmp_path / "store" / PROGRESS_NAME).exists()
    requests = [(entry.method, entry.path.removeprefix("/tiny/")) for entry in server.log]
    assert sum(method == "GET" for method, _ in requests) == 7  # vocab + 6 weights, once each
    assert ("HEAD", release_path(6)) in requests  # the first missing slot ends the layers
    ours, theirs = ModelStore.open(manifest.parent), ModelStore.open(tiny_store)
    request = [Request("a", (1, 50, 60, 70), 8)]
    ids = [
        Engine(ResidentWeights(store, "cpu", torch.float32))
        .generate(request, SamplingParams(greedy=True))[0]
        .new_ids
        for store in (ours, theirs)
    ]
    assert ids[0] == ids[1] and len(ids[0]) == 8


def test_a_fetched_int4_store_equals_the_converted_one(served, tmp_path):
    quantization = Quantization("int4", 32)
    convert_release(served / "tiny", tmp_path / "converted", num_heads=4, quantization=quantization)
    with FaultyMirror(served) as server:
        fetch(server, tmp_path / "fetched", quantization=quantization, dtype=torch.bfloat16)
        with pytest.raises(CheckpointError, match="already holds a store"):
            fetch(server, tmp_path / "fetched", quantization=quantization)
    convert_release(
        served / "tiny",
        tmp_path / "converted_bf16",
        num_heads=4,
        quantization=quantization,
        dtype=torch.bfloat16,
    )
    assert store_files(tmp_path / "fetched") == store_files(tmp_path / "converted_bf16")
    assert store_files(tmp_path / "fetched") != store_files(tmp_path / "converted")


def test_provenance_records_each_file_beside_the_manifest_not_in_it(served, tmp_path):
    with FaultyMirror(served) as server:
        manifest = fetch(server, tmp_path / "store")
        heads = {entry.path: entry for entry in server.log if entry.method == "HEAD"}
    provenance = json.loads((tmp_path / "store" / PROVENANCE_NAME).read_text())
    assert provenance["source"] == server.url + "tiny/"
    assert len(provenance["files"]) == 7
    for name, record in provenance["files"].items():
        data = (served / "tiny" / name).read_bytes()
        assert record["sha256"] == hashlib.sha256(data).hexdigest()
        assert record["bytes"] == len(data)
        assert record["etag"].startswith('"') and record["last_modified"]
        assert f"/tiny/{name}" in heads
    assert "sha256" not in json.dumps(json.loads(manifest.read_text())["source"])
    assert server.url not in manifest.read_text()


def test_keep_release_keeps_a_folder_that_converts_to_the_same_store(served, tmp_path):
    kept = tmp_path / "kept" / "tiny"
    with FaultyMirror(served) as server:
        fetch(server, tmp_path / "store", keep_release=kept)
    for name in (release_path(0), LAYER_04, release_path(7), "vocab/voc_100b.sp"):
        assert (kept / name).read_bytes() == (served / "tiny" / name).read_bytes()
    convert_release(kept, tmp_path / "again", num_heads=4)
    assert store_files(tmp_path / "store") == store_files(tmp_path / "again")


def test_a_connection_dropped_mid_file_resumes_with_a_range_request(served, tiny_store, tmp_path):
    size = (served / "tiny" / LAYER_04).stat().st_size
    recorder = Recorder()
    with FaultyMirror(served) as server:
        server.drop_after[LAYER_04] = size // 2
        fetch(server, tmp_path / "store", monitor=recorder)
    first, second = gets(server, LAYER_04)
    assert (first.status, first.start, first.sent_bytes) == (200, 0, size // 2)
    assert second.range == f"bytes={size // 2}-" and second.if_range
    assert (second.status, second.start, second.sent_bytes) == (206, size // 2, size - size // 2)
    assert any("layer_04" in note and "retrying" in note for note in recorder.notes)
    assert store_files(tmp_path / "store") == store_files(tiny_store)


def test_a_server_without_range_support_gets_the_file_again_whole(served, tiny_store, tmp_path):
    size = (served / "tiny" / LAYER_04).stat().st_size
    recorder = Recorder()
    with FaultyMirror(served, ranges=False) as server:
        server.drop_after[LAYER_04] = size // 2
        fetch(server, tmp_path / "store", monitor=recorder)
    first, second = gets(server, LAYER_04)
    assert (first.status, first.sent_bytes) == (200, size // 2)
    assert second.range == f"bytes={size // 2}-"  # asked to continue ...
    assert (second.status, second.start, second.sent_bytes) == (200, 0, size)  # ... got it all
    assert any("sent the whole file" in note for note in recorder.notes)
    assert store_files(tmp_path / "store") == store_files(tiny_store)


def test_a_file_changed_on_the_server_between_attempts_is_fetched_whole(served, tmp_path):
    other = tmp_path / "other"
    make_tiny(other, TinySpec(num_layers=3, dtype=torch.float32, seed=99))
    target = served / "tiny" / LAYER_04
    size = target.stat().st_size

    def replace_on_server():
        shutil.copyfile(other / LAYER_04, target)
        stat = target.stat()
        os.utime(target, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))

    with FaultyMirror(served) as server:
        server.drop_after[LAYER_04] = size // 2
        server.on_drop[LAYER_04] = replace_on_server
        fetch(server, tmp_path / "store")
    first, second = gets(server, LAYER_04)
    assert first.sent_bytes == size // 2
    assert second.range == f"bytes={size // 2}-" and second.if_range == first_etag(server)
    assert second.status == 200 and second.start == 0  # If-Range named the old version
    convert_release(served / "tiny", tmp_path / "converted", num_heads=4)
    assert store_files(tmp_path / "store") == store_files(tmp_path / "converted")
    layer_1 = ModelStore.open(tmp_path / "store").read_part("layer_1")
    theirs = load_release_file(other / LAYER_04)
    assert torch.equal(layer_1["attention.dense.weight"], theirs["attention.dense.weight"])


def test_a_truncated_download_is_caught_before_conversion_and_fetched_again(
    served, tiny_store, tmp_path
):
    data = (served / "tiny" / LAYER_04).read_bytes()
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(data[: len(data) * 2 // 3])
    recorder = Recorder()
    with FaultyMirror(served) as server:
        server.substitute[LAYER_04] = [truncated]
        fetch(server, tmp_path / "store", monitor=recorder)
    assert len(gets(server, LAYER_04)) == 2
    [note] = [note for note in recorder.notes if "fetching it again" in note]
    assert "layer_04-model_00-model_states.pt" in note and "\n" not in note
    assert store_files(tmp_path / "store") == store_files(tiny_store)


def test_a_file_damaged_at_the_source_is_named_and_the_store_stays_resumable(
    served, tiny_store, tmp_path
):
    data = bytearray((served / "tiny" / LAYER_04).read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte in the tensor data: same size
    damaged = tmp_path / "damaged.pt"
    damaged.write_bytes(bytes(data))
    with FaultyMirror(served) as server:
        server.substitute[LAYER_04] = [damaged] * 3
        with pytest.raises(CheckpointError, match=r"layer_04-model_00-model_states\.pt: damaged"):
            fetch(server, tmp_path / "store")
        assert len(gets(server, LAYER_04)) == 3
        progress = json.loads((tmp_path / "store" / PROGRESS_NAME).read_text())
        assert {"embedding", "layer_0"} <= set(progress["files"])
        before = len(server.log)
        fetch(server, tmp_path / "store")  # the source is mended: the same command finishes
    again = [entry.path for entry in server.log[before:] if entry.method == "GET"]
    assert not any(path.endswith((release_path(0), release_path(3))) for path in again)
    assert store_files(tmp_path / "store") == store_files(tiny_store)


def test_transient_http_errors_are_retried_and_retry_after_is_honoured(
    served, tiny_store, tmp_path
):
    recorder = Recorder()
    with FaultyMirror(served) as server:
        server.statuses[LAYER_05] = [(503, {}), (429, {"Retry-After": "0"})]
        fetch(server, tmp_path / "store", monitor=recorder)
    retries = [note for note in recorder.notes if "layer_05" in note]
    assert "HTTP 503; retrying in 0.01 s" in retries[0]
    assert "HTTP 429; retrying in 0 s" in retries[1]
    assert store_files(tmp_path / "store") == store_files(tiny_store)


def test_a_server_that_keeps_failing_is_given_up_on_by_name(served, tmp_path):
    with FaultyMirror(served) as server:
        server.statuses[LAYER_05] = [(503, {})] * 10
        with pytest.raises(DownloadError, match=r"layer_05.*HTTP 503 \(gave up after 4 attempts"):
            fetch(server, tmp_path / "store")


def test_a_release_without_its_head_is_refused_by_name(served, tmp_path):
    (served / "tiny" / release_path(7)).unlink()
    with FaultyMirror(served) as server, pytest.raises(CheckpointError, match=r"layer_07.*head"):
        fetch(server, tmp_path / "store")
    assert not server.gets()


def test_a_disk_too_small_is_refused_before_any_download(served, tmp_path):
    with FaultyMirror(served) as server:
        with pytest.raises(DownloadError, match=r"fetch needs [\d.]+ MB \(.*\), 0.10 MB is free"):
            fetch(server, tmp_path / "store", disk=FillingDisk(free_bytes=100_000))
        assert not server.gets()


def test_space_is_checked_again_once_the_shape_is_known(served, tiny_store, tmp_path):
    disk = FillingDisk(free_bytes=[10**12, 200_000])  # something else filled the drive meanwhile
    with FaultyMirror(served) as server:
        with pytest.raises(
            DownloadError, match=r"needs [\d.]+ MB \([\d.]+ MB store still to write \+"
        ):
            fetch(server, tmp_path / "store", disk=disk)
        progress = json.loads((tmp_path / "store" / PROGRESS_NAME).read_text())
        assert progress["settings"]["model"]["num_layers"] == 3 and not progress["files"]
        fetch(server, tmp_path / "store")
    assert store_files(tmp_path / "store") == store_files(tiny_store)


def test_a_disk_that_fills_up_midway_leaves_a_store_that_resumes(served, tiny_store, tmp_path):
    sizes = {name: (served / "tiny" / name).stat().st_size for name in _release_names(served)}
    # One file at a time, in need order: vocab, 00, 03, 01, 04, 05, 07; the disk is full halfway
    # through slot 05.
    budget = sum(sizes.values()) - sizes[release_path(7)] - sizes[LAYER_05] // 2
    with FaultyMirror(served) as server:
        with pytest.raises(DownloadError, match=r"disk is full writing .*layer_05.*\.partial"):
            fetch(server, tmp_path / "store", parallel=1, disk=FillingDisk(budget_bytes=budget))
        with pytest.raises(CheckpointError, match="interrupted conversion"):
            ModelStore.open(tmp_path / "store")
        progress = json.loads((tmp_path / "store" / PROGRESS_NAME).read_text())
        assert set(progress["files"]) == {"embedding", "layer_0", "layer_1"}
        before = len(server.log)
        fetch(server, tmp_path / "store")
    again = [entry for entry in server.log[before:] if entry.method == "GET"]
    # The vocabulary and the finished parts' files are not fetched again; slot 05 continues.
    assert [entry.path.removeprefix("/tiny/") for entry in again] == [LAYER_05, release_path(7)]
    kept = budget - sum(sizes[name] for name in sizes if name not in (LAYER_05, release_path(7)))
    assert (again[0].status, again[0].start) == (206, kept)
    assert store_files(tmp_path / "store") == store_files(tiny_store)


def test_peak_disk_stays_within_the_store_plus_two_release_files(served, tiny_store, tmp_path):
    dst = tmp_path / "store"
    peak = [0]

    def measure(*_):
        peak[0] = max(peak[0], tree_bytes(dst))

    class Measuring(FetchMonitor):
        def part_done(self, progress):
            measure()

    with FaultyMirror(served) as server:
        fetch(server, dst, disk=FillingDisk(observe=measure), monitor=Measuring())
    names = _release_names(served)
    sizes = [(served / "tiny" / name).stat().st_size for name in names]
    vocab = (served / "tiny" / "vocab/voc_100b.sp").stat().st_size
    largest = max(size for name, size in zip(names, sizes, strict=True) if "weights" in name)
    store = tree_bytes(dst)
    bound = store + 2 * largest + vocab
    print(
        f"\nfetch peak disk {peak[0]} B: store {store} B + release {sum(sizes)} B in all "
        f"(largest file {largest} B); bound store + 2 x largest + vocab = {bound} B; "
        f"download-then-convert would peak at {store + sum(sizes)} B"
    )
    assert store < peak[0] <= bound < store + sum(sizes)


def _release_names(served: Path) -> list[str]:
    """The files a release consists of (weights and vocabulary; not make-tiny's own records)."""
    root = served / "tiny"
    return sorted(
        str(path.relative_to(root))
        for folder in ("weights", "vocab")
        for path in (root / folder).rglob("*")
        if path.is_file()
    )


def run_killed(moment: str, *args) -> subprocess.CompletedProcess:
    result = subprocess.run(
        [sys.executable, str(KILL_CHILD), moment, *map(str, args)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == -signal.SIGKILL, result.stderr
    return result


@pytest.mark.parametrize(
    "moment",
    [
        f"download:{LAYER_04}:60000",  # mid-download
        f"recorded:{release_path(3)}",  # between files: downloaded and checked, not converted
        "converting:layer_1",  # mid-conversion: a part file half written
        "converted:layer_1",  # between files: converted, its raw file not yet deleted
    ],
)
def test_a_fetch_killed_and_run_again_finishes_without_downloading_a_finished_file(
    served, tiny_store, tmp_path, moment
):
    dst = tmp_path / "store"
    with FaultyMirror(served) as server:
        url = server.url + "tiny/"
        run_killed(moment, "fetch", dst, "--source", url, "--num-heads", 4)
        at_kill = len(server.log)
        recorded = json.loads((dst / PROVENANCE_NAME).read_text())["files"]
        fetch(server, dst)
    again = [entry for entry in server.log[at_kill:] if entry.method == "GET"]
    fetched_again = {entry.path.removeprefix("/tiny/") for entry in again}
    assert not fetched_again & set(recorded), moment
    if moment.startswith("download"):
        [resumed] = [entry for entry in again if entry.path.endswith(LAYER_04)]
        assert (resumed.status, resumed.start) == (206, 60000)
    assert store_files(dst) == store_files(tiny_store)
    assert not (dst / WORK_DIR_NAME).exists()


def test_a_fetch_continued_with_other_options_is_refused(served, tmp_path):
    dst = tmp_path / "store"
    with FaultyMirror(served) as server:
        run_killed(
            "converted:layer_0", "fetch", dst, "--source", server.url + "tiny/", "--num-heads", 4
        )
        with pytest.raises(CheckpointError, match="made with no --quantize"):
            fetch(server, dst, quantization=Quantization("int8"))


def test_the_cli_fetches_with_plain_progress_lines(served, tiny_store, tmp_path):
    with FaultyMirror(served) as server:
        result = subprocess.run(
            [
                sys.executable,
                "-m",
                "yalm_runner.cli",
                "fetch",
                str(tmp_path / "store"),
                "--source",
                server.url + "tiny",
                "--num-heads",
                "4",
            ],
            capture_output=True,
            text=True,
            timeout=300,
        )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == str(tmp_path / "store")
    lines = result.stderr.splitlines()
    assert lines[0].startswith("yalm-runner fetch: 7 files to download")
    assert any(line.startswith("yalm-runner fetch: head converted;") for line in lines)
    assert store_files(tmp_path / "store") == store_files(tiny_store)


def test_a_killed_convert_resumes_without_rewriting_finished_parts(
    tiny_release, tiny_store, tmp_path
):
    dst = tmp_path / "store"
    run_killed("converting:layer_1", "convert", tiny_release, dst, "--num-heads", 4)
    progress = json.loads((dst / PROGRESS_NAME).read_text())
    assert set(progress["files"]) == {"embedding", "layer_0"}
    assert (dst / "layers/layer_001.safetensors.partial").exists()
    finished = {
        name: (dst / name).stat()
        for name in ("embedding.safetensors", "layers/layer_000.safetensors")
    }
    with pytest.raises(CheckpointError, match=r"other settings \(dtype F32 there, BF16 now\)"):
        convert_release(tiny_release, dst, num_heads=4, dtype=torch.bfloat16)
    written = []
    convert_release(tiny_release, dst, num_heads=4, on_part=lambda p: written.append(p.part))
    assert written == ["layer_1", "layer_2", "head"]
    for name, stat in finished.items():
        now = (dst / name).stat()
        assert (now.st_ino, now.st_mtime_ns) == (stat.st_ino, stat.st_mtime_ns)
    assert store_files(dst) == store_files(tiny_store)
    assert not (dst / PROGRESS_NAME).exists()


def test_a_recorded_part_whose_file_was_replaced_is_written_again(
    tiny_release, tiny_store, tmp_path
):
    dst = tmp_path / "store"
    run_killed("converted:layer_1", "convert", tiny_release, dst, "--num-heads", 4)
    (dst / "layers/layer_000.safetensors").write_bytes(b"not a part")
    written = []
    convert_release(tiny_release, dst, num_heads=4, on_part=lambda p: written.append(p.part))
    assert written == ["layer_0", "layer_2", "head"]
    assert store_files(dst) == store_files(tiny_store)
