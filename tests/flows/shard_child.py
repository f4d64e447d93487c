"""A ``yalm-forecast`` worker process for the shard tests: a barrier, and a SIGKILL on cue.

Usage: ``python shard_child.py BARRIER_DIR NAME PEERS KILL_AFTER ARGS...`` runs
``yalm-forecast ARGS...``. Right after its generation task commits its first checkpoint it
writes ``BARRIER_DIR/NAME`` and waits until every name in PEERS (comma-separated) is there, so
the workers are provably generating at the same time, not by timing. After its KILL_AFTER-th
checkpoint (0: never) it sends itself SIGKILL, as the OOM killer would.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

from flows.commands.cli import main
from flows.generation import forecasting

barrier, name, peers = Path(sys.argv[1]), sys.argv[2], sys.argv[3].split(",")
kill_after = int(sys.argv[4])
saves = 0
save_states = forecasting.save_generation_states


def save_then_wait_or_die(*args, **kwargs):
    global saves
    save_states(*args, **kwargs)
    saves += 1
    if saves == 1:
        (barrier / name).write_text(str(os.getpid()))
        deadline = time.monotonic() + 300  # a peer that died early must not hang the suite
        while not all((barrier / peer).exists() for peer in peers):
            if time.monotonic() > deadline:
                sys.exit(f"{name}: peers {peers} never reached their first checkpoint")
            time.sleep(0.05)
    if saves == kill_after:
        os.kill(os.getpid(), signal.SIGKILL)


forecasting.save_generation_states = save_then_wait_or_die
sys.exit(main(sys.argv[5:]))
