"""The generation job on its own (no Prefect): bad rows, saved ids, other models' ids."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
from flows_testkit import write_config
from sqlalchemy import text

from flows.config import load_config
from flows.generation.forecasting import generate_pending
from flows.prompting.templates import RenderedPrompt
from flows.store.database import open_store
from flows.store.generations import (
    load_generation_state,
    pending_prompts,
    prompt_status,
    save_generation_state,
    save_prompt,
)
from yalm_runner.checkpoint import ModelStore
from yalm_runner.offload import OffloadPolicy


def rendered(key: str, text: str, max_new_tokens: int = 8) -> RenderedPrompt:
    return RenderedPrompt(
        key=key,
        template_name="ticker_outlook_en",
        template_version=1,
        template_hash="t" * 64,
        language="en",
        scope="ticker",
        ticker="SBER",
        as_of="2024-05-14",
        text=text,
        token_count=0,
        max_new_tokens=max_new_tokens,
        sampling={"temperature": 0.8, "top_p": 0.9, "top_k": 0, "greedy": False, "seed": 7},
        item_keys=(),
        items_dropped=0,
    )


@pytest.fixture
def job(tmp_path, tiny_store):
    config = load_config(
        write_config(tmp_path, model=str(tiny_store), generation={"device": "cpu"})
    )
    with open_store(config.database_url) as store:
        yield config, store


def test_a_prompt_too_long_for_the_model_fails_alone(job):
    config, store = job
    save_prompt(store, rendered("a" * 64, "Sberbank raised its dividend forecast."))
    save_prompt(store, rendered("b" * 64, "The market rose. " * 400))
    report = generate_pending(config, store)
    assert (report.generated, report.failed) == (1, 1)
    assert prompt_status(store, "a" * 64) == "done"
    assert prompt_status(store, "b" * 64) == "failed"
    assert "exceed the model's 1024 positions" in report.failures[0][1]
    assert pending_prompts(store) == []


def test_saved_ids_are_continued_only_under_their_fingerprint(job, tiny_store):
    config, store = job
    key = "c" * 64
    save_prompt(store, rendered(key, "Gazprom expects export volumes to grow."))
    save_generation_state(store, key, [11, 12], fingerprint="model-x:float32:cpu")
    assert load_generation_state(store, key, fingerprint="model-x:float32:cpu") == [11, 12]
    assert load_generation_state(store, key, fingerprint="model-y:float32:cpu") is None

    fresh = generate_pending(config, store)
    assert (fresh.generated, fresh.resumed) == (1, 0)  # another model's ids: started over


def test_resumed_row_gives_the_same_text_as_a_fresh_one(tmp_path, tiny_store):
    """Saved ids for half a row, continued, end where an uninterrupted row ends."""
    texts = {}
    for name in ("fresh", "resumed"):
        folder = tmp_path / name
        folder.mkdir()
        config = load_config(
            write_config(folder, model=str(tiny_store), generation={"device": "cpu"})
        )
        with open_store(config.database_url) as store:
            key = "d" * 64
            save_prompt(store, rendered(key, "Nvidia beat guidance for the year.", 12))
            if name == "resumed":
                model = ModelStore.open(tiny_store)
                fingerprint = f"{model.manifest_sha256}:float32:cpu"
                save_generation_state(store, key, texts["fresh_ids"][:5], fingerprint=fingerprint)
            report = generate_pending(config, store)
            assert report.generated == 1 and report.resumed == (name == "resumed")
            with store.reading() as session:
                row = session.execute(
                    text("SELECT text, token_ids_json FROM generations WHERE prompt_key = :key"),
                    {"key": key},
                ).one()
            texts[name] = tuple(row)
            if name == "fresh":
                texts["fresh_ids"] = json.loads(row[1])
    assert len(texts["fresh_ids"]) > 5
    assert texts["resumed"] == texts["fresh"]


def test_an_interrupt_keeps_the_rows_in_flight_and_a_rerun_finishes_them(job):
    config, store = job
    config = replace(config, generation=replace(config.generation, batch_size=2))
    keys = [letter * 64 for letter in "efgh"]
    for index, key in enumerate(keys):
        # The first row is short: it finishes while its batch-mate is still generating.
        length = 4 if index == 0 else 10
        save_prompt(store, rendered(key, f"Yandex raised the price target {index}.", length))

    def interrupt(done: int, total: int) -> None:
        if done == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        generate_pending(config, store, on_progress=interrupt)
    done = [key for key in keys if prompt_status(store, key) == "done"]
    saved = [key for key in keys if load_generation_state(store, key)]
    assert len(done) == 1 and saved and not set(saved) & set(done)

    report = generate_pending(config, store)
    assert report.generated == 3 and report.resumed == len(saved)
    assert [prompt_status(store, key) for key in keys] == ["done"] * 4


def test_offload_settings_reach_the_runner(tmp_path, tiny_store):
    texts = []
    offload = {
        "kv_bits": 4,
        "kv_on": "auto",
        "weights_on": "disk",
        "kv_layout": "slots",
        "overlap": False,
        "dtype": "float32",  # the long spelling, still read
    }
    for name, extra in (("offload", offload), ("plain", {})):
        folder = tmp_path / name
        folder.mkdir()
        generation = {"device": "cpu", **extra}
        config = load_config(write_config(folder, model=str(tiny_store), generation=generation))
        if extra:
            policy = OffloadPolicy.from_settings(config.generation)
            assert (policy.kv_bits, policy.kv_on, policy.weights_on) == (4, "auto", "disk")
            assert (policy.kv_layout, policy.overlap) == ("slots", False)
        # On the CPU the KV cache stays with the compute (nothing to compress) and every layer
        # is read from the store's files each step: the forecasts are the plain run's.
        with open_store(config.database_url) as store:
            save_prompt(store, rendered("e" * 64, "Gazprom shares fell after the report.", 10))
            assert generate_pending(config, store).generated == 1
            with store.reading() as session:
                texts.append(session.execute(text("SELECT token_ids_json FROM generations")).one())
    assert texts[0] == texts[1]


def test_a_compressed_kv_cache_is_part_of_the_fingerprint(tiny_store):
    # Ids made with a lossy KV cache are not continued by a run without it, nor the reverse.
    # On the CPU the plan keeps the KV cache with the compute; a GPU plan's pinned-RAM cache is
    # put in the session by hand here.
    from dataclasses import replace

    from flows.generation.forecasting import _fingerprint
    from yalm_runner.engine import Engine
    from yalm_runner.session import open_session

    with open_session(tiny_store, device="cpu") as session:
        weights = session.engine.weights
        prints = {
            (kv_on, bits): _fingerprint(
                replace(session, engine=Engine(weights, kv_on=kv_on, kv_bits=bits))
            )
            for kv_on, bits in (("gpu", 16), ("cpu", 16), ("cpu", 8), ("cpu", 4))
        }
        assert _fingerprint(session) == prints[("gpu", 16)]
    model_hash = session.store.manifest_sha256
    assert prints[("gpu", 16)] == prints[("cpu", 16)] == f"{model_hash}:float32:cpu"
    assert prints[("cpu", 8)] == f"{model_hash}:float32:cpu:kv8"
    assert prints[("cpu", 4)].endswith(":kv4")


def test_saved_ids_that_do_not_fit_the_prompt_are_dropped_and_it_starts_over(
    job, tiny_store, caplog
):
    config, store = job
    key = "f" * 64
    save_prompt(store, rendered(key, "Lukoil kept its buyback plan.", 6))
    fingerprint = f"{ModelStore.open(tiny_store).manifest_sha256}:float32:cpu"
    save_generation_state(store, key, list(range(1, 10)), fingerprint=fingerprint)  # 9 > 6
    with caplog.at_level("WARNING", logger="flows.generation.forecasting"):
        report = generate_pending(config, store)
    assert (report.generated, report.resumed) == (1, 0)
    assert f"prompt {key}: saved ids do not fit; starting over" in caplog.text
    assert prompt_status(store, key) == "done"
