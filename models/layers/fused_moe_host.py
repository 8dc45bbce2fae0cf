"""Fused MoE on Triton, host side: the slot layout of the routed pairs and the launches.

1. align: order the T*K (token, k) pairs by expert into "slots"; every expert's segment
   is padded to a multiple of `align` rows, so a tile of BLOCK_M <= align rows never mixes
   experts. Per align-block we record its expert and how many of its rows are real.
2. gate_up GEMM per tile with its expert's w13, SiLU-and-mul in the epilogue -> [T*K, I].
3. down GEMM per tile with w2, times the routing weight -> fp32 [T*K, H].
4. a sum over k per token (deterministic, no atomics), cast to hidden's dtype.
Every size is a bound known from the shapes, so nothing syncs with the host.

The kernels themselves are in `fused_moe_triton`.
"""

from __future__ import annotations

import torch
from torch import Tensor

from models.layers.fused_moe_torch import _check_shapes
from models.layers.fused_moe_triton import HAS_TRITON, triton

if HAS_TRITON:
    from models.layers.fused_moe_triton import (
        _align_kernel,
        _moe_gemm,
        _moe_gemm_tuned,
        _sum_topk_kernel,
    )

_ALIGN_KERNEL_MAX_PAIRS = 1024  # one-program align kernel below this; torch sort above
_MAX_BUCKET = 8192


def _next_pow2(x: int) -> int:
    return 1 << max(0, x - 1).bit_length()


def _align_size(num_pairs: int, num_experts: int) -> int:
    """Rows per align-block: about the mean rows per expert, clamped to the tile heights."""
    return min(64, max(16, _next_pow2(-(-num_pairs // num_experts))))


def _num_slots(num_pairs: int, num_experts: int, align: int) -> int:
    slots = num_pairs + min(num_experts, num_pairs) * (align - 1)
    return -(-slots // align) * align


def _align_torch(ids: Tensor, num_experts: int, align: int, num_slots: int):
    """Slot layout with torch ops: returns (sorted_pairs, block_expert, block_rows)."""
    n = ids.numel()
    dev = ids.device
    ids = ids.long()
    key = torch.where((ids >= 0) & (ids < num_experts), ids, num_experts)
    counts = torch.zeros(num_experts + 1, dtype=torch.long, device=dev)
    counts.scatter_add_(0, key, torch.ones_like(key))
    padded = (counts + align - 1) // align * align
    padded[num_experts] = 0
    ends = padded.cumsum(0)
    starts = ends - padded
    first = counts.cumsum(0) - counts  # first sorted index of each expert
    order = torch.sort(key, stable=True).indices
    skey = key[order]
    pos = starts[skey] + torch.arange(n, device=dev) - first[skey]
    pos = torch.where(skey < num_experts, pos, num_slots)  # unrouted pairs go to a dump slot
    sorted_pairs = torch.zeros(num_slots + 1, dtype=torch.int32, device=dev)
    sorted_pairs[pos] = order.to(torch.int32)
    block_start = torch.arange(0, num_slots, align, device=dev)
    owner = torch.searchsorted(ends[:num_experts], block_start, right=True)
    used = owner < num_experts
    rows = (counts[owner] - (block_start - starts[owner])).clamp(0, align)
    rows = torch.where(used, rows, 0).to(torch.int32)
    block_expert = torch.where(used, owner, -1).to(torch.int32)
    return sorted_pairs[:num_slots], block_expert, rows


def _align(ids: Tensor, num_experts: int, align: int, num_slots: int):
    n = ids.numel()
    if n > _ALIGN_KERNEL_MAX_PAIRS:
        return _align_torch(ids, num_experts, align, num_slots)
    dev = ids.device
    sorted_pairs = torch.empty(num_slots, dtype=torch.int32, device=dev)
    block_expert = torch.empty(num_slots // align, dtype=torch.int32, device=dev)
    block_rows = torch.empty(num_slots // align, dtype=torch.int32, device=dev)
    ep = max(16, _next_pow2(num_experts))
    block = max(16, min(64, 8192 // ep))
    _align_kernel[(1,)](
        ids, sorted_pairs, block_expert, block_rows, n, num_experts, num_slots, align,
        EP=ep, BLOCK=block, num_warps=4,
    )  # fmt: skip
    return sorted_pairs, block_expert, block_rows


def _gemm(a, w, out, scale, layout, a_div, m_bucket, gate_up, config, limit=None):
    sorted_pairs, block_expert, block_rows, align = layout
    num_slots = sorted_pairs.numel()
    n_out = out.shape[1]
    k_dim = a.shape[1]
    grid = lambda meta: (num_slots // meta["BLOCK_M"] * triton.cdiv(n_out, meta["BLOCK_N"]),)
    clamp_at = 0.0 if limit is None else float(limit)
    args = (
        a, w, out, scale, sorted_pairs, block_expert, block_rows,
        num_slots, align, a_div, m_bucket, clamp_at, n_out, k_dim,
        a.stride(0), a.stride(1), w.stride(0), w.stride(1), w.stride(2), out.stride(0),
    )  # fmt: skip
    flags = dict(GATE_UP=gate_up, FP32=a.dtype == torch.float32, CLAMP=limit is not None)
    if config is None:
        _moe_gemm_tuned[grid](*args, **flags)
    else:
        meta = dict(config)
        warps, stages = meta.pop("num_warps", 4), meta.pop("num_stages", 3)
        _moe_gemm[grid](*args, **flags, num_warps=warps, num_stages=stages, **meta)


def fused_experts_triton(
    hidden: Tensor,
    w13: Tensor,
    w2: Tensor,
    topk_weights: Tensor,
    topk_ids: Tensor,
    *,
    config: dict | None = None,
    swiglu_limit: float | None = None,
) -> Tensor:
    """Triton grouped GEMM over the routed pairs. ``config`` fixes the tile sizes
    (BLOCK_M/N/K, GROUP_M, num_warps, num_stages) instead of autotuning; ``swiglu_limit``
    clamps gate and up in the gate_up epilogue."""
    if not HAS_TRITON:
        raise RuntimeError("fused_experts_triton needs triton")
    _check_shapes(hidden, w13, w2, topk_weights, topk_ids)
    t, h = hidden.shape
    num_experts, top_k, inter = w13.shape[0], topk_ids.shape[1], w2.shape[2]
    n = t * top_k
    if n == 0:
        return torch.zeros_like(hidden)
    ids = topk_ids.reshape(-1).contiguous()
    scale = topk_weights.reshape(-1).to(torch.float32).contiguous()
    align = _align_size(n, num_experts)
    if config is not None:
        align = max(align, config["BLOCK_M"])  # a tile must not span two experts
    num_slots = _num_slots(n, num_experts, align)
    layout = (*_align(ids, num_experts, align, num_slots), align)
    m_bucket = min(_next_pow2(n), _MAX_BUCKET)

    act = torch.empty(n, inter, dtype=hidden.dtype, device=hidden.device)
    _gemm(hidden, w13, act, scale, layout, top_k, m_bucket, True, config, swiglu_limit)
    part = torch.empty(n, h, dtype=torch.float32, device=hidden.device)
    _gemm(act, w2, part, scale, layout, 1, m_bucket, False, config)

    out = torch.empty_like(hidden)
    block_h = min(1024, _next_pow2(h))
    _sum_topk_kernel[(t, triton.cdiv(h, block_h))](
        part, ids, out, h, num_experts, TOP_K=top_k, BLOCK_H=block_h
    )
    return out
