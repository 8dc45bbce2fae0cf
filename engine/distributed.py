"""Process groups of one launch and the collectives the layers use.

Rank layout follows SGLang: attention-DP major, attention-TP fastest, so the
attention-TP group of rank r is the consecutive block containing r.
"""

from __future__ import annotations

import datetime
from collections.abc import Sequence

import attrs
import torch
import torch.distributed as dist


@attrs.frozen
class ParallelState:
    rank: int
    tp_size: int
    attn_tp_rank: int
    attn_tp_size: int
    attn_dp_rank: int
    attn_dp_size: int
    device: torch.device
    tp_group: object = None
    attn_tp_group: object = None
    cpu_group: object = None
    attn_tp_cpu_group: object = None

    @property
    def is_attn_tp_leader(self) -> bool:
        return self.attn_tp_rank == 0


_state: ParallelState | None = None


def set_parallel(state: ParallelState) -> None:
    global _state
    _state = state


def get_parallel() -> ParallelState:
    if _state is None:
        set_parallel(single_process_state(torch.device("cpu")))
    return _state


def single_process_state(device: torch.device) -> ParallelState:
    return ParallelState(0, 1, 0, 1, 0, 1, device)


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
        tp_size=tp_size,
        attn_tp_rank=rank % attn_tp_size,
        attn_tp_size=attn_tp_size,
        attn_dp_rank=rank // attn_tp_size,
        attn_dp_size=attn_dp_size,
        device=device,
        tp_group=dist.group.WORLD,
        attn_tp_group=attn_tp_group,
        cpu_group=cpu_group,
        attn_tp_cpu_group=attn_tp_cpu_group,
    )
    set_parallel(state)
    return state


def destroy_parallel() -> None:
    global _state
    if dist.is_initialized():
        dist.destroy_process_group()
    _state = None


def _group(name: str) -> tuple[object, int]:
    s = get_parallel()
    if name == "tp":
        return s.tp_group, s.tp_size
    if name == "attn_tp":
        return s.attn_tp_group, s.attn_tp_size
    raise ValueError(f"'group' must be 'tp' or 'attn_tp' (got {name!r})")


def all_reduce(x: torch.Tensor, group: str = "tp") -> torch.Tensor:
    pg, size = _group(group)
    if size > 1:
        dist.all_reduce(x, group=pg)
    return x


def all_gather(x: torch.Tensor, group: str = "tp", out: torch.Tensor | None = None) -> torch.Tensor:
    """Concatenate equal-sized shards along dim 0, in rank order (into `out` when given:
    a contiguous tensor of exactly the result's shape, e.g. the gathered buffer)."""
    pg, size = _group(group)
    if size == 1 and out is None:
        return x
    if out is None:
        out = x.new_empty((size * x.shape[0], *x.shape[1:]))
    if size == 1:
        return out.copy_(x)
    dist.all_gather_into_tensor(out, x.contiguous(), group=pg)
    return out


def all_gather_uneven(
    x: torch.Tensor, sizes: Sequence[int], group: str = "tp", out: torch.Tensor | None = None
) -> torch.Tensor:
    """Concatenate shards of the given row counts (into `out` when given); pads only inside
    the transfer."""
    pg, size = _group(group)
    if size == 1 and out is None:
        return x
    most = max(sizes)
    padded = x.new_zeros((most, *x.shape[1:]))
    padded[: x.shape[0]] = x
    stacked = all_gather(padded, group).view(size, most, *x.shape[1:])
    if out is None:
        return torch.cat([stacked[i, :n] for i, n in enumerate(sizes)])
    return torch.cat([stacked[i, :n] for i, n in enumerate(sizes)], out=out)


def all_gather_last_dim(x: torch.Tensor, group: str = "tp") -> torch.Tensor:
    """Concatenate shards along the last dim (vocab-parallel logits)."""
    pg, size = _group(group)
    if size == 1:
        return x
    stacked = all_gather(x.movedim(-1, 0).contiguous(), group)
    return stacked.movedim(0, -1).contiguous()


def reduce_scatter(x: torch.Tensor, group: str = "tp") -> torch.Tensor:
    """Sum over ranks, then keep this rank's equal share of dim 0."""
    pg, size = _group(group)
    if size == 1:
        return x
    if x.shape[0] % size:
        raise ValueError(f"'rows' must be a multiple of {size} (got {x.shape[0]})")
    out = x.new_empty((x.shape[0] // size, *x.shape[1:]))
    dist.reduce_scatter_tensor(out, x.contiguous(), group=pg)
    return out


def all_to_all(
    x: torch.Tensor, out_splits: Sequence[int], in_splits: Sequence[int], group: str = "tp"
) -> torch.Tensor:
    pg, size = _group(group)
    if size == 1:
        return x
    out = x.new_empty((sum(out_splits), *x.shape[1:]))
    dist.all_to_all_single(out, x.contiguous(), list(out_splits), list(in_splits), group=pg)
    return out


def _cpu_group(group: str) -> tuple[object, int, int]:
    """The gloo group, its size and its leader (the source of a broadcast)."""
    s = get_parallel()
    if group == "tp":
        return s.cpu_group, s.tp_size, 0
    return s.attn_tp_cpu_group, s.attn_tp_size, s.rank - s.attn_tp_rank


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
    dist.gather_object(obj, out, dst=0, group=s.cpu_group)
    return out
