"""Creating and leaving a launch's process groups, and the gloo collectives of the
scheduler (the intake broadcast, the mlp_sync all-gather, the torchrun results)."""

from __future__ import annotations

import datetime
from collections.abc import Sequence

import torch
import torch.distributed as dist

from engine.model_api.parallel import (
    ParallelState,
    RankGroup,
    get_parallel,
    register_process_groups,
    set_parallel,
)


def init_parallel(
    rank: int,
    tp_size: int,
    attn_dp_size: int,
    device: torch.device,
    init_method: str,
    timeout_s: float,
) -> ParallelState:
    """Create the world, attention-TP and gloo CPU groups; every rank must call it."""
    timeout = datetime.timedelta(seconds=timeout_s)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(
        backend, init_method=init_method, rank=rank, world_size=tp_size, timeout=timeout
    )
    attn_tp_size = tp_size // attn_dp_size
    cpu_group = dist.group.WORLD
    if backend != "gloo":
        cpu_group = dist.new_group(backend="gloo", timeout=timeout)
    attn_tp_group = attn_tp_cpu_group = None
    for dp in range(attn_dp_size):
        ranks = list(range(dp * attn_tp_size, (dp + 1) * attn_tp_size))
        # new_group is collective over the world: every rank creates every group.
        group = dist.new_group(ranks, backend=backend, timeout=timeout)
        cpu = group if backend == "gloo" else dist.new_group(ranks, backend="gloo", timeout=timeout)
        if rank in ranks:
            attn_tp_group, attn_tp_cpu_group = group, cpu
    state = ParallelState(
        rank=rank,
        tp=RankGroup("tp", rank, tp_size),
        attn_tp=RankGroup("attn_tp", rank % attn_tp_size, attn_tp_size),
        attn_dp_rank=rank // attn_tp_size,
        attn_dp_size=attn_dp_size,
        device=device,
    )
    register_process_groups({"tp": dist.group.WORLD, "attn_tp": attn_tp_group})
    _cpu_groups.update(tp=cpu_group, attn_tp=attn_tp_cpu_group)
    set_parallel(state)
    return state


def destroy_parallel() -> None:
    register_process_groups({})
    _cpu_groups.clear()
    set_parallel(None)
    if dist.is_initialized():
        dist.destroy_process_group()


# the gloo groups of this rank's launch ("tp": all ranks, "attn_tp": its attention-TP group)
_cpu_groups: dict[str, object] = {}


def _cpu_group(group: str) -> tuple[object, int, int]:
    """The gloo group, its size and its leader (the source of a broadcast)."""
    s = get_parallel()
    if group == "tp":
        return _cpu_groups.get("tp"), s.tp_size, 0
    if group == "attn_tp":
        return _cpu_groups.get("attn_tp"), s.attn_tp_size, s.rank - s.attn_tp_rank
    raise ValueError(f"'group' must be 'tp' or 'attn_tp' (got {group!r})")


def cpu_all_gather_ints(values: Sequence[int], group: str = "tp") -> list[list[int]]:
    """All-gather a short int vector over the gloo CPU group; one row per rank."""
    pg, size, _ = _cpu_group(group)
    t = torch.tensor(list(values), dtype=torch.int64)
    if size == 1:
        return [t.tolist()]
    out = torch.empty(size * t.numel(), dtype=torch.int64)
    dist.all_gather_into_tensor(out, t, group=pg)
    return out.view(size, -1).tolist()


def broadcast_object(obj: object, group: str = "attn_tp") -> object:
    """The attention-TP leader's `obj` (or global rank 0's, for "tp") on every rank of the
    group, over its gloo CPU group."""
    pg, size, src = _cpu_group(group)
    if size == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src, group=pg)
    return box[0]


def broadcast_ints(values: Sequence[int] | None, n: int, group: str = "attn_tp") -> list[int]:
    """The leader's `n` ints (None elsewhere) on every rank of the group: one collective and
    no pickling, where `broadcast_object` needs two."""
    pg, size, src = _cpu_group(group)
    if size == 1:
        return list(values)
    if values is None:
        t = torch.empty(n, dtype=torch.int64)
    else:
        t = torch.tensor(list(values), dtype=torch.int64)
    dist.broadcast(t, src=src, group=pg)
    return t.tolist()


def gather_object(obj: object) -> list[object] | None:
    """Every rank's `obj` on global rank 0 in rank order (None elsewhere), over gloo."""
    s = get_parallel()
    if s.tp_size == 1:
        return [obj]
    out = [None] * s.tp_size if s.rank == 0 else None
    dist.gather_object(obj, out, dst=0, group=_cpu_groups["tp"])
    return out
