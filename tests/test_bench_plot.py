"""benchmarks/plot.py on what the bench really writes: a CPU bench run of the tiny shape (ours
alone, a RAM copy for the link) plotted as an SVG that parses, one line per configuration."""

import json
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SVG = "{http://www.w3.org/2000/svg}"


def run(*args, check=True):
    result = subprocess.run(
        [sys.executable, *map(str, args)], capture_output=True, text=True, timeout=600, cwd=ROOT
    )
    if check and result.returncode != 0:
        raise AssertionError(result.stderr)
    return result


@pytest.fixture(scope="module")
def bench_json(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("bench") / "tiny.json"
    run(
        "-m", "yalm_runner.cli", "bench", "--device", "cpu", "--shape", "tiny", "--batch-sizes",
        "1,2,4", "--kv-bits", "16", "--kv-batches", "2,3", "--max-batch", "6", "--prompt-len",
        8, "-n", 4, "--json", path,
    )  # fmt: skip
    return path


def test_the_plot_has_one_line_per_configuration_and_its_links_bound(bench_json, tmp_path):
    rows = json.loads(bench_json.read_text())["rows"]
    configurations = list(dict.fromkeys(row["system"] for row in rows))
    assert configurations == ["ours (streaming)", "ours, overlap off", "ours, planned"]
    svg = tmp_path / "throughput.svg"
    result = run("benchmarks/plot.py", bench_json, "-o", svg, "--title", "tiny on a CPU")
    assert result.stderr.strip() == f"{svg}: 3 configurations"
    root = ET.parse(svg).getroot()  # well-formed XML
    assert root.tag == f"{SVG}svg"
    paths = root.findall(f"{SVG}path")
    measured = [p for p in paths if p.get("class") == "measured"]
    assert [p.find(f"{SVG}title").text for p in measured] == configurations
    bounds = [p for p in paths if p.get("class") == "bound"]
    assert len(bounds) == 3 and all(p.get("stroke-dasharray") for p in bounds)
    for line, bound in zip(measured, bounds, strict=True):
        assert line.get("stroke") == bound.get("stroke")  # the bound in its line's colour
    # A marker per row, each line through its configuration's batches.
    assert len(root.findall(f"{SVG}circle")) == len(rows) + len(configurations)  # + legend
    assert measured[0].get("d").count("L") == 2  # batches 1, 2, 4
    texts = [t.text for t in root.iter(f"{SVG}text")]
    assert "tiny on a CPU" in texts
    assert "batch (rows decoded together, log scale)" in texts
    assert "decode tokens/s (batch / step time)" in texts
    assert {"1", "2", "4", "8"} <= set(texts)  # the log-2 batch ticks
    assert "the link's bound: batch / floor step" in texts


def test_an_envelope_result_is_one_more_configuration(bench_json, tmp_path):
    envelope = tmp_path / "envelope.json"
    result = {
        "shape": "yalm-100b", "layers": 80, "kv_bits": 4, "batch": 64,
        "quantization": {"scheme": "int4", "group_size": 128},
        "decode_step_s": 1.43, "floor_step_s": 1.174,
    }  # fmt: skip
    envelope.write_text(json.dumps(result))
    svg = tmp_path / "both.svg"
    run("benchmarks/plot.py", bench_json, envelope, "-o", svg)
    titles = [p.find(f"{SVG}title").text for p in ET.parse(svg).getroot().iter(f"{SVG}path")]
    assert "envelope yalm-100b x 80, int4 g128, 4-bit KV" in titles


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("not json", "not readable JSON"),
        ('{"peers": []}', "neither a `yalm-runner bench --json` file (rows) nor an envelope one"),
        ('{"rows": [{"system": "x", "batch": 4, "decode_step_s": "fast"}]}',
         "row 0 decode_step_s is not a number: 'fast'"),
        ('{"rows": []}', "no rows to plot"),
    ],
)  # fmt: skip
def test_a_file_that_is_not_a_bench_result_is_refused_by_name(tmp_path, content, message):
    bad = tmp_path / "bad.json"
    bad.write_text(content)
    svg = tmp_path / "out.svg"
    result = run("benchmarks/plot.py", bad, "-o", svg, check=False)
    assert result.returncode == 1
    assert result.stderr.startswith(f"plot: error: {bad}")
    assert message in result.stderr and result.stderr.count("\n") == 1
    assert not svg.exists()
