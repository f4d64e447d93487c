"""A ``yalm-runner`` process that SIGKILLs itself at a chosen moment (for the kill tests).

Usage: ``python runner_kill_child.py MOMENT ARGS...`` runs ``yalm-runner ARGS...`` and sends
itself SIGKILL when MOMENT comes; nothing gets to clean up, exactly as when the machine loses
power or the OOM killer strikes. The moment is placed by wrapping the function that marks it,
so the kill lands where the test says by construction, not by timing:

- ``download:NAME:BYTES``  once exactly BYTES of release file NAME are written
- ``recorded:NAME``        right after NAME is recorded as downloaded and checked
- ``converting:PART``      after the first tensor of store part PART is written (mid-file)
- ``converted:PART``       right after PART is recorded in the store's progress
- ``prefill:N``            inside a prefill, as the N-th layer call of a prefill begins
- ``decode:N``             as the N-th decode forward begins (between two checkpoints)
- ``saved:N``              right after the N-th state save at a checkpoint
- ``kv:N``                 right after the N-th checkpoint that saved the KV cache
- ``kv-written:N``         after the N-th KV frame is fsynced, before the state names it
- ``sigterm:N``            not a kill: SIGTERM to itself as the N-th decode forward begins
"""

from __future__ import annotations

import os
import signal
import sys

from yalm_runner import checkpoint, downloader, engine, fetch, kvstate, model, runner
from yalm_runner.cli import main


def die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


kind, _, what = sys.argv[1].partition(":")

if kind == "download":
    name, limit = what.rsplit(":", 1)
    plain_write = downloader.Disk.write
    written: dict[str, int] = {}

    def write_then_die(self, handle, data):
        if not handle.name.endswith(name + ".partial"):
            return plain_write(self, handle, data)
        room = int(limit) - written.get(name, 0)
        plain_write(self, handle, data[:room])
        written[name] = written.get(name, 0) + min(room, len(data))
        if written[name] >= int(limit):
            handle.flush()
            die()

    downloader.Disk.write = write_then_die
elif kind == "recorded":
    plain_record = fetch._write_provenance

    def record_then_die(dst, source, files):
        plain_record(dst, source, files)
        if what in files:
            die()

    fetch._write_provenance = record_then_die
elif kind in ("converting", "converted"):
    plain_write_file = checkpoint.write_tensor_file
    plain_progress = checkpoint.StoreWriter._record_progress

    def write_file_then_die(path, specs, produce, metadata=None):
        if kind == "converting" and (metadata or {}).get("part") == what:

            def produce_then_die(spec, calls=[]):  # noqa: B006 (a counter across calls)
                calls.append(spec)
                if len(calls) == 2:
                    die()
                return produce(spec)

            return plain_write_file(path, specs, produce_then_die, metadata)
        return plain_write_file(path, specs, produce, metadata)

    def progress_then_die(self):
        plain_progress(self)
        if kind == "converted" and what in self.parts_written:
            die()

    checkpoint.write_tensor_file = write_file_then_die
    checkpoint.StoreWriter._record_progress = progress_then_die
elif kind in ("prefill", "decode", "saved", "kv", "kv-written", "sigterm"):
    count = {"seen": 0}

    def tick() -> None:
        count["seen"] += 1
        if count["seen"] == int(what):
            os.kill(os.getpid(), signal.SIGTERM) if kind == "sigterm" else die()

    if kind == "prefill":
        plain_block = model.block

        def block_then_die(h, *args):
            if h.shape[1] > 1:
                tick()
            return plain_block(h, *args)

        model.block = block_then_die
    elif kind in ("decode", "sigterm"):
        plain_forward = engine.Engine._forward

        def forward_then_die(self, state, tokens):
            if tokens.shape[1] == 1:
                tick()
            return plain_forward(self, state, tokens)

        engine.Engine._forward = forward_then_die
    elif kind in ("saved", "kv"):
        plain_checkpoint = runner.JsonlSink.checkpoint

        def checkpoint_then_die(self, state):
            plain_checkpoint(self, state)
            if kind == "saved" or state.kv is not None:
                tick()

        runner.JsonlSink.checkpoint = checkpoint_then_die
    else:
        plain_write_kv = kvstate.ExactState.write_kv

        def write_kv_then_die(self, live):
            frame = plain_write_kv(self, live)
            tick()
            return frame

        kvstate.ExactState.write_kv = write_kv_then_die
else:
    raise SystemExit(f"unknown moment {sys.argv[1]!r}")

sys.exit(main(sys.argv[2:]))
