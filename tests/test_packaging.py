"""A wheel of the project carries what the demo and the pipeline read at run time, and an
installed (not editable) wheel runs the demo on the tokenizer it carries."""

import hashlib
import importlib.util
import os
import subprocess
import sys
import zipfile

import pytest

from yalm_runner.vocab import BUNDLED_VOCAB_SHA256


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    out = tmp_path_factory.mktemp("wheel")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    isolation = [] if importlib.util.find_spec("setuptools") is None else ["--no-build-isolation"]
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", *isolation, root, "-w", out],
        check=True,
        capture_output=True,
        timeout=300,
    )
    (path,) = out.glob("yalm_forecast-*.whl")
    return path


def test_the_wheel_carries_templates_feeds_config_and_migrations(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    for needed in (
        "flows/bundled_prompts/ticker_outlook_ru.yaml",
        "flows/bundled_prompts/morning_brief_ru.yaml",
        "flows/sample_feeds/markets_ru.rss.xml",
        "flows/starter_config.yaml",
        "flows/store/migrations/script.py.mako",
        "flows/store/migrations/versions/0002_prompt_claims.py",
        "flows/store/migrations/versions/0005_nights.py",
        "yalm_runner/engine.py",
        "yalm_runner/bench/comparison.py",
        "yalm_runner/bench/peers.py",
        "yalm_runner/vocab/__init__.py",
        "yalm_runner/vocab/voc_100b.sp",
    ):
        assert needed in names, needed
    licenses = {name.rsplit("/", 1)[-1] for name in names if ".dist-info/licenses/" in name}
    assert {"LICENSE", "NOTICE"} <= licenses


def test_an_installed_wheel_finds_its_own_templates(wheel, tmp_path):
    zipfile.ZipFile(wheel).extractall(tmp_path / "site")
    probe = (
        "import flows.config as c, flows.commands.demo as d, flows.prompting.templates as t;"
        "print(c.BUNDLED_PROMPTS_DIR);"
        "print(t.load_template(c.BUNDLED_PROMPTS_DIR / 'ticker_outlook_ru.yaml').name);"
        "print(sorted(p.name for p in d.SAMPLE_FEEDS_DIR.glob('*.xml')))"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe],
        env={**os.environ, "PYTHONPATH": str(tmp_path / "site")},
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    folder, name, feeds = result.stdout.splitlines()
    assert folder.startswith(str(tmp_path / "site"))
    assert name == "ticker_outlook_ru"
    assert "markets_ru.rss.xml" in feeds


def test_an_installed_wheel_runs_the_bench_and_its_peer_children(wheel, tmp_path):
    zipfile.ZipFile(wheel).extractall(tmp_path / "site")
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "site")}
    outputs = []
    for command in (
        ["-c", "import yalm_runner.bench.comparison as c; print(c.__file__)"],
        ["-m", "yalm_runner.bench.peers", "--help"],  # how the bench starts each peer
    ):
        result = subprocess.run(
            [sys.executable, *command],
            env=env,
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert result.returncode == 0, result.stderr
        outputs.append(result.stdout)
    assert outputs[0].startswith(str(tmp_path / "site"))
    assert "--system" in outputs[1]


@pytest.mark.slow
def test_an_installed_wheel_runs_the_demo_on_the_tokenizer_it_carries(wheel, tmp_path):
    site = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", site, wheel],
        check=True,
        capture_output=True,
        timeout=300,
    )
    env = {key: value for key, value in os.environ.items() if not key.startswith("PREFECT_API")}
    env.update(
        PYTHONPATH=str(site),  # ahead of the editable install of this checkout
        OMP_NUM_THREADS="1",
        PREFECT_HOME=str(tmp_path / "prefect-home"),  # its own ephemeral server and database
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        # A fresh Prefect home migrates its database first: slow on a busy 2-core machine.
        PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="300",
        YALM_FORECAST_LOCK_DIR=str(tmp_path / "locks"),
    )
    work = tmp_path / "work"
    work.mkdir()
    demo = subprocess.run(
        [site / "bin" / "yalm-forecast", "demo"],
        env=env,
        cwd=work,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert demo.returncode == 0, demo.stderr[-3000:]
    assert "| generated | 13 |" in demo.stdout
    store_vocab = work / "yalm-forecast-demo" / "tiny-store" / "tokenizer.sp"
    assert hashlib.sha256(store_vocab.read_bytes()).hexdigest() == BUNDLED_VOCAB_SHA256

    probe = "import yalm_runner.vocab as v; print(v.bundled_vocab_path())"
    found = subprocess.run(
        [sys.executable, "-c", probe], env=env, cwd=work, capture_output=True, text=True
    )
    assert found.returncode == 0, found.stderr
    assert found.stdout.strip() == str(site / "yalm_runner" / "vocab" / "voc_100b.sp")


def test_every_code_package_of_the_checkout_is_in_the_wheel_list():
    # A subpackage missing from pyproject's explicit list works in an editable install and
    # breaks a wheel: every folder of code must be named there.
    from pathlib import Path

    import tomllib

    root = Path(__file__).resolve().parents[1]
    listed = set(
        tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
    )
    found = {
        ".".join(init.parent.relative_to(root).parts)
        for top in ("yalm_runner", "flows")
        for init in (root / top).rglob("__init__.py")
    }
    assert found - listed == set()
