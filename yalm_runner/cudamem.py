"""The CUDA caching allocator's one setting that the memory plan relies on: expandable segments.

The planner counts bytes: weights, KV slots, staging, activations. PyTorch's default allocator
reserves fixed-size segments and splits them, so after a few batches of different shapes the
memory it holds but cannot hand out (a 680 MiB request failing with 784 MiB "reserved but
unallocated", as the 8-bit-KV plan once did under an 8 GiB cap) is charged against the cap too,
and a plan that fits on paper runs out of memory. With expandable segments the allocator maps
physical pages into one growing virtual range instead, so what it reserves stays within a page
of what is allocated, and the plan's bytes are the bytes that count.

It knows nothing of plans or models; callers that put weights on a GPU call ``configure`` first.
A user's own ``PYTORCH_CUDA_ALLOC_CONF`` wins: it is left alone.
"""

from __future__ import annotations

import os

import torch

ALLOC_CONF_VAR = "PYTORCH_CUDA_ALLOC_CONF"
SETTING = "expandable_segments:True"

_configured = False


def configure() -> bool:
    """Turn on expandable segments unless the user configured the allocator; True if on.

    Best called before the first CUDA allocation of the process (segments reserved earlier
    keep their old kind); calling it again is free.
    """
    global _configured
    user = os.environ.get(ALLOC_CONF_VAR)
    if user is not None:
        return "expandable_segments:true" in user.replace(" ", "").lower()
    if not _configured and torch.cuda.is_available():
        setter = getattr(torch._C, "_accelerator_setAllocatorSettings", None)
        (setter or torch.cuda.memory._set_allocator_settings)(SETTING)
        _configured = True
    return _configured
