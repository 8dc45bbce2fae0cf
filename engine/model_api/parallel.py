"""The parallel layout a rank runs in, and the tensor collectives the layers use.

Rank layout follows SGLang: attention-DP major, attention-TP fastest, so the attention-TP
group of rank r is the consecutive block containing r. A layer is built with the groups it
shards over (`ParallelState.tp`, `ParallelState.attn_tp`) and calls the collectives below
on them; a group of one rank makes every collective a no-op.

A `RankGroup` says where a rank sits; the process group it names is looked up when a
collective runs (`register_process_groups`, by the rank's runtime), so a model never keeps a
process group alive past the launch's teardown.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist
from attrs import frozen


@frozen
class RankGroup:
    """One process group as a layer sees it: its name, this rank's index and its size."""

    name: str  # "tp" or "attn_tp"
    rank: int
    size: int

    @classmethod
    def single(cls, name: str) -> RankGroup:
        return cls(name, 0, 1)


@frozen
class ParallelState:
    """Where this rank sits: the TP group (the world of one launch), its attention-TP
    group and its attention-DP group index."""

    rank: int
    tp: RankGroup
    attn_tp: RankGroup
    attn_dp_rank: int
    attn_dp_size: int
    device: torch.device

    @classmethod
    def single(cls, device: torch.device | str = "cpu") -> ParallelState:
        """One process, one rank: what an in-process model (a test, a benchmark) runs in."""
        return cls(
            0, RankGroup.single("tp"), RankGroup.single("attn_tp"), 0, 1, torch.device(device)
        )

    @property
    def tp_size(self) -> int:
        return self.tp.size

    @property
    def attn_tp_rank(self) -> int:
        return self.attn_tp.rank

    @property
    def attn_tp_size(self) -> int:
        return self.attn_tp.size

    @property
    def is_attn_tp_leader(self) -> bool:
        return self.attn_tp.rank == 0


_state: ParallelState | None = None


def set_parallel(state: ParallelState | None) -> None:
    """Make `state` this process's parallel state (None forgets it)."""
    global _state
    _state = state


def get_parallel() -> ParallelState:
    """This process's parallel state; raises when no launch (or test) has set one."""
    if _state is None:
        raise RuntimeError(
            "no parallel state in this process: a rank sets it in init_parallel, an "
            "in-process model with set_parallel(ParallelState.single(device))"
        )
    return _state


_process_groups: dict[str, object] = {}


def register_process_groups(groups: dict[str, object]) -> None:
    """The torch.distributed groups behind this rank's group names (empty: none)."""
    _process_groups.clear()
    _process_groups.update(groups)


def _pg(group: RankGroup) -> object:
    try:
        return _process_groups[group.name]
    except KeyError:
        raise RuntimeError(
            f"no process group {group.name!r} in this process (a {group.size}-rank group "
            "needs a launch's ranks)"
        ) from None


def all_reduce(x: torch.Tensor, group: RankGroup) -> torch.Tensor:
    if group.size > 1:
        dist.all_reduce(x, group=_pg(group))
    return x


def all_gather(x: torch.Tensor, group: RankGroup, out: torch.Tensor | None = None) -> torch.Tensor:
    """Concatenate equal-sized shards along dim 0, in rank order (into `out` when given:
    a contiguous tensor of exactly the result's shape, e.g. the gathered buffer)."""
    if group.size == 1 and out is None:
        return x
    if out is None:
        out = x.new_empty((group.size * x.shape[0], *x.shape[1:]))
    if group.size == 1:
        return out.copy_(x)
    dist.all_gather_into_tensor(out, x.contiguous(), group=_pg(group))
    return out


def all_gather_uneven(
    x: torch.Tensor, sizes: Sequence[int], group: RankGroup, out: torch.Tensor | None = None
) -> torch.Tensor:
    """Concatenate shards of the given row counts (into `out` when given); pads only inside
    the transfer."""
    if group.size == 1 and out is None:
        return x
    most = max(sizes)
    padded = x.new_zeros((most, *x.shape[1:]))
    padded[: x.shape[0]] = x
    stacked = all_gather(padded, group).view(group.size, most, *x.shape[1:])
    parts = [stacked[i, :n] for i, n in enumerate(sizes)]
    return torch.cat(parts) if out is None else torch.cat(parts, out=out)


def all_gather_last_dim(x: torch.Tensor, group: RankGroup) -> torch.Tensor:
    """Concatenate shards along the last dim (vocab-parallel logits)."""
    if group.size == 1:
        return x
    stacked = all_gather(x.movedim(-1, 0).contiguous(), group)
    return stacked.movedim(0, -1).contiguous()


def reduce_scatter(x: torch.Tensor, group: RankGroup) -> torch.Tensor:
    """Sum over ranks, then keep this rank's equal share of dim 0."""
    if group.size == 1:
        return x
    if x.shape[0] % group.size:
        raise ValueError(f"'rows' must be a multiple of {group.size} (got {x.shape[0]})")
    out = x.new_empty((x.shape[0] // group.size, *x.shape[1:]))
    dist.reduce_scatter_tensor(out, x.contiguous(), group=_pg(group))
    return out


def all_to_all(
    x: torch.Tensor, out_splits: Sequence[int], in_splits: Sequence[int], group: RankGroup
) -> torch.Tensor:
    if group.size == 1:
        return x
    out = x.new_empty((sum(out_splits), *x.shape[1:]))
    dist.all_to_all_single(out, x.contiguous(), list(out_splits), list(in_splits), group=_pg(group))
    return out


def split_bounds(rows: int, parts: int, index: int) -> tuple[int, int]:
    """Rows [start, end) of part `index` when `rows` are split as evenly as possible."""
    return rows * index // parts, rows * (index + 1) // parts


def shard_sizes(n: int, parts: int) -> list[int]:
    """Rows of each of `parts` ranks when `n` rows are split as evenly as possible."""
    return [n // parts + (i < n % parts) for i in range(parts)]


def token_shard(num_tokens: int, p: ParallelState) -> tuple[int, list[int]]:
    """A model's own split of its group's `num_tokens` rows over attention-TP: where this
    rank's rows start, and every attention-TP rank's count (this one's at `attn_tp_rank`)."""
    sizes = shard_sizes(num_tokens, p.attn_tp_size)
    return sum(sizes[: p.attn_tp_rank]), sizes


def dp_group_shard(rows: int, group_rows: list[int], p: ParallelState) -> tuple[slice, list[int]]:
    """This attention-TP rank's slice of its attention-DP group's `rows` rows, and the counts
    of an all-gather over "tp" of every rank's slice: each group's rows once, in group order.
    `group_rows` is every group's padded rows (`ForwardBatch.global_num_tokens`)."""
    if rows != group_rows[p.attn_dp_rank]:
        raise ValueError(
            f"{rows} rows, but global_num_tokens gives this attention-DP group "
            f"{group_rows[p.attn_dp_rank]}"
        )
    start, local = token_shard(rows, p)
    sizes = [s for n in group_rows for s in shard_sizes(n, p.attn_tp_size)]
    return slice(start, start + local[p.attn_tp_rank]), sizes
