"""MoE expert computation: the entry point, dispatching to Triton on CUDA, else torch.

For each token t: ``out[t] = sum_k w[t, k] * down_e(silu(gate_e(x)) * up_e(x))`` with
``e = topk_ids[t, k]``; an id of -1 (or any id outside ``[0, E)``) contributes nothing.
``w13[e]`` stacks the gate rows (first ``I``) over the up rows; ``E`` counts local experts.
With ``swiglu_limit`` L (DeepSeek-V4), ``gate = min(gate, L)`` and ``up = clamp(up, -L, L)``
before the activation.

The torch reference path lives in `fused_moe_torch`, the Triton kernels in
`fused_moe_triton` and their host-side launcher in `fused_moe_host`; the public names are
re-exported here.
"""

from __future__ import annotations

from torch import Tensor

from models.layers.fused_moe_host import fused_experts_triton
from models.layers.fused_moe_torch import fused_experts_torch
from models.layers.fused_moe_triton import HAS_TRITON

__all__ = ["HAS_TRITON", "fused_experts", "fused_experts_torch", "fused_experts_triton"]


def fused_experts(
    hidden: Tensor,
    w13: Tensor,
    w2: Tensor,
    topk_weights: Tensor,
    topk_ids: Tensor,
    swiglu_limit: float | None = None,
) -> Tensor:
    """Weighted sum of the routed experts' SwiGLU MLPs; Triton on CUDA, torch otherwise."""
    if hidden.is_cuda and HAS_TRITON:
        return fused_experts_triton(
            hidden, w13, w2, topk_weights, topk_ids, swiglu_limit=swiglu_limit
        )
    return fused_experts_torch(hidden, w13, w2, topk_weights, topk_ids, swiglu_limit)
