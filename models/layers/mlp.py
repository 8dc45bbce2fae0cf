"""The gated (SwiGLU) MLP of dense layers and shared experts: TP-sharded or replicated."""

from __future__ import annotations

import torch
from torch import nn

from engine.model_api.parallel import RankGroup
from engine.model_api.weights import WeightSource
from models.layers.activation import SiluAndMul
from models.layers.linear import (
    MergedColumnParallelLinear,
    ReplicatedLinear,
    RowParallelLinear,
    linear_shapes,
)


class ReplicatedMergedLinear(ReplicatedLinear):
    """Whole [gate | up] on every rank; loads a checkpoint part by its index, like the
    column-parallel version, so one packed-module mapping serves both."""

    def __init__(self, input_size: int, output_sizes: list[int], bias: bool = False) -> None:
        super().__init__(input_size, sum(output_sizes), bias)
        self.output_sizes = list(output_sizes)

    def weight_loader(self, param: nn.Parameter, source: WeightSource, shard_id: int) -> None:
        offset, size = sum(self.output_sizes[:shard_id]), self.output_sizes[shard_id]
        param.data[offset : offset + size].copy_(source.full())


class GatedMLP(nn.Module):
    """down(silu(gate(x)) * up(x)) with parameters `gate_up_proj` and `down_proj`.

    Not `replicated`: intermediate dim sharded over `tp`; the output is a partial sum that
    the caller (the layer communicator) reduces. `replicated` (``--moe-dense-tp-size 1``,
    or shared experts next to all-to-all experts): whole weights on every rank, complete
    output for whatever rows this rank holds. `swiglu_limit` clamps gate and up before the
    activation (DeepSeek-V4's shared expert; elementwise, so sharding does not change it).
    """

    def __init__(
        self,
        hidden_size: int,
        intermediate_size: int,
        tp: RankGroup,
        replicated: bool = False,
        bias: bool = False,
        swiglu_limit: float | None = None,
    ) -> None:
        super().__init__()
        sizes = [intermediate_size, intermediate_size]
        if replicated:
            self.gate_up_proj = ReplicatedMergedLinear(hidden_size, sizes, bias)
            self.down_proj = ReplicatedLinear(intermediate_size, hidden_size, bias)
        else:
            self.gate_up_proj = MergedColumnParallelLinear(hidden_size, sizes, tp, bias)
            self.down_proj = RowParallelLinear(
                intermediate_size, hidden_size, tp, bias, reduce_results=False
            )
        self.partial = not replicated and self.down_proj.tp_size > 1
        self.act_fn = SiluAndMul(swiglu_limit)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_up_proj(x)))


def gated_mlp_shapes(
    prefix: str, hidden_size: int, intermediate_size: int, bias: bool = False
) -> dict[str, tuple[int, ...]]:
    """The checkpoint tensors of a gated MLP named `prefix`: gate_proj, up_proj, down_proj."""
    return (
        linear_shapes(prefix + "gate_proj.", hidden_size, intermediate_size, bias)
        | linear_shapes(prefix + "up_proj.", hidden_size, intermediate_size, bias)
        | linear_shapes(prefix + "down_proj.", intermediate_size, hidden_size, bias)
    )
