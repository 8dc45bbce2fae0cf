"""The MoE layer: a replicated gate, a model-defined router, and the routed experts.

Expert backends (``--moe-a2a-backend``, from the `ModelContext` the model is built with):

- ``none``: every rank holds every expert with its intermediate dim sharded over the "tp"
  group; each rank runs all its rows through its shards and the output is a partial sum
  (`partial` is True) that the layer communicator reduces.
- ``all2all``: experts are partitioned over the "tp" group (E / tp_size contiguous experts
  per rank, whole). Each rank sends every (row, expert) pair of its valid rows to the rank
  that owns the expert with `all_to_all`, the owners compute, the results come back and are
  summed per row with the routing weights: the output is complete for this rank's rows.
  Every rank joins the collectives, with zero rows on an idle batch, so the calls match
  across the group. Two ways to exchange the pairs, chosen per call from `max_rows`, a
  bound on any rank's rows that every rank of the group computes alike
  (`ForwardBatch.max_rows_per_rank`), so that all ranks take the same one:

  - fixed capacity (`max_rows * top_k * tp_size <= FIXED_CAPACITY_MAX_SLOTS`, decode-sized
    steps): every rank sends C = `max_rows * top_k` slots to every rank, each pair in its
    owner's block at its index among the pairs with that owner, empty slots with expert
    id -1. Splits are equal and every index is computed on the device: no host sync, so a
    CUDA graph can capture it.
  - variable split (otherwise, or without `max_rows`): only the valid pairs travel; the
    per-destination counts are exchanged and read on the host for the split sizes.
    Padding pairs (ids -1) are never sent.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from engine.model_api.contract import ModelContext
from engine.model_api.parallel import RankGroup, all_to_all
from engine.model_api.weights import CheckpointError, WeightSource
from models.layers.fused_moe import fused_experts
from models.layers.linear import ReplicatedLinear, divide

BACKENDS = ("none", "all2all")
# (rows' float32 gate logits, num_valid) -> (topk_weights, topk_ids); see models.layers.router
Route = Callable[[torch.Tensor, int | None], tuple[torch.Tensor, torch.Tensor]]

# Largest exchange (tp_size * C slots, C = max_rows * top_k) that takes the fixed-capacity
# all-to-all: covers decode steps up to the usual capture sizes (top-8 over 8 ranks: 64
# rows per rank), while prefill keeps the variable split, which sends only the real pairs.
FIXED_CAPACITY_MAX_SLOTS = 4096


class FusedMoE(nn.Module):
    """The routed experts of one layer: `w13` [E_local, 2 * I_local, H] (gate rows over up
    rows) and `w2` [E_local, H, I_local], as `fused_experts` takes them; `swiglu_limit`
    clamps every expert's gate and up (see `fused_experts`)."""

    max_fixed_slots = FIXED_CAPACITY_MAX_SLOTS  # per layer, so that a test can lower it

    def __init__(
        self,
        num_experts: int,
        hidden_size: int,
        intermediate_size: int,
        backend: str,
        tp: RankGroup,
        swiglu_limit: float | None = None,
    ) -> None:
        super().__init__()
        if backend not in BACKENDS:
            raise ValueError(f"'backend' must be one of {BACKENDS} (got {backend!r})")
        self.backend = backend
        self.swiglu_limit = swiglu_limit
        self.tp = tp
        self.tp_rank, self.tp_size = tp.rank, tp.size
        self.num_experts = num_experts
        if self.backend == "all2all":
            self.local_experts = divide(num_experts, self.tp_size, "the number of routed experts")
            self.inter = intermediate_size
        else:
            self.local_experts = num_experts
            self.inter = divide(intermediate_size, self.tp_size, "moe_intermediate_size")
        self.first_expert = self.tp_rank * self.local_experts if self.backend == "all2all" else 0
        self.partial = self.backend == "none" and self.tp_size > 1
        e, i = self.local_experts, self.inter
        self.w13 = nn.Parameter(torch.empty(e, 2 * i, hidden_size), requires_grad=False)
        self.w2 = nn.Parameter(torch.empty(e, hidden_size, i), requires_grad=False)
        self.w13.weight_loader = self.w2.weight_loader = self.weight_loader

    def weight_loader(
        self, param: nn.Parameter, source: WeightSource, expert: int, proj: str
    ) -> None:
        """Place checkpoint tensor `experts.{expert}.{proj}.weight`; other ranks' experts
        (all2all) are skipped."""
        if not 0 <= expert < self.num_experts:
            raise CheckpointError(f"expert {expert} of {proj}: the layer has {self.num_experts}")
        local = expert - self.first_expert
        if not 0 <= local < self.local_experts:
            return
        i = self.inter
        # backend none: this rank's slice of the intermediate dim; all2all: whole (i = I)
        start = 0 if self.backend == "all2all" else self.tp_rank * i
        if proj == "down_proj":
            param.data[local].copy_(source.narrow(1, start, i))
        else:
            offset = 0 if proj == "gate_proj" else i
            param.data[local, offset : offset + i].copy_(source.narrow(0, start, i))

    def forward(
        self,
        hidden: torch.Tensor,
        topk_weights: torch.Tensor,
        topk_ids: torch.Tensor,
        max_rows: int | None = None,
    ) -> torch.Tensor:
        """`max_rows` (all2all): a bound on the rows of every rank of the "tp" group in this
        call, the same on all of them; it picks the exchange (None: variable split)."""
        if self.backend == "all2all" and self.tp_size > 1:
            capacity = self.fixed_capacity(max_rows, topk_ids.shape[1])
            if capacity is None:
                return self._variable_split(hidden, topk_weights, topk_ids)
            if hidden.shape[0] > max_rows:
                raise ValueError(f"{hidden.shape[0]} rows, more than max_rows={max_rows}")
            return self._fixed_capacity(hidden, topk_weights, topk_ids, capacity)
        return self._experts(hidden, topk_weights, topk_ids)

    def _experts(self, hidden: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor):
        return fused_experts(hidden, self.w13, self.w2, weights, ids, self.swiglu_limit)

    def fixed_capacity(self, max_rows: int | None, top_k: int) -> int | None:
        """Slots C each rank sends to each rank on the fixed-capacity path, or None for the
        variable split. From static numbers only, so every rank (and a CUDA graph's capture
        and its replays) decides alike."""
        if max_rows is None:
            return None
        capacity = max_rows * top_k
        return capacity if capacity * self.tp_size <= self.max_fixed_slots else None

    def _fixed_capacity(
        self,
        hidden: torch.Tensor,
        topk_weights: torch.Tensor,
        topk_ids: torch.Tensor,
        capacity: int,
    ) -> torch.Tensor:
        """All-to-all with equal splits of `capacity` slots, without a host sync: pair
        (row, k) goes to slot `owner * capacity + index among the pairs with that owner`;
        invalid pairs (-1) to a trash slot that is not sent."""
        tp, c = self.tp_size, capacity
        t, top_k = topk_ids.shape
        h = hidden.shape[1]
        if c == 0:  # no rank of the group has a row (max_rows is the same everywhere)
            return hidden.new_zeros(hidden.shape)
        dev = hidden.device
        ids = topk_ids.reshape(-1).long()
        valid = (ids >= 0) & (ids < self.num_experts)
        owner = torch.where(valid, ids // self.local_experts, tp)  # tp: nobody
        onehot = (owner.unsqueeze(1) == torch.arange(tp + 1, device=dev)).long()
        index = (onehot.cumsum(0) * onehot).sum(1) - 1  # among earlier pairs, same owner
        slot = torch.where(valid, owner * c + index, tp * c)
        local = torch.where(valid, ids - owner * self.local_experts, -1)
        # one message: the pair's row, then its local expert id's bytes in the same dtype
        id_dtype = torch.int32 if hidden.element_size() <= 4 else torch.int64
        pair_rows = torch.cat(
            [
                hidden.unsqueeze(1).expand(t, top_k, h).reshape(t * top_k, h),
                _bits_as(local.to(id_dtype), hidden.dtype),
            ],
            dim=1,
        )
        send = hidden.new_zeros(tp * c + 1, pair_rows.shape[1])
        empty = torch.full((1,), -1, dtype=id_dtype, device=dev)
        send[:, h:] = _bits_as(empty, hidden.dtype)
        send.index_copy_(0, slot, pair_rows)
        splits = [c] * tp
        recv = all_to_all(send[: tp * c], splits, splits, self.tp)
        x = recv[:, :h].contiguous()
        recv_ids = recv[:, h:].contiguous().view(id_dtype).reshape(tp * c, 1).long()
        ones = torch.ones(tp * c, 1, dtype=torch.float32, device=dev)
        y = self._experts(x, ones, recv_ids)
        back = all_to_all(y, splits, splits, self.tp)
        picked = back.index_select(0, slot.clamp(max=tp * c - 1)).float()
        weights = topk_weights.reshape(-1, 1).float()
        out = torch.where(valid.unsqueeze(1), picked * weights, 0.0)
        return out.view(t, top_k, h).sum(1).to(hidden.dtype)

    def _variable_split(
        self, hidden: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor
    ) -> torch.Tensor:
        """All-to-all of the valid pairs only; the split sizes are read on the host."""
        top_k = topk_ids.shape[1]
        ids = topk_ids.reshape(-1)
        pairs = torch.nonzero(ids >= 0).squeeze(1)
        owner = ids[pairs] // self.local_experts
        order = torch.argsort(owner, stable=True)
        pairs, owner = pairs[order], owner[order]
        send = torch.bincount(owner, minlength=self.tp_size)
        # how many pairs each rank sends here, so both sides know the split sizes
        recv = all_to_all(send, [1] * self.tp_size, [1] * self.tp_size, self.tp)
        send_splits, recv_splits = send.tolist(), recv.tolist()
        rows = pairs // top_k
        x = all_to_all(hidden[rows], recv_splits, send_splits, self.tp)
        local_ids = all_to_all(
            ids[pairs] - owner * self.local_experts, recv_splits, send_splits, self.tp
        )
        ones = torch.ones(x.shape[0], 1, dtype=torch.float32, device=x.device)
        y = self._experts(x, ones, local_ids.unsqueeze(1))
        back = all_to_all(y, send_splits, recv_splits, self.tp)
        weights = topk_weights.reshape(-1)[pairs].unsqueeze(1)
        out = torch.zeros(hidden.shape, dtype=torch.float32, device=hidden.device)
        out.index_add_(0, rows, back.float() * weights.float())
        return out.to(hidden.dtype)


def _bits_as(ints: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[n] integers (4 or 8 bytes, at least `dtype`'s size) as [n, w] columns of `dtype`,
    the same bytes (a view: no arithmetic, so every value, -1 included, survives a copy)."""
    width = ints.element_size() // dtype.itemsize
    return ints.contiguous().view(dtype).view(ints.shape[0], width)


class MoE(nn.Module):
    """gate -> route -> experts (+ shared experts): parameters `gate.weight`, `experts.w13`,
    `experts.w2` and, when given, `shared_experts.*`.

    `route` is the model's routing (see `models.layers.router`), called on the gate's
    logits (float32 when `logits_fp32`, as DeepSeek-V3 computes them; else in the
    activations' dtype, as Qwen3-MoE does). The expert backend and the group the experts
    are split over come from `ctx`; `swiglu_limit` clamps the routed experts (the shared
    ones clamp themselves: ``GatedMLP(..., swiglu_limit=...)``). `shared_experts` must
    produce the same kind of output as the experts: TP-sharded partial sums for backend
    none, complete rows (replicated, e.g. ``GatedMLP(..., replicated=True)``) for all2all.
    """

    def __init__(
        self,
        hidden_size: int,
        num_experts: int,
        intermediate_size: int,
        route: Route,
        ctx: ModelContext,
        shared_experts: nn.Module | None = None,
        logits_fp32: bool = False,
        swiglu_limit: float | None = None,
    ) -> None:
        super().__init__()
        self.gate = ReplicatedLinear(hidden_size, num_experts)
        self.route = route
        self.logits_fp32 = logits_fp32
        self.experts = FusedMoE(
            num_experts,
            hidden_size,
            intermediate_size,
            ctx.moe.a2a_backend,
            ctx.parallel.tp,
            swiglu_limit,
        )
        self.partial = self.experts.partial
        self.shared_experts = shared_experts
        if shared_experts is not None and getattr(shared_experts, "partial", False) != self.partial:
            raise ValueError(
                f"shared experts must match the routed experts' output (partial sums: "
                f"{self.partial}) for moe_a2a_backend={self.experts.backend!r}"
            )

    def router_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.logits_fp32:
            return F.linear(hidden.float(), self.gate.weight.float())
        return self.gate(hidden)

    def forward(
        self,
        hidden: torch.Tensor,
        num_valid: int | torch.Tensor | None = None,
        max_rows: int | None = None,
    ) -> torch.Tensor:
        """Rows >= `num_valid` are padding and route nowhere; output partial iff `partial`.
        `max_rows`: see `FusedMoE.forward` (`batch.max_rows_per_rank` in a model)."""
        topk_weights, topk_ids = self.route(self.router_logits(hidden), num_valid)
        out = self.experts(hidden, topk_weights, topk_ids, max_rows)
        if self.shared_experts is not None:
            out = out + self.shared_experts(hidden)
        return out
