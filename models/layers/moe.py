"""The MoE layer: a replicated gate, a model-defined router, and the routed experts.

Expert backends (``--moe-a2a-backend``, read from `engine.communicator.moe_settings()`
when the layer is built):

- ``none``: every rank holds every expert with its intermediate dim sharded over the "tp"
  group; each rank runs all its rows through its shards and the output is a partial sum
  (`partial` is True) that the layer communicator reduces.
- ``all2all``: experts are partitioned over the "tp" group (E / tp_size contiguous experts
  per rank, whole). Each rank sends every (row, expert) pair of its valid rows to the rank
  that owns the expert with `all_to_all`, the owners compute, the results come back and are
  summed per row with the routing weights: the output is complete for this rank's rows.
  Padding rows (ids -1) are never sent. Every rank joins the collectives, with zero rows
  on an idle batch, so the calls match across the group.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from engine.communicator import moe_settings
from engine.distributed import all_to_all
from engine.loader import CheckpointError, Weights, WeightSource, load_params
from models.layers.fused_moe import fused_experts
from models.layers.linear import ReplicatedLinear, divide, group_rank_size
from models.layers.mlp import gated_mlp_shapes

BACKENDS = ("none", "all2all")
# (rows' float32 gate logits, num_valid) -> (topk_weights, topk_ids); see models.layers.router
Route = Callable[[torch.Tensor, int | None], tuple[torch.Tensor, torch.Tensor]]

EXPERT_WEIGHT = re.compile(
    r"^(?P<prefix>.+\.experts)\.(?P<expert>\d+)\.(?P<proj>gate_proj|up_proj|down_proj)\.weight$"
)


class FusedMoE(nn.Module):
    """The routed experts of one layer: `w13` [E_local, 2 * I_local, H] (gate rows over up
    rows) and `w2` [E_local, H, I_local], as `fused_experts` takes them."""

    def __init__(
        self,
        num_experts: int,
        hidden_size: int,
        intermediate_size: int,
        backend: str | None = None,
    ) -> None:
        super().__init__()
        self.backend = moe_settings().a2a_backend if backend is None else backend
        if self.backend not in BACKENDS:
            raise ValueError(f"'backend' must be one of {BACKENDS} (got {self.backend!r})")
        self.tp_rank, self.tp_size = group_rank_size("tp")
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
        self, hidden: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor
    ) -> torch.Tensor:
        if self.backend == "all2all" and self.tp_size > 1:
            return self._all_to_all(hidden, topk_weights, topk_ids)
        return fused_experts(hidden, self.w13, self.w2, topk_weights, topk_ids)

    def _all_to_all(
        self, hidden: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor
    ) -> torch.Tensor:
        top_k = topk_ids.shape[1]
        ids = topk_ids.reshape(-1)
        pairs = torch.nonzero(ids >= 0).squeeze(1)
        owner = ids[pairs] // self.local_experts
        order = torch.argsort(owner, stable=True)
        pairs, owner = pairs[order], owner[order]
        send = torch.bincount(owner, minlength=self.tp_size)
        # how many pairs each rank sends here, so both sides know the split sizes
        recv = all_to_all(send, [1] * self.tp_size, [1] * self.tp_size, "tp")
        send_splits, recv_splits = send.tolist(), recv.tolist()
        rows = pairs // top_k
        x = all_to_all(hidden[rows], recv_splits, send_splits, "tp")
        local_ids = all_to_all(ids[pairs] - owner * self.local_experts, recv_splits, send_splits)
        ones = torch.ones(x.shape[0], 1, dtype=torch.float32, device=x.device)
        y = fused_experts(x, self.w13, self.w2, ones, local_ids.unsqueeze(1))
        back = all_to_all(y, send_splits, recv_splits, "tp")
        weights = topk_weights.reshape(-1)[pairs].unsqueeze(1)
        out = torch.zeros(hidden.shape, dtype=torch.float32, device=hidden.device)
        out.index_add_(0, rows, back.float() * weights.float())
        return out.to(hidden.dtype)


class MoE(nn.Module):
    """gate -> route -> experts (+ shared experts): parameters `gate.weight`, `experts.w13`,
    `experts.w2` and, when given, `shared_experts.*`.

    `route` is the model's routing (see `models.layers.router`), called on the gate's
    logits (float32 when `logits_fp32`, as DeepSeek-V3 computes them; else in the
    activations' dtype, as Qwen3-MoE does). `shared_experts` must produce the same kind of
    output as the experts: TP-sharded partial sums for backend none, complete rows
    (replicated, e.g. ``GatedMLP(..., replicated=True)``) for all2all.
    """

    def __init__(
        self,
        hidden_size: int,
        num_experts: int,
        intermediate_size: int,
        route: Route,
        shared_experts: nn.Module | None = None,
        logits_fp32: bool = False,
    ) -> None:
        super().__init__()
        self.gate = ReplicatedLinear(hidden_size, num_experts)
        self.route = route
        self.logits_fp32 = logits_fp32
        self.experts = FusedMoE(num_experts, hidden_size, intermediate_size)
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

    def forward(self, hidden: torch.Tensor, num_valid: int | None = None) -> torch.Tensor:
        """Rows >= `num_valid` are padding and route nowhere; output partial iff `partial`."""
        topk_weights, topk_ids = self.route(self.router_logits(hidden), num_valid)
        out = self.experts(hidden, topk_weights, topk_ids)
        if self.shared_experts is not None:
            out = out + self.shared_experts(hidden)
        return out


def moe_shapes(
    prefix: str, hidden_size: int, num_experts: int, intermediate_size: int
) -> dict[str, tuple[int, ...]]:
    """The checkpoint tensors of `MoE`'s gate and routed experts (one gated MLP each) under
    `prefix`; shared experts and router extras are the model's."""
    shapes = {prefix + "gate.weight": (num_experts, hidden_size)}
    for e in range(num_experts):
        shapes |= gated_mlp_shapes(f"{prefix}experts.{e}.", hidden_size, intermediate_size)
    return shapes


def load_with_experts(
    module: nn.Module, weights: Weights, packed: Mapping[str, tuple[str, object]] | None = None
) -> set[str]:
    """`load_params`, with per-expert checkpoint tensors (``...experts.{e}.gate_proj.weight``,
    ``up_proj``, ``down_proj``) routed into the `FusedMoE` parameters ``...experts.w13/w2``."""
    params = dict(module.named_parameters())
    loaded: set[str] = set()

    def others() -> Iterator[tuple[str, WeightSource]]:
        for name, source in weights:
            match = EXPERT_WEIGHT.match(name)
            if match is None:
                yield name, source
                continue
            suffix = "w2" if match["proj"] == "down_proj" else "w13"
            param_name = f"{match['prefix']}.{suffix}"
            param = params.get(param_name)
            if param is None:
                raise CheckpointError(
                    f"{name}: no parameter {param_name} in {type(module).__name__}"
                )
            param.weight_loader(param, source, int(match["expert"]), match["proj"])
            loaded.add(param_name)

    return loaded | load_params(module, others(), packed)
