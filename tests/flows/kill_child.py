"""A ``yalm-forecast`` process that SIGKILLs itself mid-generation (for the kill test).

Usage: ``python kill_child.py N ARGS...`` runs ``yalm-forecast ARGS...`` and, right after the
generation task has committed its N-th checkpoint of the rows in flight to the store, sends
itself SIGKILL: nothing gets to clean up, exactly as when the machine's OOM killer strikes.
N = 0 runs to the end.
"""

from __future__ import annotations

import os
import signal
import sys

from flows.commands.cli import main
from flows.generation import forecasting

kill_after = int(sys.argv[1])
saves = 0
save_states = forecasting.save_generation_states


def save_then_die(*args, **kwargs):
    global saves
    save_states(*args, **kwargs)
    saves += 1
    if saves == kill_after:
        os.kill(os.getpid(), signal.SIGKILL)


forecasting.save_generation_states = save_then_die
sys.exit(main(sys.argv[2:]))
