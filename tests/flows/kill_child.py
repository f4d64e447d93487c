"""A ``yalm-forecast`` process that SIGKILLs itself mid-generation (for the kill test).

Usage: ``python kill_child.py N ARGS...`` runs ``yalm-forecast ARGS...`` and, right after the
generation task has committed its N-th checkpoint of the rows in flight to the store, sends
itself SIGKILL: nothing gets to clean up, exactly as when the machine's OOM killer strikes.
N = 0 runs to the end. With ``KILL_SIGNAL=SIGINT`` (or ``SIGTERM``) it sends that signal to its
whole process group instead, as a terminal's Ctrl-C does, and writes the moment it did so to
``$KILL_STAMP``. With ``KILL_MOMENT=prefill:K`` it dies instead as the K-th layer call of a
prefill begins (mid-prefill), with ``KILL_MOMENT=decode:K`` as the K-th decode forward begins
(between two checkpoints). With ``KILL_AGAIN=1`` it sends the signal a second time from the
save that the first one starts, then takes ``KILL_AGAIN_SAVE_S`` seconds over that save (a
second Ctrl-C while the first is saving). With ``KILL_PID`` it SIGKILLs that process instead (a
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
from yalm_runner import engine, model

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

moment, _, count = os.environ.get("KILL_MOMENT", "").partition(":")
calls = {"seen": 0}


def tick() -> None:
    calls["seen"] += 1
    if calls["seen"] == int(count):
        os.kill(os.getpid(), signal.SIGKILL)


if moment == "prefill":  # a generation batch's prefill (not a scoring pass)
    plain_block, plain_prefill = model.block, engine.Engine._forward
    prefilling = {"now": False}

    def block_then_die(h, *args):
        if prefilling["now"]:
            tick()
        return plain_block(h, *args)

    def prefill(self, state, tokens):
        prefilling["now"] = tokens.shape[1] > 1
        try:
            return plain_prefill(self, state, tokens)
        finally:
            prefilling["now"] = False

    model.block, engine.Engine._forward = block_then_die, prefill
elif moment == "decode":
    plain_forward = engine.Engine._forward

    def forward_then_die(self, state, tokens):
        if tokens.shape[1] == 1:
            tick()
        return plain_forward(self, state, tokens)

    engine.Engine._forward = forward_then_die
sys.exit(main(sys.argv[2:]))
