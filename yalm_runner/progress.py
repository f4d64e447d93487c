"""Fetch's progress drawn for a person: a bar with bytes, rate and ETA on a terminal, plain lines
otherwise (a log file, CI). It only renders what ``fetch.FetchMonitor`` reports; it knows
nothing of HTTP or stores.
"""

from __future__ import annotations

import threading
import time

from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

from yalm_runner.convert import PartProgress
from yalm_runner.fetch import FetchMonitor

PLAIN_REPORT_EVERY_S = 30.0


class FetchProgress(FetchMonitor):
    """Use as a context manager around ``fetch_release``."""

    def __init__(self, console: Console):
        self.console = console
        self.terminal = console.is_terminal
        self._lock = threading.Lock()
        self._received = self._total = 0
        self._started = self._last_line = time.monotonic()
        self._parts = ""
        self._progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            DownloadColumn(),
            TransferSpeedColumn(),
            TimeRemainingColumn(),
            console=console,
            disable=not self.terminal,
        )
        self._task = self._progress.add_task("fetching", total=None)

    def __enter__(self) -> FetchProgress:
        self._progress.__enter__()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._progress.__exit__(*exc_info)

    def planned(self, files: int, download_bytes: int) -> None:
        self._total = download_bytes
        self._progress.update(self._task, total=download_bytes)
        self._line(f"{files} files to download, {download_bytes / 1e9:.2f} GB")

    def received(self, nbytes: int) -> None:
        self._progress.advance(self._task, nbytes)
        with self._lock:
            self._received += nbytes
            due = time.monotonic() - self._last_line >= PLAIN_REPORT_EVERY_S
            if due:
                self._last_line = time.monotonic()
        if due and not self.terminal:
            self._line(self._status())

    def note(self, message: str) -> None:
        self._line(message)

    def part_done(self, progress: PartProgress) -> None:
        self._parts = f"{progress.part} converted"
        self._progress.update(self._task, description=self._parts)
        if not self.terminal:
            self._line(f"{self._parts}; {self._status()}")

    def _status(self) -> str:
        elapsed_s = max(time.monotonic() - self._started, 1e-9)
        rate = self._received / elapsed_s
        left_s = (self._total - self._received) / rate if rate else float("inf")
        return (
            f"{self._received / 1e9:.2f} of {self._total / 1e9:.2f} GB received, "
            f"{rate / 1e6:.1f} MB/s, about {left_s / 60:.0f} min left"
        )

    def _line(self, message: str) -> None:
        self.console.print(
            f"yalm-runner fetch: {message}", highlight=False, markup=False, soft_wrap=True
        )
