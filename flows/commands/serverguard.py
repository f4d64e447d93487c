"""A temporary Prefect server dies with the command that started it, however the command dies.

With no Prefect server configured, running a flow (``yalm-forecast generate-shard``) has Prefect
start a temporary server in a subprocess, which Prefect stops at exit. A command that is
SIGKILLed (the OOM killer, ``kill -9``) never gets there, and its server would stay behind,
orphaned, holding a port and memory, until someone notices.

This module owns the guard: before Prefect can start a server, the command marks its
environment with its identity (``YALM_FORECAST_OWNER``: its pid and start time, which the server
inherits) and starts a watchdog (``python -m flows.commands.serverguard``) in a session of its
own, whose stdin is a pipe only the command holds open. The kernel closes that pipe when the
command ends, however it ends; the watchdog then ends every Prefect temporary server carrying
the mark (SIGTERM, then SIGKILL after ``GRACE_S``) and, when it had to end one (the command died
without stopping it), says so in one line of the log file.

Linux only (it reads ``/proc``); elsewhere nothing is started. It knows nothing of Prefect's
API, the night or the store; the watchdog imports nothing beyond the standard library and the
log format.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import time
from collections.abc import Iterator
from contextlib import suppress
from pathlib import Path

OWNER_ENV = "YALM_FORECAST_OWNER"
# What a Prefect temporary server runs (prefect.server.api.server.SubprocessASGIServer).
SERVER_COMMAND = b"prefect.server.api.server:create_app"
GRACE_S = 5.0  # from SIGTERM to SIGKILL
PROC = Path("/proc")


def guard_temporary_servers(log_file: Path | None) -> int | None:
    """Mark this process's environment and start the watchdog; returns its pid (None where
    there is no ``/proc`` to read). Call before anything can start a Prefect server."""
    if not (PROC / "self" / "environ").exists():
        return None
    mark = owner_mark(os.getpid())
    os.environ[OWNER_ENV] = mark
    # The write end stays open, unused, in this process alone (not inherited: close-on-exec)
    # until it ends; the watchdog reads the other end and learns of that end at EOF.
    read_end, _write_end = os.pipe()
    devnull = os.open(os.devnull, os.O_RDWR)
    try:
        return os.posix_spawn(
            sys.executable,
            [sys.executable, "-m", "flows.commands.serverguard", mark, str(log_file or "")],
            os.environ,
            file_actions=[
                (os.POSIX_SPAWN_DUP2, read_end, 0),
                (os.POSIX_SPAWN_DUP2, devnull, 1),
                (os.POSIX_SPAWN_DUP2, devnull, 2),
            ],
            setsid=True,  # out of the terminal's Ctrl-C: it must outlive the command
        )
    finally:
        os.close(read_end)
        os.close(devnull)


def owner_mark(pid: int) -> str:
    """``pid:start`` (the start in clock ticks since boot): unique even when pids are reused."""
    return f"{pid}:{_start_ticks(pid)}"


def marked_servers(mark: str) -> list[int]:
    """The Prefect temporary servers whose environment carries ``mark``."""
    wanted = f"{OWNER_ENV}={mark}".encode()
    found = []
    for pid in _pids():
        try:
            command = (PROC / str(pid) / "cmdline").read_bytes()
            if SERVER_COMMAND in command and wanted in (PROC / str(pid) / "environ").read_bytes(
            ).split(b"\0"):  # fmt: skip
                found.append(pid)
        except OSError:  # gone meanwhile, or not ours to read
            continue
    return found


def end_servers(mark: str) -> list[int]:
    """End the servers carrying ``mark``: SIGTERM, SIGKILL after ``GRACE_S``; returns them."""
    servers = {pid: _start_ticks(pid) for pid in marked_servers(mark)}
    for pid in servers:
        _signal(pid, servers[pid], signal.SIGTERM)
    deadline = time.monotonic() + GRACE_S
    while time.monotonic() < deadline and any(_alive(pid, start) for pid, start in servers.items()):
        time.sleep(0.1)
    for pid, start in servers.items():
        _signal(pid, start, signal.SIGKILL)
    return sorted(servers)


def _pids() -> Iterator[int]:
    for entry in PROC.iterdir():
        if entry.name.isdigit():
            yield int(entry.name)


def _start_ticks(pid: int) -> str | None:
    try:
        stat = (PROC / str(pid) / "stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]  # field 22, after the command in parentheses


def _alive(pid: int, start: str | None) -> bool:
    return start is not None and _start_ticks(pid) == start


def _signal(pid: int, start: str | None, signum: int) -> None:
    if _alive(pid, start):  # the same process, not a later one under its pid
        with suppress(ProcessLookupError):
            os.kill(pid, signum)


def _watch(mark: str, log_file: str) -> None:
    """The watchdog: wait for the owner's end, then end the servers it left."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    while os.read(0, 65536):  # nobody writes: this returns b"" when the owner is gone
        pass
    ended = end_servers(mark)
    if ended and log_file:
        from flows.commands.console import LOG_DATE_FORMAT, LOG_FORMAT

        handler = logging.FileHandler(log_file, encoding="utf-8")
        handler.setFormatter(logging.Formatter(LOG_FORMAT, LOG_DATE_FORMAT))
        log = logging.getLogger("flows.serverguard")
        log.addHandler(handler)
        owner = mark.split(":", 1)[0]
        log.warning(
            "ended the temporary Prefect server%s (pid %s) that yalm-forecast (pid %s) left "
            "behind when it was killed",
            "s" if len(ended) > 1 else "",
            ", ".join(map(str, ended)),
            owner,
        )
        handler.close()


if __name__ == "__main__":
    _watch(sys.argv[1], sys.argv[2])
