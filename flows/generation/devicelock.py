"""One generation per device on this machine: an exclusive lock on a file, held while generating.

The kernel drops an ``flock`` when its process dies, however it dies (SIGKILL, out of memory),
so a killed run can never leave the device locked; that is why this, and not a server-side
counter, is the guarantee on one machine. The lock file names the physical device (``cuda0``,
``cpu``) and lives in ``$YALM_FORECAST_LOCK_DIR`` (default: the system's temporary folder); it
records the pid and start time of the holder so that a waiting run can say whom it waits for. It
knows nothing of Prefect, models or the store.
"""

from __future__ import annotations

import fcntl
import logging
import os
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

from flows.errors import PipelineError

LOCK_DIR_ENV = "YALM_FORECAST_LOCK_DIR"
log = logging.getLogger(__name__)


class DeviceBusyError(PipelineError):
    """Another generation held the device for longer than we were willing to wait."""


def lock_path(device: str) -> Path:
    """One lock per physical device: ``cuda`` and ``cuda:0`` are the same GPU, and so is
    ``cuda:0`` of a process with ``CUDA_VISIBLE_DEVICES=1`` and ``cuda:1`` of one without."""
    folder = Path(os.environ.get(LOCK_DIR_ENV) or tempfile.gettempdir())
    kind, _, index = device.partition(":")
    name = kind
    if kind == "cuda":
        visible = [part.strip() for part in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",")]
        position = int(index or 0)
        physical = visible[position] if any(visible) and position < len(visible) else position
        name = f"cuda{physical}"
    return folder / f"yalm-forecast-{os.getuid()}-{name}.lock"


@contextmanager
def device_locks(devices: list[str], *, timeout_s: float | None = None) -> Iterator[Path]:
    """Hold the locks of several devices (``cuda:0,cuda:1``), taken in one order everywhere
    so that two holders cannot deadlock; yields the first lock's path."""
    paths = sorted({lock_path(device): device for device in devices}.items())
    with ExitStack() as stack:
        for _, device in paths:
            stack.enter_context(device_lock(device, timeout_s=timeout_s))
        yield paths[0][0]


@contextmanager
def device_lock(device: str, *, timeout_s: float | None = None) -> Iterator[Path]:
    """Hold the lock of ``device``, waiting for it (``timeout_s`` None: as long as it takes)."""
    path = lock_path(device)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a+") as handle:
        if not _try_lock(handle):
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            log.warning("waiting for %s: held by %s", path, holder)
            if timeout_s is None:
                fcntl.flock(handle, fcntl.LOCK_EX)
            deadline = time.monotonic() + (timeout_s or 0.0)
            while timeout_s is not None and not _try_lock(handle):
                if time.monotonic() > deadline:
                    raise DeviceBusyError(
                        f"{path}: still held by {holder} after {timeout_s:g} s; "
                        "another generation is using the device"
                    )
                time.sleep(1.0)
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()} since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        handle.flush()
        try:
            yield path
        finally:
            handle.seek(0)
            handle.truncate()
            fcntl.flock(handle, fcntl.LOCK_UN)


def _try_lock(handle) -> bool:
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True
