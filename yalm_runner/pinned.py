"""Pinned (page-locked) host memory of exactly the size asked for.

torch's pinned allocator rounds every block up to a power of two so that it can reuse blocks:
a 669 MB layer takes 1 GiB of locked RAM, and the 100B envelope's 80 layers would lock 80 GiB
for 53 GB of weights, more than the user's 64 GiB machine has. Here a buffer is an anonymous
memory map of the exact size, registered with the CUDA driver (``cudaHostRegister``) and
unregistered when the last tensor over it is gone, just before the map itself is unmapped.

Without CUDA a buffer is ordinary memory: there is nothing to pin.
"""

from __future__ import annotations

import mmap
import weakref

import torch

from yalm_runner.errors import OffloadError
from yalm_runner.offload import format_bytes


class _Mapping(mmap.mmap):
    """An anonymous map that can carry a finalizer (a subclass takes weak references; its
    finalizers run before the map is unmapped)."""


_locked = {"bytes": 0}


def locked_bytes() -> int:
    """Bytes this process holds locked through ``pinned_empty`` now."""
    return _locked["bytes"]


def _unregister(address: int, nbytes: int) -> None:
    torch.cuda.cudart().cudaHostUnregister(address)
    _locked["bytes"] -= nbytes


def _failed(result) -> bool:
    return int(getattr(result, "value", result)) != 0


def pinned_empty(
    numel: int, dtype: torch.dtype, *, pin: bool, what: str = "buffer"
) -> torch.Tensor:
    """A 1-D tensor of ``numel`` elements in host memory, page-locked when ``pin``.

    Raises ``OffloadError`` naming ``what`` and the size when the driver refuses to lock it.
    """
    element = torch.empty((), dtype=dtype).element_size()
    nbytes = numel * element
    if not pin or nbytes == 0:
        return torch.empty(numel, dtype=dtype)
    mapping = _Mapping(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    tensor = torch.frombuffer(mapping, dtype=torch.uint8).view(dtype)
    address = tensor.data_ptr()
    result = torch.cuda.cudart().cudaHostRegister(address, nbytes, 0)
    if _failed(result):
        raise OffloadError(
            f"could not lock {format_bytes(nbytes)} of RAM for the {what} ({result}); "
            "lower --cpu-memory or free RAM"
        )
    _locked["bytes"] += nbytes
    # At exit the process's memory goes anyway; unregistering then could outlive CUDA.
    weakref.finalize(mapping, _unregister, address, nbytes).atexit = False
    return tensor
