"""The per-step batch info that attention-DP groups exchange under the plan's mlp_sync
(SGLang's prepare_mlp_sync_batch): one short int vector per rank over the gloo CPU group."""

from __future__ import annotations

import attrs
from attrs import frozen

from engine.runtime.process_groups import cpu_all_gather_ints


@frozen
class StepInfo:
    """What one attention-DP group says of its next step."""

    num_tokens: int  # real tokens of its step (0 without a batch)
    can_run_graph: bool  # a decode (or idle) step within the capture sizes
    is_extend: bool
    has_work: bool  # it has a batch this step
    idle_after: bool  # barring new requests, it has nothing left once this step ran
    seen: int  # submissions its leader has been told of (every submission reaches all)

    def encode(self) -> list[int]:
        return [int(getattr(self, f.name)) for f in attrs.fields(StepInfo)]

    @classmethod
    def decode(cls, row: list[int]) -> StepInfo:
        fields = attrs.fields(StepInfo)
        if len(row) != len(fields):
            raise ValueError(f"a step info has {len(fields)} ints (got {len(row)})")
        return cls(*(bool(v) if f.type == "bool" else int(v) for f, v in zip(fields, row)))


def exchange(mine: StepInfo, attn_tp_size: int) -> list[StepInfo]:
    """Every attention-DP group's info, in group order (one all-gather over "tp"; the ranks
    of a group schedule alike, so its leader's row speaks for it)."""
    rows = cpu_all_gather_ints(mine.encode(), "tp")
    return [StepInfo.decode(row) for row in rows[::attn_tp_size]]


def all_quiet(infos: list[StepInfo]) -> bool:
    """Every group is idle after this step and all were told of the same submissions: no
    more syncs until a leader is told of a new one (which every other leader is told of too)."""
    return all(i.idle_after for i in infos) and len({i.seen for i in infos}) == 1
