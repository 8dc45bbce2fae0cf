"""MoE expert computation in torch: the reference path, and the shape check both paths share.

The contract (and the semantics of ids outside ``[0, E)``) is in `models.layers.fused_moe`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from models.layers.activation import clamp_gate_up


def _check_shapes(hidden: Tensor, w13: Tensor, w2: Tensor, weights: Tensor, ids: Tensor) -> None:
    t, h = hidden.shape
    e, two_i, h13 = w13.shape
    if h13 != h or two_i % 2 or tuple(w2.shape) != (e, h, two_i // 2):
        raise ValueError(
            f"expert weight shapes do not fit: hidden {tuple(hidden.shape)}, "
            f"w13 {tuple(w13.shape)}, w2 {tuple(w2.shape)}"
        )
    if weights.shape != ids.shape or ids.dim() != 2 or ids.shape[0] != t:
        raise ValueError(
            f"routing shapes do not fit: topk_weights {tuple(weights.shape)}, "
            f"topk_ids {tuple(ids.shape)} for {t} tokens"
        )


def fused_experts_torch(
    hidden: Tensor,
    w13: Tensor,
    w2: Tensor,
    topk_weights: Tensor,
    topk_ids: Tensor,
    swiglu_limit: float | None = None,
) -> Tensor:
    """Reference path: group the (token, k) pairs by expert, one matmul pair per expert."""
    _check_shapes(hidden, w13, w2, topk_weights, topk_ids)
    t, h = hidden.shape
    num_experts, inter = w13.shape[0], w2.shape[2]
    acc_dtype = torch.promote_types(hidden.dtype, torch.float32)
    out = torch.zeros(t, h, dtype=acc_dtype, device=hidden.device)
    ids = topk_ids.reshape(-1).long()
    valid = (ids >= 0) & (ids < num_experts)
    key = torch.where(valid, ids, num_experts)
    order = torch.sort(key, stable=True).indices
    counts = torch.bincount(key, minlength=num_experts + 1)[:num_experts].tolist()
    top_k = topk_ids.shape[1]
    tokens = order // top_k
    weights = topk_weights.reshape(-1)[order].to(acc_dtype)
    start = 0
    for e, count in enumerate(counts):
        if not count:
            continue
        rows = slice(start, start + count)
        start += count
        x = hidden[tokens[rows]]
        # The GEMMs accumulate in fp32 internally; the activation and the sum run in acc_dtype.
        gate_up = F.linear(x, w13[e]).to(acc_dtype)
        gate, up = clamp_gate_up(gate_up[:, :inter], gate_up[:, inter:], swiglu_limit)
        act = F.silu(gate) * up
        down = F.linear(act.to(hidden.dtype), w2[e]).to(acc_dtype)
        out.index_add_(0, tokens[rows], down * weights[rows, None])
    return out.to(hidden.dtype)
