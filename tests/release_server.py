"""Helpers for the fetch tests: a loopback mirror that misbehaves on request, disks that fill.

``FaultyMirror`` is the real ``yalm_runner.mirror`` server (HEAD, Range, If-Range, ETag) with
three faults a test arms per file: drop the connection after N bytes, serve a truncated or
damaged copy, answer an HTTP status (503, 429 with Retry-After) first. ``FillingDisk`` is the
downloader's ``Disk`` seam answering a chosen free space and raising ENOSPC after a byte budget.
Nothing is mocked: bytes cross a real socket and land in real files.
"""

from __future__ import annotations

import errno
import hashlib
import os
import threading
from pathlib import Path

from yalm_runner.downloader import Disk
from yalm_runner.mirror import MirrorServer


class FaultyMirror(MirrorServer):
    def __init__(self, root, **kwargs):
        super().__init__(root, **kwargs)
        self.drop_after: dict[str, int] = {}  # file name -> bytes sent before the next cut
        self.on_drop: dict[str, object] = {}  # file name -> callable run right after the cut
        self.substitute: dict[str, list[Path]] = {}  # file name -> files to serve instead, once
        self.statuses: dict[str, list[tuple[int, dict[str, str]]]] = {}
        self._fault_lock = threading.Lock()
        self._request = threading.local()  # whether the request being answered is a HEAD

    def _armed(self, table: dict, path: str):
        with self._fault_lock:
            for name in list(table):
                if path.endswith(name):
                    return name
        return None

    def locate(self, relative: str):
        name = self._armed(self.substitute, relative)
        if name is not None and self.substitute[name] and not self._request.head:
            return self.substitute[name].pop(0)
        return super().locate(relative)

    def _answer(self, handler, *, head):
        self._request.head = head
        name = None if head else self._armed(self.statuses, handler.path)
        if name is not None and self.statuses[name]:
            status, headers = self.statuses[name].pop(0)
            handler.send_response(status)
            for key, value in headers.items():
                handler.send_header(key, value)
            handler.send_header("Content-Length", "0")
            handler.end_headers()
            return
        super()._answer(handler, head=head)

    def send_body(self, handler, handle, path, count):
        name = self._armed(self.drop_after, path)
        if name is None:
            return super().send_body(handler, handle, path, count)
        limit = self.drop_after.pop(name)
        sent = super().send_body(handler, handle, path, min(limit, count))
        handler.wfile.flush()
        action = self.on_drop.pop(name, None)
        if action is not None:
            action()
        return sent


class FillingDisk(Disk):
    """Reports ``free_bytes`` free (if given; a list answers in turn), fails with ENOSPC once
    ``budget_bytes`` are written, and calls ``observe`` after every chunk written."""

    def __init__(self, free_bytes=None, budget_bytes=None, observe=None):
        self.free = free_bytes
        self.budget = budget_bytes
        self.observe = observe
        self.written = 0
        self._lock = threading.Lock()

    def free_bytes(self, path):
        if isinstance(self.free, list):  # one answer per question, in turn
            return self.free.pop(0)
        return super().free_bytes(path) if self.free is None else self.free

    def write(self, handle, data):
        with self._lock:
            if self.budget is not None and self.written + len(data) > self.budget:
                room = self.budget - self.written
                handle.write(data[:room])
                self.written += room
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            self.written += len(data)
        handle.write(data)
        if self.observe is not None:
            self.observe()


def tree_bytes(*folders: Path) -> int:
    """The bytes of every file under ``folders`` now. Called from the fetch's own threads while
    others write and rename: a file listed and then renamed before its size is read (a
    ``.partial`` made final) is counted under its new name by the next call, not this one."""
    total = 0
    for folder in folders:
        for root, _, names in os.walk(folder):  # a folder gone while walked is skipped
            for name in names:
                try:
                    total += os.stat(os.path.join(root, name)).st_size
                except FileNotFoundError:
                    continue
    return total


def store_files(path: Path) -> dict[str, str]:
    """Relative path -> sha256 of every file of a store folder except the fetch provenance."""
    return {
        str(file.relative_to(path)): hashlib.sha256(file.read_bytes()).hexdigest()
        for file in sorted(path.rglob("*"))
        if file.is_file() and file.name != "provenance.json"
    }
