"""Helpers for the pipeline's tests: a real HTTP server on loopback, sample feeds, configs.

The feed server is a ``ThreadingHTTPServer`` on 127.0.0.1 serving routes the test declares;
it counts requests and 304 answers per path, so conditional GET and retries can be proven
without mocking HTTP. Nothing here touches the internet.
"""

from __future__ import annotations

import contextlib
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import yaml

SAMPLE_FEEDS = Path(__file__).resolve().parents[2] / "flows" / "sample_feeds"

WATCHLIST = [
    {"ticker": "SBER", "aliases": ["Сбербанк", "Сбер", "Sberbank"]},
    {"ticker": "GAZP", "aliases": ["Газпром", "Gazprom"]},
    {"ticker": "LKOH", "aliases": ["Лукойл", "Lukoil"]},
    {"ticker": "YDEX", "aliases": ["Яндекс", "Yandex"]},
    {"ticker": "AAPL", "aliases": ["Apple"]},
    {"ticker": "NVDA", "aliases": ["Nvidia"]},
]


@dataclass
class Route:
    body: bytes = b""
    status: int = 200
    content_type: str = "application/rss+xml; charset=utf-8"
    etag: str | None = None
    last_modified: str | None = None
    hang_s: float = 0.0
    send_length: bool = True
    fail_first: int = 0  # answer 503 to the first N requests
    redirect_to: str | None = None  # answer 301 with this Location
    headers: dict[str, str] = field(default_factory=dict)  # more response headers
    requests: int = 0
    not_modified: int = 0
    headers_seen: list[dict[str, str]] = field(default_factory=list)


class FeedServer:
    def __init__(self):
        self.routes: dict[str, Route] = {}
        self.stop = threading.Event()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep test output clean
                pass

            def do_GET(self):
                route = server.routes.get(self.path)
                if route is None:
                    self.send_error(404, "Not Found")
                    return
                route.requests += 1
                route.headers_seen.append(dict(self.headers))
                if route.hang_s:
                    server.stop.wait(route.hang_s)
                    return
                if route.fail_first >= route.requests:
                    self.send_error(503, "Service Unavailable")
                    return
                if route.redirect_to:
                    self.send_response(301)
                    self.send_header("Location", route.redirect_to)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                if route.status != 200:
                    self.send_error(route.status)
                    return
                etag_match = route.etag and self.headers.get("If-None-Match") == route.etag
                date_match = (
                    route.last_modified
                    and self.headers.get("If-Modified-Since") == route.last_modified
                )
                if etag_match or (date_match and not route.etag):
                    route.not_modified += 1
                    self.send_response(304)
                    self.end_headers()
                    return
                self.send_response(200)
                self.send_header("Content-Type", route.content_type)
                if route.etag:
                    self.send_header("ETag", route.etag)
                if route.last_modified:
                    self.send_header("Last-Modified", route.last_modified)
                if route.send_length:
                    self.send_header("Content-Length", str(len(route.body)))
                for name, value in route.headers.items():
                    self.send_header(name, value)
                self.end_headers()
                with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                    self.wfile.write(route.body)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(
            target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.httpd.server_port}{path}"

    def add(self, path: str, **route) -> Route:
        self.routes[path] = Route(**route)
        return self.routes[path]


def wait_for(predicate, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.01)


def sample(name: str) -> bytes:
    return (SAMPLE_FEEDS / name).read_bytes()


def write_config(directory: Path, **overrides) -> Path:
    """A config file in ``directory`` with fast feed defaults, the test watchlist, no feeds."""
    document = {
        "database": "forecast.sqlite",
        "feed_defaults": {"timeout_s": 0.5, "retries": 1, "backoff_s": 0.01},
        "feeds": [],
        "watchlist": WATCHLIST,
        "templates": [],
        **overrides,
    }
    path = directory / "yalm-forecast.yaml"
    path.write_text(yaml.safe_dump(document, allow_unicode=True, sort_keys=False), "utf-8")
    return path


@dataclass
class SeenRequest:
    method: str
    path: str
    body: bytes


class LoopbackProxy:
    """A TCP proxy on 127.0.0.1 in front of ``upstream`` (``http://host:port``): bytes pass
    both ways untouched, and each HTTP/1.1 request a client sends is also parsed as it goes by
    and kept in ``requests`` (a connection that upgrades, a websocket, is passed on unparsed).
    ``close_all`` drops every connection and refuses new ones, as a server that died would."""

    def __init__(self, upstream: str):
        import socket

        host, port = upstream.split("://", 1)[1].split("/", 1)[0].rsplit(":", 1)
        self.upstream = (host, int(port))
        self.requests: list[SeenRequest] = []
        self.lock = threading.Lock()
        self.sockets: list = []
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.thread = threading.Thread(target=self._accept, daemon=True)

    def __enter__(self) -> LoopbackProxy:
        self.thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self.close_all()

    def close_all(self) -> None:
        import socket

        with contextlib.suppress(OSError):
            self.listener.close()
        with self.lock:
            for each in self.sockets:
                with contextlib.suppress(OSError):
                    each.shutdown(socket.SHUT_RDWR)
                    each.close()

    def _accept(self) -> None:
        import socket

        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            server = socket.create_connection(self.upstream)
            with self.lock:
                self.sockets += [client, server]
            threading.Thread(target=self._pump, args=(client, server, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(server, client, False), daemon=True).start()

    def _pump(self, source, target, parse: bool) -> None:
        buffer = b""
        while True:
            try:
                chunk = source.recv(65536)
            except OSError:
                chunk = b""
            if not chunk:
                with contextlib.suppress(OSError):
                    target.shutdown(1)  # SHUT_WR: the other side sees the end
                return
            if parse:
                buffer += chunk
                buffer, parse = self._requests_in(buffer)
            with contextlib.suppress(OSError):
                target.sendall(chunk)

    def _requests_in(self, buffer: bytes) -> tuple[bytes, bool]:
        """Take the complete requests off ``buffer``; False once the connection upgrades."""
        while b"\r\n\r\n" in buffer:
            head, rest = buffer.split(b"\r\n\r\n", 1)
            lines = head.decode("latin-1").split("\r\n")
            headers = {k.strip().lower(): v.strip() for k, _, v in
                       (line.partition(":") for line in lines[1:])}  # fmt: skip
            length = int(headers.get("content-length", "0"))
            if len(rest) < length:
                return buffer, True
            method, path, _ = lines[0].split(" ", 2)
            with self.lock:
                self.requests.append(SeenRequest(method, path, rest[:length]))
            if headers.get("upgrade"):
                return b"", False
            buffer = rest[length:]
        return buffer, True


@contextlib.contextmanager
def prefect_server(home: Path, *, startup_timeout_s: float = 300.0):
    """A Prefect API server of its own (the command Prefect's temporary server runs, with its
    database under ``home``), in its own process group; yields (process, API URL). Ended,
    with whatever it started, on the way out."""
    import os
    import signal
    import socket
    import subprocess
    import sys

    import httpx
    import prefect

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {key: value for key, value in os.environ.items() if not key.startswith("PREFECT_")}
    env.update(PREFECT_HOME=str(home), PREFECT_SERVER_ANALYTICS_ENABLED="false",
               PREFECT_UI_ENABLED="false")  # fmt: skip
    command = [
        sys.executable, "-m", "uvicorn", "--app-dir", str(Path(prefect.__file__).parent.parent),
        "--factory", "prefect.server.api.server:create_app", "--host", "127.0.0.1",
        "--port", str(port), "--log-level", "error", "--lifespan", "on",
    ]  # fmt: skip
    log = (home.parent / f"{home.name}.log").open("wb")
    server = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT,
                              start_new_session=True)  # fmt: skip
    url = f"http://127.0.0.1:{port}/api"
    try:
        deadline = time.monotonic() + startup_timeout_s
        while True:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            if server.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"the Prefect server did not start: {home.name}.log")
            time.sleep(0.2)
        yield server, url
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(server.pid, signal.SIGKILL)
        server.wait(timeout=60)
        log.close()
