"""An MoE layer's checkpoint: the names and shapes of its gate and per-expert tensors, and
their loading into the fused expert parameters."""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping

from torch import nn

from engine.model_api.weights import CheckpointError, Weights, WeightSource, load_params
from models.layers.mlp import gated_mlp_shapes

EXPERT_WEIGHT = re.compile(
    r"^(?P<prefix>.+\.experts)\.(?P<expert>\d+)\.(?P<proj>gate_proj|up_proj|down_proj)\.weight$"
)


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
