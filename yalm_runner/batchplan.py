"""What a generation job records of its batches, so that a re-run can replay them exactly.

Owns the ``BatchPlan`` (each batch's rows in order with the ids each starts from, the arithmetic
they ran under, the session's sizing) and its JSON form, ``Sizing``, the words for what changed
between two arithmetic records (``arithmetic_changes``), and whether a saved KV checkpoint can be
a planned batch's (``restore_fits``). The job (``generation``) makes and replays plans; the
sinks keep them (``kvstate``). It knows nothing of files, engines or sinks.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from yalm_runner.batchstate import BatchRestore


@dataclass(frozen=True)
class Sizing:
    """What a session is sized for: the longest prompt plus new tokens, the longest prefill,
    and how many rows there are (the planner's batch and groups depend on these alone)."""

    max_context: int
    prompt_tokens: int
    rows: int


@dataclass(frozen=True)
class BatchPlan:
    """A job's batches as recorded before its first one ran: each batch's rows in order with
    the ids each starts from (none, unless the row itself went on from saved ids), the
    arithmetic they ran under and the session's sizing. A re-run under the same arithmetic
    replays it batch for batch. A batch whose rows were all done when a re-run recorded the
    plan again is kept as an empty place (batches are named by their place)."""

    arithmetic: Mapping[str, Any]
    sizing: Sizing
    batches: tuple[tuple[tuple[str, tuple[int, ...]], ...], ...]

    def to_dict(self) -> dict[str, Any]:
        return {
            "arithmetic": dict(self.arithmetic),
            "sizing": [self.sizing.max_context, self.sizing.prompt_tokens, self.sizing.rows],
            "batches": [[[key, list(start)] for key, start in batch] for batch in self.batches],
        }

    @classmethod
    def from_dict(cls, data: Any) -> BatchPlan:
        """The plan ``to_dict`` wrote; ``ValueError`` if ``data`` is not one."""
        try:
            arithmetic = dict(data["arithmetic"])
            sizing = Sizing(*(int(value) for value in data["sizing"]))
            batches = tuple(
                tuple((str(key), tuple(int(token) for token in start)) for key, start in batch)
                for batch in data["batches"]
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"not a batch plan ({exc})") from None
        return cls(arithmetic, sizing, batches)


def arithmetic_changes(saved: Mapping[str, Any], now: Mapping[str, Any]) -> list[str]:
    """What differs between two ``arithmetic`` records, in words (``batch size 8 -> 4``)."""
    return [
        f"{name} {saved.get(name, 'unknown')} -> {now.get(name, 'unknown')}"
        for name in dict.fromkeys([*saved, *now])
        if saved.get(name) != now.get(name)
    ]


def restore_fits(requests: tuple[Any, ...], restore: BatchRestore) -> bool:
    """Whether a saved checkpoint can be this planned batch's (``requests``: its
    ``engine.Request``s in order): its rows are the batch's, in order, and each row's ids extend
    its start by the decode steps its ``length`` implies."""
    prompt_len = max(len(r.prompt_ids) + len(r.generated) for r in requests)
    rows = restore.rows
    if not rows or list(rows) != sorted(set(rows)) or rows[-1] >= len(requests):
        return False
    if len(restore.generated) != len(rows):
        return False
    for row, ids in zip(rows, restore.generated, strict=True):
        start = requests[row].generated
        if ids[: len(start)] != start or len(ids) - len(start) != restore.length - prompt_len + 1:
            return False
        if len(ids) >= requests[row].max_new_tokens:  # such a row had finished
            return False
    return True
