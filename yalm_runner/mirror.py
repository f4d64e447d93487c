"""A folder served over HTTP as a release mirror: ``HEAD``, ``GET``, ``Range`` and ``If-Range``.

For the fetch tests and benchmark (a real server on loopback), and for handing a release kept
with ``fetch --keep-release`` to a second machine on a LAN::

    python -m yalm_runner.mirror RELEASE_DIR --port 8000
    yalm-runner fetch STORE --source http://first-machine:8000/

Each file's ``ETag`` is made of its size and modification time, so a file replaced on disk is
a new version and an ``If-Range`` naming the old one gets the whole new file. Every request is
logged (method, path, range asked, status, bytes sent) so tests can prove what was fetched.
``ranges=False`` plays a server that ignores ``Range``. Subclasses may override ``locate``
and ``send_body`` to misbehave. It knows nothing of releases or tensors: it serves files.
"""

from __future__ import annotations

import argparse
import contextlib
import email.utils
import re
import sys
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import BinaryIO
from urllib.parse import unquote, urlparse

RANGE = re.compile(r"^bytes=(\d+)-(\d*)$")
SEND_CHUNK_BYTES = 1 << 20


@dataclass(frozen=True)
class Served:
    """One request as the mirror answered it."""

    method: str
    path: str
    range: str | None
    if_range: str | None
    status: int
    start: int
    sent_bytes: int
    etag: str | None = None  # the version the answer named


class MirrorServer:
    """Serves ``root`` on 127.0.0.1 (or ``host``) in a background thread; use as a context."""

    def __init__(self, root: str | Path, *, ranges: bool = True, host: str = "127.0.0.1", port=0):
        self.root = Path(root).resolve()
        self.ranges = ranges
        self.log: list[Served] = []
        self._lock = threading.Lock()
        mirror = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def do_HEAD(self) -> None:
                mirror._answer(self, head=True)

            def do_GET(self) -> None:
                mirror._answer(self, head=False)

        self._httpd = _QuietServer((host, port), Handler)
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )

    @property
    def url(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}/"

    def __enter__(self) -> MirrorServer:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()

    def record(self, served: Served) -> None:
        with self._lock:
            self.log.append(served)

    def gets(self, name: str | None = None) -> list[Served]:
        """The GET requests so far (for paths ending in ``name`` if given)."""
        with self._lock:
            return [
                entry
                for entry in self.log
                if entry.method == "GET" and (name is None or entry.path.endswith(name))
            ]

    def locate(self, relative: str) -> Path | None:
        """The file that answers for ``relative``; None outside the root."""
        path = (self.root / relative).resolve()
        return path if path.is_relative_to(self.root) else None

    def send_body(self, handler: BaseHTTPRequestHandler, handle: BinaryIO, path: str, count: int):
        """Write ``count`` bytes of ``handle`` (already at the start); returns bytes sent."""
        sent = 0
        while sent < count:
            chunk = handle.read(min(SEND_CHUNK_BYTES, count - sent))
            if not chunk:
                break
            handler.wfile.write(chunk)
            sent += len(chunk)
        return sent

    def _answer(self, handler: BaseHTTPRequestHandler, *, head: bool) -> None:
        relative = unquote(urlparse(handler.path).path).lstrip("/")
        path = self.locate(relative)
        asked = handler.headers.get("Range")
        if_range = handler.headers.get("If-Range")
        method = "HEAD" if head else "GET"
        if path is None or not path.is_file():
            handler.send_response(404)
            handler.send_header("Content-Length", "0")
            handler.end_headers()
            self.record(Served(method, handler.path, asked, if_range, 404, 0, 0))
            return
        stat = path.stat()
        size = stat.st_size
        etag = f'"{stat.st_size:x}-{stat.st_mtime_ns:x}"'
        last_modified = email.utils.formatdate(stat.st_mtime, usegmt=True)
        start, end = 0, size
        status = 200
        match = RANGE.match(asked or "")
        fresh = if_range is None or if_range in (etag, last_modified)
        if self.ranges and match and fresh:
            start = int(match.group(1))
            end = min(size, int(match.group(2)) + 1) if match.group(2) else size
            if start >= size:
                handler.send_response(416)
                handler.send_header("Content-Range", f"bytes */{size}")
                handler.send_header("Content-Length", "0")
                handler.end_headers()
                self.record(Served(method, handler.path, asked, if_range, 416, start, 0, etag))
                return
            status = 206
        handler.send_response(status)
        handler.send_header("Content-Type", "application/octet-stream")
        handler.send_header("Content-Length", str(end - start))
        handler.send_header("ETag", etag)
        handler.send_header("Last-Modified", last_modified)
        if self.ranges:
            handler.send_header("Accept-Ranges", "bytes")
        if status == 206:
            handler.send_header("Content-Range", f"bytes {start}-{end - 1}/{size}")
        handler.end_headers()
        sent = 0
        if not head:
            with open(path, "rb") as handle, contextlib.suppress(OSError):
                handle.seek(start)
                sent = self.send_body(handler, handle, handler.path, end - start)
            if sent < end - start:
                handler.close_connection = True
        self.record(Served(method, handler.path, asked, if_range, status, start, sent, etag))


class _QuietServer(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: object, client_address: object) -> None:
        """A client that goes away mid-answer (killed, say) is routine, not a traceback."""
        error = sys.exc_info()[1]
        if not isinstance(error, (ConnectionError, TimeoutError)):
            super().handle_error(request, client_address)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Serve a release folder for yalm-runner fetch.")
    parser.add_argument("root", type=Path)
    parser.add_argument("--host", default="0.0.0.0")
    parser.add_argument("--port", type=int, default=8000)
    args = parser.parse_args(argv)
    with MirrorServer(args.root, host=args.host, port=args.port) as server:
        print(f"serving {args.root} at {server.url}", flush=True)
        threading.Event().wait()


if __name__ == "__main__":
    main()
