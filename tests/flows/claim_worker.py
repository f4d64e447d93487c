"""A generation worker for the PostgreSQL tests, run as a real subprocess.

``python claim_worker.py URL WORKER_ID OUT_DIR [--shard N] [--lease-s S] [--gate] [--hang-after K]``
claims shards through ``flows.store.claims`` until none is free. Its "model" is a deterministic
function of the prompt text (eight ids from the text's SHA-256), produced one id at a time with
the resume state saved after each, exactly as the model side saves it; a prompt with saved
state resumes from it. The forecast is recorded through the real ``record_generation``.

It writes to OUT_DIR: ``WORKER.claims`` (one JSON list of keys per shard claimed) and
``WORKER.done`` (one key per recorded forecast, flushed at once). ``--gate`` makes it, after its
first claim, write ``WORKER.claimed`` and wait for the file ``go``, so a test can hold two
workers with shards in hand at the same time. ``--hang-after K`` makes it, after recording K
forecasts, generate three ids of the next prompt, write ``WORKER.hanging`` and wait forever, to
be killed mid-shard.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import time
from pathlib import Path

from flows.store.claims import claim_prompts, record_claimed_generation
from flows.store.database import open_store
from flows.store.generations import load_generation_state, pending_prompts, save_generation_state

NEW_TOKENS = 8


def target_ids(prompt_text: str) -> list[int]:
    digest = hashlib.sha256(prompt_text.encode("utf-8")).digest()
    return [int(byte) for byte in digest[:NEW_TOKENS]]


def forecast_text(token_ids: list[int]) -> str:
    return "forecast " + " ".join(str(token) for token in token_ids)


def wait_for_file(path: Path) -> None:
    while not path.exists():
        time.sleep(0.01)


def append_line(path: Path, line: str) -> None:
    with path.open("a", encoding="utf-8") as handle:
        handle.write(line + "\n")
        handle.flush()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("url")
    parser.add_argument("worker_id")
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--shard", type=int, default=4)
    parser.add_argument("--lease-s", type=float, default=600.0)
    parser.add_argument("--gate", action="store_true")
    parser.add_argument("--hang-after", type=int, default=None)
    args = parser.parse_args()
    out = args.out_dir
    recorded = 0
    with open_store(args.url) as store:
        first = True
        while keys := claim_prompts(
            store, args.worker_id, limit=args.shard, lease_seconds=args.lease_s
        ):
            append_line(out / f"{args.worker_id}.claims", json.dumps(keys))
            if first and args.gate:
                (out / f"{args.worker_id}.claimed").write_text(json.dumps(keys))
                wait_for_file(out / "go")
            first = False
            texts = {prompt.key: prompt for prompt in pending_prompts(store)}
            for key in keys:
                prompt = texts[key]
                target = target_ids(prompt.text)
                ids = load_generation_state(store, key) or []
                assert ids == target[: len(ids)], f"{key}: saved state is not a prefix"
                while len(ids) < len(target):
                    ids.append(target[len(ids)])
                    save_generation_state(store, key, ids)
                    if recorded == args.hang_after and len(ids) == 3:
                        (out / f"{args.worker_id}.hanging").write_text(key)
                        while True:
                            time.sleep(60)
                record_claimed_generation(
                    store,
                    key,
                    text=forecast_text(ids),
                    token_ids=ids,
                    prompt_tokens=prompt.token_count,
                    finish_reason="length",
                    model_manifest_hash="0" * 64,
                    timings_s={"total_s": 0.0},
                )
                recorded += 1
                append_line(out / f"{args.worker_id}.done", key)


if __name__ == "__main__":
    main()
