"""Tensor-parallel linear layers; weights are [out, in] as in the checkpoint, one shard per rank."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from engine.model_api.parallel import RankGroup, all_gather_last_dim, all_reduce
from engine.model_api.weights import WeightSource

# the group a layer that shards nothing is "sharded" over
UNSHARDED = RankGroup.single("tp")


def linear_shapes(
    prefix: str, input_size: int, output_size: int, bias: bool = False
) -> dict[str, tuple[int, ...]]:
    """The checkpoint tensors of one (unsharded) linear layer named `prefix`."""
    shapes = {prefix + "weight": (output_size, input_size)}
    if bias:
        shapes[prefix + "bias"] = (output_size,)
    return shapes


def divide(total: int, parts: int, what: str) -> int:
    if total % parts:
        raise ValueError(f"{what} ({total}) must be divisible by the TP size ({parts})")
    return total // parts


class LinearBase(nn.Module):
    def __init__(self, in_local: int, out_local: int, bias: bool, group: RankGroup) -> None:
        super().__init__()
        self.group = group
        self.tp_rank, self.tp_size = group.rank, group.size
        self.weight = nn.Parameter(torch.empty(out_local, in_local), requires_grad=False)
        self.weight.weight_loader = self.weight_loader
        self.bias = None
        if bias:
            self.bias = nn.Parameter(torch.empty(out_local), requires_grad=False)
            self.bias.weight_loader = self.weight_loader

    def weight_loader(self, param: nn.Parameter, source: WeightSource) -> None:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class ReplicatedLinear(LinearBase):
    def __init__(self, input_size: int, output_size: int, bias: bool = False) -> None:
        super().__init__(input_size, output_size, bias, UNSHARDED)

    def weight_loader(self, param: nn.Parameter, source: WeightSource) -> None:
        param.data.copy_(source.full())


class ColumnParallelLinear(LinearBase):
    """Output features sharded; `gather_output` concatenates them on every rank."""

    def __init__(
        self,
        input_size: int,
        output_size: int,
        group: RankGroup,
        bias: bool = False,
        gather_output: bool = False,
    ) -> None:
        super().__init__(input_size, divide(output_size, group.size, "output_size"), bias, group)
        self.gather_output = gather_output

    def weight_loader(self, param: nn.Parameter, source: WeightSource) -> None:
        n = param.shape[0]
        param.data.copy_(source.narrow(0, self.tp_rank * n, n))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = super().forward(x)
        return all_gather_last_dim(y, self.group) if self.gather_output else y


class MergedColumnParallelLinear(ColumnParallelLinear):
    """Several column-parallel outputs fused (gate and up); shard id = index in `output_sizes`."""

    def __init__(
        self, input_size: int, output_sizes: list[int], group: RankGroup, bias: bool = False
    ) -> None:
        self.output_sizes = list(output_sizes)
        super().__init__(input_size, sum(output_sizes), group, bias)
        for size in self.output_sizes:
            divide(size, self.tp_size, "each merged output size")

    def weight_loader(self, param: nn.Parameter, source: WeightSource, shard_id: int) -> None:
        n = self.output_sizes[shard_id] // self.tp_size
        offset = sum(self.output_sizes[:shard_id]) // self.tp_size
        param.data[offset : offset + n].copy_(source.narrow(0, self.tp_rank * n, n))


class QKVParallelLinear(ColumnParallelLinear):
    """Fused q/k/v by heads; KV heads are split when there are at least as many as ranks,
    otherwise each rank keeps a copy of the one KV head its query heads use."""

    def __init__(
        self,
        hidden_size: int,
        head_dim: int,
        num_heads: int,
        num_kv_heads: int,
        group: RankGroup,
        bias: bool = False,
        v_head_dim: int | None = None,
    ) -> None:
        tp = group.size
        self.head_dim = head_dim
        self.v_head_dim = v_head_dim or head_dim
        self.num_heads = divide(num_heads, tp, "num_attention_heads")
        if num_kv_heads >= tp:
            self.num_kv_heads = divide(num_kv_heads, tp, "num_key_value_heads")
            self.kv_replicas = 1
        else:
            self.num_kv_heads = 1
            self.kv_replicas = divide(tp, num_kv_heads, "the TP size over num_key_value_heads")
        self.q_size = self.num_heads * head_dim
        self.k_size = self.num_kv_heads * head_dim
        self.v_size = self.num_kv_heads * self.v_head_dim
        out = (self.q_size + self.k_size + self.v_size) * tp
        super().__init__(hidden_size, out, group, bias)

    def weight_loader(self, param: nn.Parameter, source: WeightSource, shard_id: str) -> None:
        kv_rank = self.tp_rank // self.kv_replicas
        offset, size, start = {
            "q": (0, self.q_size, self.tp_rank * self.q_size),
            "k": (self.q_size, self.k_size, kv_rank * self.k_size),
            "v": (self.q_size + self.k_size, self.v_size, kv_rank * self.v_size),
        }[shard_id]
        param.data[offset : offset + size].copy_(source.narrow(0, start, size))

    def split(self, qkv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return qkv.split([self.q_size, self.k_size, self.v_size], dim=-1)


class RowParallelLinear(LinearBase):
    """Input features sharded; the partial sums are all-reduced unless `reduce_results` is off,
    in which case the caller owns the reduction (all-reduce or reduce-scatter)."""

    def __init__(
        self,
        input_size: int,
        output_size: int,
        group: RankGroup,
        bias: bool = False,
        reduce_results: bool = True,
    ) -> None:
        super().__init__(divide(input_size, group.size, "input_size"), output_size, bias, group)
        self.reduce_results = reduce_results

    def weight_loader(self, param: nn.Parameter, source: WeightSource) -> None:
        if param.dim() == 1:
            param.data.copy_(source.full())
            return
        n = param.shape[1]
        param.data.copy_(source.narrow(1, self.tp_rank * n, n))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The bias joins the sum once, on rank 0.
        y = F.linear(x, self.weight, self.bias if self.tp_rank == 0 else None)
        return all_reduce(y, self.group) if self.reduce_results else y
