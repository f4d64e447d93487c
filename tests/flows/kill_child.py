"""A ``yalm-forecast`` process that SIGKILLs itself mid-generation (for the kill test).

Usage: ``python kill_child.py N ARGS...`` runs ``yalm-forecast ARGS...`` and, right after the
generation task has committed its N-th checkpoint of the rows in flight to the store, sends
itself SIGKILL: nothing gets to clean up, exactly as when the machine's OOM killer strikes.
N = 0 runs to the end. With ``KILL_SIGNAL=SIGINT`` (or ``SIGTERM``) it sends that signal to its
whole process group instead, as a terminal's Ctrl-C does, and writes the moment it did so to
``$KILL_STAMP``; with ``KILL_AGAIN=1`` too, it sends the signal a second time from the save
that the first one starts, then takes ``KILL_AGAIN_SAVE_S`` seconds over that save (a second
Ctrl-C while the first is saving). With ``KILL_PID`` it SIGKILLs that process instead (a
Prefect server dying mid-run), stamps the moment and goes on.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

from flows.commands.cli import main
from flows.generation import forecasting

kill_after = int(sys.argv[1])
saves = 0
save_states = forecasting.save_generation_states


def save_then_die(*args, **kwargs):
    global saves
    if kill_after and saves == kill_after and os.environ.get("KILL_AGAIN"):
        Path(os.environ["KILL_STAMP"] + ".again").write_text(repr(time.time()))
        os.killpg(os.getpgid(0), signal.Signals[os.environ["KILL_SIGNAL"]])
        time.sleep(float(os.environ.get("KILL_AGAIN_SAVE_S", "30")))
    save_states(*args, **kwargs)
    saves += 1
    if saves == kill_after:
        if os.environ.get("KILL_PID"):
            os.kill(int(os.environ["KILL_PID"]), signal.SIGKILL)
            Path(os.environ["KILL_STAMP"]).write_text(repr(time.time()))
            return
        name = os.environ.get("KILL_SIGNAL", "SIGKILL")
        if name == "SIGKILL":
            os.kill(os.getpid(), signal.SIGKILL)
        Path(os.environ["KILL_STAMP"]).write_text(repr(time.time()))
        os.killpg(os.getpgid(0), signal.Signals[name])


forecasting.save_generation_states = save_then_die
sys.exit(main(sys.argv[2:]))
