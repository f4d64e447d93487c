"""Run ``yalm-forecast ingest`` over a feed corpus nobody here wrote: feedparser's own tests.

Downloads feedparser's source distribution (the installed version) from the package index into
a temporary folder (nothing is kept in the repository), serves its ``tests/`` files over
loopback HTTP with each file's own headers (a ``Header: Name: value`` line in the file's
opening comment, as feedparser's ``runtests.py`` serves them; ``Status`` sets the status), and
runs the real command, ``yalm-forecast ingest``, in configs of up to 50 feeds on one SQLite
store. Then it prints: feeds ok / partial / not_modified / failed by reason; items stored
against feedparser's own entry counts (feedparser fetching the same URLs), and where they
differ, why; the encodings the feeds were read in; a second run (nothing new may be stored);
and the stored titles of the undeclared-encoding feeds (``illformed/chardet``).

    python benchmarks/feed_corpus.py [--max-feeds N] [--keep DIR]

Needs network access to the package index once (``pip download``); everything else is local.
"""

from __future__ import annotations

import argparse
import json
import mimetypes
import re
import subprocess
import sys
import tarfile
import tempfile
import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib.metadata import version
from pathlib import Path

import feedparser
import yaml

FEEDS_PER_CONFIG = 50
# The corpus: every ill-formed and encoding test, and a deterministic share of the rest.
SELECTION = (
    ("illformed", None),
    ("encoding", None),
    ("http", None),
    ("entities", 40),
    ("wellformed/rss", None),
    ("wellformed/atom", None),
    ("wellformed/rdf", None),
    ("wellformed/cdf", None),
    ("wellformed/base", None),
    ("wellformed/http", None),
    ("wellformed/sanitize", 60),
)
HEADER_LINE = re.compile(rb"^Header:\s+([^:]+):(.+)$", re.MULTILINE)
# The hosts feedparser's test files name in their headers (Location, Content-Location).
ORIGINAL_HOSTS = ("127.0.0.1:8097", "localhost:8097")


def download_corpus(workdir: Path) -> Path:
    release = version("feedparser")
    command = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps"]
    command += ["--no-binary", ":all:", f"feedparser=={release}", "-d", str(workdir)]
    subprocess.run(command, check=True)
    (archive,) = workdir.glob("feedparser-*.tar.gz")
    with tarfile.open(archive) as tar:
        tar.extractall(workdir, filter="data")
    return workdir / f"feedparser-{release}" / "tests"


def select_files(tests: Path, max_feeds: int | None) -> list[Path]:
    chosen = []
    for folder, limit in SELECTION:
        files = sorted(path for path in (tests / folder).rglob("*.xml") if path.is_file())
        chosen += files[:limit] if limit else files
    return chosen[:max_feeds] if max_feeds else chosen


class CorpusServer:
    """Serves ``root`` with each file's own headers; answers conditional GETs like runtests."""

    def __init__(self, root: Path):
        self.requests = Counter()
        self.not_modified = Counter()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                path = root / self.path.lstrip("/").split("?")[0]
                server.requests[self.path] += 1
                if self.path == "/-/return-304.xml":  # runtests' target of a redirect to a 304
                    server.not_modified[self.path] += 1
                    self.send_response(304)
                    self.end_headers()
                    return
                if not path.is_file():
                    self.send_error(404)
                    return
                body = path.read_bytes()
                here = f"127.0.0.1:{server.httpd.server_port}"
                headers = {
                    name.decode().strip(): _moved(value.decode().strip(), here)
                    for name, value in HEADER_LINE.findall(body)
                }
                status = int(headers.pop("Status", 200))
                if self.headers.get("If-None-Match") == headers.get(
                    "ETag", "-"
                ) or self.headers.get("If-Modified-Since") == headers.get("Last-Modified", "-"):
                    status = 304
                    server.not_modified[self.path] += 1
                content_type = headers.pop("Content-type", None) or mimetypes.guess_type(path)[0]
                self.send_response(status)
                self.send_header("Content-Type", content_type or "application/xml")
                self.send_header("Content-Length", "0" if status == 304 else str(len(body)))
                for name, value in headers.items():
                    self.send_header(name, value)
                self.end_headers()
                if status != 304:
                    self.wfile.write(body)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.httpd.server_port}/{path}"


def _moved(value: str, here: str) -> str:
    for host in ORIGINAL_HOSTS:
        value = value.replace(host, here)
    return value


def run_ingest(feeds: list[dict], workdir: Path, database: Path, run_name: str) -> list[dict]:
    """``yalm-forecast ingest`` over ``feeds``, one config per 50; the per-feed rows."""
    rows = []
    for start in range(0, len(feeds), FEEDS_PER_CONFIG):
        config = {
            "database": str(database),
            "feed_defaults": {"timeout_s": 5.0, "retries": 0},
            "feeds": feeds[start : start + FEEDS_PER_CONFIG],
            "watchlist": [],
            "templates": [],
        }
        path = workdir / f"{run_name}-{start // FEEDS_PER_CONFIG:02d}.yaml"
        path.write_text(yaml.safe_dump(config, sort_keys=False), "utf-8")
        command = ["yalm-forecast", "ingest", "--config", str(path), "--format", "json"]
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode not in (0, 3) or "Traceback" in done.stderr:
            raise SystemExit(f"ingest crashed on {path}:\n{done.stderr}")
        rows += json.loads(done.stdout)
    return rows


def reason_class(reason: str | None) -> str:
    if not reason:
        return "-"
    reason = re.sub(r"<unknown>:\d+:\d+: ", "", reason)
    return re.sub(r"\d+", "N", reason.split(";")[0])[:90]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--max-feeds", type=int, default=None, help="stop after N feeds")
    parser.add_argument("--keep", type=Path, default=None, help="work here instead of a temp dir")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as temporary:
        workdir = args.keep or Path(temporary)
        workdir.mkdir(parents=True, exist_ok=True)
        tests = download_corpus(workdir)
        files = select_files(tests, args.max_feeds)
        server = CorpusServer(tests.parent)
        server.thread.start()
        try:
            report(files, tests, server, workdir)
        finally:
            server.httpd.shutdown()
    return 0


def report(files: list[Path], tests: Path, server: CorpusServer, workdir: Path) -> None:
    from flows.store.database import list_news, open_store

    names = {}
    for path in files:
        relative = path.relative_to(tests.parent).as_posix()
        names[re.sub(r"[^A-Za-z0-9_.-]", "_", relative.removeprefix("tests/"))] = relative
    feeds = [{"name": name, "url": server.url(relative)} for name, relative in names.items()]
    database = workdir / "corpus.sqlite"
    first = run_ingest(feeds, workdir, database, "first")
    second = run_ingest(feeds, workdir, database, "second")

    print(f"feedparser {version('feedparser')} corpus: {len(feeds)} feeds, ", end="")
    print(f"{-(-len(feeds) // FEEDS_PER_CONFIG)} configs of up to {FEEDS_PER_CONFIG}\n")
    print("== feeds by status and reason (first run)")
    for (status, reason), count in sorted(
        Counter((row["status"], reason_class(row["reason"])) for row in first).items(),
        key=lambda pair: (pair[0][0], -pair[1]),
    ):
        print(f"{count:5d}  {status:12s} {reason}")

    expected = {}
    for row in first:
        parsed = feedparser.parse(server.url(names[row["feed"]]))
        expected[row["feed"]] = len(parsed.entries)
    with open_store(f"sqlite:///{database}") as store:
        stored = Counter(item["source"] for item in list_news(store))
        no_text = sum(not item["has_text"] for item in list_news(store))
    print("\n== items: stored against feedparser's own entry counts")
    totals = Counter()
    differences = Counter()
    for row in first:
        entries, seen, new = expected[row["feed"]], row["items_seen"], row["items_new"]
        totals.update(entries=entries, seen=seen, new=new, stored=stored[row["feed"]])
        if row["status"] == "failed" and entries:
            differences[f"feed failed ({reason_class(row['reason'])})"] += entries
        elif row["status"] == "partial" and "items not stored" in row["reason"]:
            differences[f"held back: {reason_class(row['reason'])}"] += entries
        elif row["status"] == "not_modified":
            differences["answered 304 on the first request"] += entries
        else:
            if entries > seen:
                differences["entry with no title, summary or link"] += entries - seen
            if seen > new:
                differences["same key as an item already stored (guid or absolute link)"] += (
                    seen - new
                )
    print(f"feedparser entries {totals['entries']}, normalised items {totals['seen']}, ", end="")
    print(f"stored {totals['new']} (rows in the store: {sum(stored.values())})")
    print(f"stored items with no text (link-only, kept out of prompts): {no_text}")
    for reason, count in differences.most_common():
        print(f"{count:5d}  {reason}")

    print("\n== second run over the same feeds")
    print(
        f"new items {sum(row['items_new'] for row in second)}, statuses "
        f"{dict(Counter(row['status'] for row in second))}, "
        f"304 answers {sum(server.not_modified.values())}"
    )

    print("\n== undeclared encodings (illformed/chardet): stored titles")
    with open_store(f"sqlite:///{database}") as store:
        for name in sorted(n for n in names if n.startswith("illformed_chardet")):
            titles = [item["title"][:40] for item in list_news(store, source=name)]
            row = next(row for row in first if row["feed"] == name)
            print(f"  {name:34s} {row['status']:8s} {titles}")


if __name__ == "__main__":
    raise SystemExit(main())
