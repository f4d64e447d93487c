"""Fetching one feed's bytes over HTTP, politely and defensively.

Owns the HTTP side: a timeout per attempt, a cap on the body size (a bigger body is refused,
never truncated), retries with backoff on transient faults only (timeouts, connection errors,
429 and 5xx), conditional GET with the ETag / Last-Modified the caller kept, and a check that the
content type could be a feed. Every failure is a ``FeedError`` whose message is the reason.
A ``file://`` URL is read from disk under the same size cap (offline demos, mirrored feeds). It
does not parse feeds and knows nothing of the store.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urljoin, urlparse

import httpx

from flows import __version__
from flows.errors import FeedError

USER_AGENT = f"yalm-forecast/{__version__} (news feed reader)"
ACCEPT = "application/rss+xml, application/atom+xml, application/xml;q=0.9, */*;q=0.1"
RETRYABLE_STATUS = frozenset({429, 500, 502, 503, 504})
# Feeds are served under many types; refuse only those that cannot be a feed.
FEED_TYPE_MARKERS = ("xml", "rss", "atom", "rdf")
NEUTRAL_TYPES = frozenset({"", "text/plain", "application/octet-stream", "binary/octet-stream"})


@dataclass(frozen=True)
class FetchResponse:
    url: str
    http_status: int
    body: bytes
    content_type: str
    etag: str | None
    last_modified: str | None
    attempts: int
    duration_s: float
    content_location: str | None = None

    @property
    def not_modified(self) -> bool:
        return self.http_status == 304

    @property
    def base_url(self) -> str:
        """What the feed's relative links resolve against (when no ``xml:base`` says otherwise).

        ``Content-Location`` (itself resolved against the final URL), else the final URL after
        redirects, never the configured one: a moved feed's links are relative to where it is.
        """
        return urljoin(self.url, self.content_location) if self.content_location else self.url


class FetchError(FeedError):
    """A fetch failed; ``kind`` is a short machine-readable cause, ``http_status`` if any."""

    def __init__(
        self, message: str, *, kind: str, http_status: int | None = None, attempts: int = 1
    ):
        super().__init__(message)
        self.kind, self.http_status, self.attempts = kind, http_status, attempts


class _Transient(Exception):
    """An attempt failed in a way worth retrying."""

    def __init__(self, error: FetchError):
        self.error = error


def fetch(
    url: str,
    *,
    etag: str | None = None,
    last_modified: str | None = None,
    timeout_s: float = 10.0,
    max_bytes: int = 5_000_000,
    retries: int = 2,
    backoff_s: float = 1.0,
) -> FetchResponse:
    """GET ``url``; a 304 (not modified) is a successful response with an empty body."""
    if url.startswith("file://"):
        return _read_file(url, max_bytes=max_bytes)
    headers = {
        "User-Agent": USER_AGENT,
        "Accept": ACCEPT,
    }
    if etag:
        headers["If-None-Match"] = etag
    if last_modified:
        headers["If-Modified-Since"] = last_modified
    started = time.monotonic()
    with httpx.Client(timeout=timeout_s, follow_redirects=True, headers=headers) as client:
        for attempt in range(1, retries + 2):
            try:
                response = _attempt(client, url, timeout_s=timeout_s, max_bytes=max_bytes)
            except _Transient as transient:
                transient.error.attempts = attempt
                if attempt > retries:
                    raise transient.error from None
                time.sleep(backoff_s * 2 ** (attempt - 1))
                continue
            except FetchError as error:
                error.attempts = attempt
                raise
            status, body, response_headers, final_url = response
            return FetchResponse(
                url=final_url,
                http_status=status,
                body=body,
                content_type=response_headers.get("content-type", ""),
                etag=response_headers.get("etag") or etag,
                last_modified=response_headers.get("last-modified") or last_modified,
                attempts=attempt,
                duration_s=time.monotonic() - started,
                content_location=response_headers.get("content-location"),
            )
    raise AssertionError("unreachable: the loop returns or raises")


def _attempt(client: httpx.Client, url: str, *, timeout_s: float, max_bytes: int):
    deadline = time.monotonic() + timeout_s
    try:
        with client.stream("GET", url) as response:
            status = response.status_code
            if status == 304:
                return status, b"", response.headers, str(response.url)
            if status >= 400:
                error = FetchError(
                    f"HTTP {status} {response.reason_phrase}", kind="http", http_status=status
                )
                raise _Transient(error) if status in RETRYABLE_STATUS else error
            _check_headers(response, max_bytes)
            chunks, received = [], 0
            for chunk in response.iter_bytes():  # decompressed: the cap bounds memory
                received += len(chunk)
                if received > max_bytes:
                    raise FetchError(
                        f"body exceeds max_bytes={max_bytes}", kind="too_large", http_status=status
                    )
                if time.monotonic() > deadline:
                    raise httpx.ReadTimeout("deadline passed while reading the body")
                chunks.append(chunk)
            return status, b"".join(chunks), response.headers, str(response.url)
    except httpx.TimeoutException:
        raise _Transient(FetchError(f"timed out after {timeout_s:g} s", kind="timeout")) from None
    except httpx.TransportError as exc:
        raise _Transient(FetchError(f"connection failed: {exc}", kind="network")) from None
    except httpx.InvalidURL as exc:
        raise FetchError(f"invalid URL: {exc}", kind="url") from None


def _read_file(url: str, *, max_bytes: int) -> FetchResponse:
    """A local feed file: no validators, no retries (a missing file will not come back)."""
    started = time.monotonic()
    path = Path(unquote(urlparse(url).path))
    try:
        size = path.stat().st_size
        if size > max_bytes:
            raise FetchError(
                f"body of {size} bytes exceeds max_bytes={max_bytes}", kind="too_large"
            )
        body = path.read_bytes()
    except FileNotFoundError:
        raise FetchError(f"file not found: {path}", kind="file") from None
    except OSError as exc:
        raise FetchError(f"cannot read {path}: {exc.strerror}", kind="file") from None
    return FetchResponse(
        url, 200, body, "application/xml", None, None, 1, time.monotonic() - started
    )


def _check_headers(response: httpx.Response, max_bytes: int) -> None:
    status = response.status_code
    media_type = response.headers.get("content-type", "").split(";")[0].strip().lower()
    if media_type not in NEUTRAL_TYPES and not any(m in media_type for m in FEED_TYPE_MARKERS):
        raise FetchError(
            f"wrong content type {media_type!r}, not a feed",
            kind="content_type",
            http_status=status,
        )
    declared = response.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > max_bytes:
        raise FetchError(
            f"body of {int(declared)} bytes exceeds max_bytes={max_bytes}",
            kind="too_large",
            http_status=status,
        )
