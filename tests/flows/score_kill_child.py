"""A ``yalm-forecast`` process that SIGKILLs itself mid-scoring (for the scoring kill test).

Usage: ``python score_kill_child.py N ARGS...`` runs ``yalm-forecast ARGS...`` and, right after
the scoring step has committed its N-th prompt's signal to the store, sends itself SIGKILL:
nothing gets to clean up, as when the OOM killer strikes. N = 0 runs to the end.
"""

from __future__ import annotations

import os
import signal
import sys

from flows.commands.cli import main
from flows.generation import signals

kill_after = int(sys.argv[1])
commits = 0
record = signals.record_signal


def record_then_die(*args, **kwargs):
    global commits
    stored = record(*args, **kwargs)
    commits += 1
    if commits == kill_after:
        os.kill(os.getpid(), signal.SIGKILL)
    return stored


signals.record_signal = record_then_die
sys.exit(main(sys.argv[2:]))
