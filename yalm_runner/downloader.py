"""Large files over HTTP into place, resumably: the transport and the files, nothing more.

Owns: ``HEAD`` to learn a file's size and validators; ``GET`` into ``NAME.partial`` beside a
sidecar ``NAME.partial.json`` recording the URL and validators (``ETag``, ``Last-Modified``)
the bytes came with, written before the first byte; a ``Range`` request with ``If-Range`` to
continue those bytes after a drop or a restart of the program, and a restart from zero when the
server ignores the range, answers for a different file, or has changed the file; timeouts,
retries with exponential backoff on transient faults only (connection drops, timeouts, 5xx, 429
honouring ``Retry-After``); the sha256 of the whole file; and a rename into place, fsynced, once
every byte the server announced has arrived.

It knows nothing of tensors, releases or stores: whether a file holds what it should is the
caller's check. Free space and chunk writes go through ``Disk``, the seam tests use to answer
"how much is free" and to fill the disk.
"""

from __future__ import annotations

import email.utils
import errno
import hashlib
import json
import os
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import httpx

from yalm_runner import __version__
from yalm_runner.errors import DownloadError
from yalm_runner.fsutil import fsync_directory, write_text_atomic

USER_AGENT = f"yalm-runner/{__version__}"
RETRYABLE_STATUS = frozenset({408, 429, 500, 502, 503, 504})
MISSING_STATUS = frozenset({403, 404, 410})  # S3 answers 403 for a missing key it may not list
HASH_CHUNK_BYTES = 8 << 20


@dataclass(frozen=True)
class TransferPolicy:
    """How hard to try. ``retries`` counts attempts in a row that brought no new byte."""

    timeout_s: float = 60.0
    retries: int = 8
    backoff_s: float = 1.0
    max_backoff_s: float = 60.0


@dataclass(frozen=True)
class RemoteFile:
    """What ``HEAD`` says about a file."""

    url: str
    size_bytes: int | None
    etag: str | None
    last_modified: str | None
    accepts_ranges: bool


@dataclass(frozen=True)
class Downloaded:
    """A file now complete at ``path``, and what it was checked against."""

    url: str
    path: Path
    size_bytes: int
    etag: str | None
    last_modified: str | None
    sha256: str
    resumed_from_bytes: int  # bytes kept from an earlier attempt or run (0 if none)


class Disk:
    """The filesystem as the downloader sees it. Tests substitute one that is fuller."""

    def free_bytes(self, path: Path) -> int:
        for candidate in (path, *path.parents):
            if candidate.exists():
                return shutil.disk_usage(candidate).free
        raise DownloadError(f"{path}: no existing folder to measure free space in")

    def write(self, handle: BinaryIO, data: bytes) -> None:
        handle.write(data)


class DownloadCancelled(DownloadError):
    """``Downloader.cancel`` was called while a transfer ran; its bytes so far are kept."""


class _Transient(Exception):
    """An attempt failed in a way worth retrying."""

    def __init__(self, reason: str, retry_after_s: float | None = None):
        super().__init__(reason)
        self.retry_after_s = retry_after_s


class _Restart(Exception):
    """The bytes on disk cannot be continued; start the file from zero (not a failure)."""


class Downloader:
    """Downloads files one call each; several threads may share one downloader."""

    def __init__(
        self,
        policy: TransferPolicy = TransferPolicy(),
        *,
        disk: Disk | None = None,
        on_bytes: Callable[[int], None] | None = None,
        notify: Callable[[str], None] | None = None,
        sleep: Callable[[float], None] | None = None,
    ):
        self.policy = policy
        self.disk = disk or Disk()
        self._on_bytes = on_bytes or (lambda count: None)
        self._notify = notify or (lambda message: None)
        self._cancelled = threading.Event()
        self._sleep = sleep or self._cancellable_sleep
        self._client = httpx.Client(
            timeout=policy.timeout_s,
            follow_redirects=True,
            headers={"User-Agent": USER_AGENT, "Accept-Encoding": "identity"},
        )

    def __enter__(self) -> Downloader:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        self._client.close()

    def cancel(self) -> None:
        """Make every running and later transfer stop soon with ``DownloadCancelled``."""
        self._cancelled.set()

    def _cancellable_sleep(self, seconds: float) -> None:
        self._cancelled.wait(seconds)

    def _check_cancelled(self, url: str) -> None:
        if self._cancelled.is_set():
            raise DownloadCancelled(f"{url}: cancelled")

    def probe(self, url: str) -> RemoteFile | None:
        """``HEAD url``: its size and validators, or None if the server has no such file."""
        failures = 0
        while True:
            self._check_cancelled(url)
            try:
                response = self._client.head(url)
                if response.status_code in MISSING_STATUS:
                    return None
                if response.status_code in RETRYABLE_STATUS:
                    raise _Transient(f"HTTP {response.status_code}", _retry_after_s(response))
                if response.status_code >= 400:
                    raise DownloadError(f"{url}: HTTP {response.status_code} to HEAD")
                length = response.headers.get("content-length", "")
                return RemoteFile(
                    url=url,
                    size_bytes=int(length) if length.isdigit() else None,
                    etag=response.headers.get("etag"),
                    last_modified=response.headers.get("last-modified"),
                    accepts_ranges=response.headers.get("accept-ranges", "") == "bytes",
                )
            except httpx.TransportError as exc:
                transient = _Transient(f"{type(exc).__name__}: {exc}")
            except _Transient as exc:
                transient = exc
            except httpx.InvalidURL as exc:
                raise DownloadError(f"{url}: invalid URL ({exc})") from None
            failures += 1
            self._back_off(url, transient, failures)

    def download(self, url: str, target: Path) -> Downloaded:
        """Fetch ``url`` into ``target``, continuing bytes an earlier attempt left."""
        partial = target.with_name(target.name + ".partial")
        sidecar = target.with_name(target.name + ".partial.json")
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise DownloadError(f"cannot create {target.parent}: {exc.strerror or exc}") from exc
        failures = 0
        while True:
            self._check_cancelled(url)
            before = partial.stat().st_size if partial.exists() else 0
            try:
                result = self._attempt(url, target, partial, sidecar)
            except _Restart as restart:
                self._notify(f"{target.name}: {restart}; starting it over")
                partial.unlink(missing_ok=True)
                sidecar.unlink(missing_ok=True)
                continue
            except _Transient as transient:
                after = partial.stat().st_size if partial.exists() else 0
                failures = 1 if after > before else failures + 1
                self._back_off(url, transient, failures)
                continue
            return result

    def _back_off(self, url: str, transient: _Transient, failures: int) -> None:
        if failures > self.policy.retries:
            raise DownloadError(
                f"{url}: {transient} (gave up after {failures} attempts without progress)"
            )
        delay_s = transient.retry_after_s
        if delay_s is None:
            delay_s = min(self.policy.backoff_s * 2 ** (failures - 1), self.policy.max_backoff_s)
        self._notify(f"{url.rsplit('/', 1)[-1]}: {transient}; retrying in {delay_s:.3g} s")
        self._sleep(delay_s)

    def _attempt(self, url: str, target: Path, partial: Path, sidecar: Path) -> Downloaded:
        kept = _resumable_bytes(url, partial, sidecar)
        validators = _read_sidecar(sidecar) if kept else {}
        headers = {}
        if kept:
            headers["Range"] = f"bytes={kept}-"
            if_range = _if_range(validators)
            assert if_range is not None  # _resumable_bytes needs a validator
            headers["If-Range"] = if_range
        try:
            with self._client.stream("GET", url, headers=headers) as response:
                status = response.status_code
                if status in MISSING_STATUS:
                    raise DownloadError(f"{url}: HTTP {status} (the server has no such file)")
                if status == 416:
                    raise _Restart(f"the server refused to continue at byte {kept}")
                if status in RETRYABLE_STATUS:
                    raise _Transient(f"HTTP {status}", _retry_after_s(response))
                if status >= 400:
                    raise DownloadError(f"{url}: HTTP {status} {response.reason_phrase}")
                etag = response.headers.get("etag")
                last_modified = response.headers.get("last-modified")
                if status == 206:
                    start, total = _content_range(response)
                    total = total if total is not None else validators.get("size_bytes")
                    if start != kept or (etag and validators.get("etag") not in (None, etag)):
                        raise _Restart("the server answered for other bytes or another version")
                else:
                    if kept:
                        self._notify(
                            f"{target.name}: the server sent the whole file (no range support, "
                            f"or it changed); discarding {kept} bytes and starting over"
                        )
                    kept = 0
                    length = response.headers.get("content-length", "")
                    total = int(length) if length.isdigit() else None
                    validators = {
                        "url": url,
                        "etag": etag,
                        "last_modified": last_modified,
                        "size_bytes": total,
                    }
                    write_text_atomic(sidecar, json.dumps(validators) + "\n", DownloadError)
                digest = _hash_prefix(partial, kept)
                received = self._receive(url, response, partial, kept, digest)
        except httpx.TimeoutException as exc:
            raise _Transient(f"timed out ({type(exc).__name__})") from None
        except httpx.TransportError as exc:
            raise _Transient(f"connection failed ({type(exc).__name__}: {exc})") from None
        except httpx.InvalidURL as exc:
            raise DownloadError(f"{url}: invalid URL ({exc})") from None
        size = kept + received
        if total is not None and size != total:
            raise _Transient(f"connection closed at byte {size} of {total}")
        os.replace(partial, target)
        sidecar.unlink(missing_ok=True)
        fsync_directory(target.parent)
        return Downloaded(
            url,
            target,
            size,
            validators.get("etag"),
            validators.get("last_modified"),
            digest.hexdigest(),
            kept,
        )

    def _receive(
        self,
        url: str,
        response: httpx.Response,
        partial: Path,
        kept: int,
        digest: Any,
    ) -> int:
        received = 0
        try:
            with open(partial, "r+b" if kept else "wb") as handle:
                handle.seek(kept)
                handle.truncate(kept)
                try:
                    # Unsized: a sized iterator holds back, and on a drop loses, a partial chunk.
                    for chunk in response.iter_raw():
                        self.disk.write(handle, chunk)
                        digest.update(chunk)
                        received += len(chunk)
                        self._on_bytes(len(chunk))
                        self._check_cancelled(url)
                finally:
                    handle.flush()
                    os.fsync(handle.fileno())
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise DownloadError(
                    f"the disk is full writing {partial} ({kept + received} bytes kept; free "
                    "space and run the same command again to continue)"
                ) from exc
            raise DownloadError(f"cannot write {partial}: {exc.strerror or exc}") from exc
        return received


def _resumable_bytes(url: str, partial: Path, sidecar: Path) -> int:
    """Bytes of ``partial`` a range request may continue (0 if they cannot be validated)."""
    if not partial.exists():
        return 0
    validators = _read_sidecar(sidecar)
    if validators.get("url") != url or _if_range(validators) is None:
        return 0
    size = partial.stat().st_size
    expected = validators.get("size_bytes")
    return size if expected is None or size < expected else 0


def _read_sidecar(sidecar: Path) -> dict:
    try:
        data = json.loads(sidecar.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _if_range(validators: dict) -> str | None:
    """The validator for ``If-Range``: a strong ETag, else the Last-Modified date."""
    etag = validators.get("etag")
    if etag and not etag.startswith("W/"):
        return etag
    return validators.get("last_modified")


def _content_range(response: httpx.Response) -> tuple[int, int | None]:
    """``Content-Range: bytes START-END/TOTAL`` -> (START, TOTAL or None)."""
    value = response.headers.get("content-range", "")
    try:
        unit, _, rest = value.partition(" ")
        span, _, total = rest.partition("/")
        start = int(span.split("-")[0])
        if unit != "bytes":
            raise ValueError(unit)
    except ValueError:
        raise _Restart(f"unreadable Content-Range {value!r}") from None
    return start, int(total) if total.isdigit() else None


def _retry_after_s(response: httpx.Response) -> float | None:
    value = response.headers.get("retry-after")
    if not value:
        return None
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def _hash_prefix(partial: Path, kept: int) -> Any:
    digest = hashlib.sha256()
    if kept:
        with open(partial, "rb") as handle:
            remaining = kept
            while remaining:
                chunk = handle.read(min(HASH_CHUNK_BYTES, remaining))
                if not chunk:
                    raise _Restart("the kept bytes are shorter than recorded")
                digest.update(chunk)
                remaining -= len(chunk)
    return digest
