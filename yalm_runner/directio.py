"""Reading a byte range of a file at the drive's sequential speed, straight into a given buffer.

The disk tier reads every streamed layer once per decode step, far more data than RAM holds, so
the page cache only gets in the way: it copies every byte once more and evicts what the rest of
the machine needs. ``read_range`` opens the file with ``O_DIRECT`` (DMA from the drive into our
pinned buffer) and keeps several large reads in flight from a few threads, which is what an NVMe
drive needs to reach its rated speed. Where ``O_DIRECT`` is refused (tmpfs, some overlays, other
systems) it falls back to plain reads and tells the page cache to drop what was read.

``O_DIRECT`` wants the file offset, the length and the buffer address aligned to the device's
block size; ``read_range`` reads the aligned span around the range into an aligned spot of the
buffer and returns the view where the asked-for bytes landed.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import torch

from yalm_runner.errors import CheckpointError

BLOCK = 4096  # covers 512-byte and 4 KiB logical blocks
CHUNK = 8 << 20  # bytes per read call: large enough for the drive, small enough to spread
# Extra buffer bytes ``read_range`` may need: up to a block to align the buffer's address, and
# up to a block at each end of the range to align the file span.
SLACK = 3 * BLOCK


def aligned_offset(buffer: torch.Tensor) -> int:
    """Bytes from the start of ``buffer`` to its first ``BLOCK``-aligned address."""
    return -buffer.data_ptr() % BLOCK


class RangeReader:
    """Reads byte ranges of files into uint8 CPU buffers, directly when the OS allows it."""

    def __init__(self, threads: int = 4, direct: bool = True):
        self.direct = direct and hasattr(os, "O_DIRECT")
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="yalm-read")
        self.bytes_read = 0

    def close(self) -> None:
        self._pool.shutdown(wait=True)

    def read_range(self, path: os.PathLike, offset: int, length: int, buffer: torch.Tensor):
        """Read ``length`` bytes of ``path`` from ``offset`` into ``buffer``; return their view.

        ``buffer`` (uint8, CPU, pinned or not) needs ``length + SLACK`` bytes.
        """
        if buffer.dtype != torch.uint8 or buffer.numel() < length + SLACK:
            raise ValueError(f"buffer too small for {length} bytes of {path}")
        start = offset - offset % BLOCK
        end = -(-(offset + length) // BLOCK) * BLOCK
        base = aligned_offset(buffer)
        span = buffer[base : base + (end - start)]
        assert span.numel() == end - start, "SLACK covers every alignment"
        target = memoryview(span.numpy()).cast("B")
        descriptor = self._open(path)
        try:
            size = os.fstat(descriptor).st_size
            if offset + length > size:
                raise CheckpointError(
                    f"{path}: truncated file (ended {offset + length - size} bytes early)"
                )
            chunks = [(at, min(at + CHUNK, end)) for at in range(start, end, CHUNK)]
            reads = [
                self._pool.submit(self._read_chunk, descriptor, target, at - start, at, stop, size)
                for at, stop in chunks
            ]
            for read in reads:
                read.result()
            if not self.direct:
                os.posix_fadvise(descriptor, start, end - start, os.POSIX_FADV_DONTNEED)
        except OSError as exc:
            raise CheckpointError(f"cannot read {path}: {exc.strerror or exc}") from exc
        finally:
            os.close(descriptor)
        self.bytes_read += length
        first = base + offset - start
        return buffer[first : first + length]

    def _open(self, path: os.PathLike) -> int:
        if self.direct:
            try:
                return os.open(path, os.O_RDONLY | os.O_DIRECT)
            except OSError:
                self.direct = False  # this filesystem refuses it: plain reads from now on
        try:
            return os.open(path, os.O_RDONLY)
        except OSError as exc:
            raise CheckpointError(f"cannot read {path}: {exc.strerror or exc}") from exc

    @staticmethod
    def _read_chunk(
        descriptor: int, target: memoryview, into: int, at: int, stop: int, size: int
    ) -> None:
        # The last aligned block may run past the end of the file: a short read there is fine.
        want = min(stop, -(-size // BLOCK) * BLOCK) - at
        done = 0
        while done < want:
            count = os.preadv(descriptor, [target[into + done : into + want]], at + done)
            if count == 0:
                if at + done >= size:
                    return
                raise OSError(0, f"read ended at byte {at + done} of {size}")
            done += count
