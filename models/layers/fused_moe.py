"""MoE expert computation: a torch reference path and a Triton grouped GEMM.

For each token t: ``out[t] = sum_k w[t, k] * down_e(silu(gate_e(x)) * up_e(x))`` with
``e = topk_ids[t, k]``; an id of -1 (or any id outside ``[0, E)``) contributes nothing.
``w13[e]`` stacks the gate rows (first ``I``) over the up rows; ``E`` counts local experts.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import Tensor

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU machines and CI run without triton
    triton = None
    tl = None

HAS_TRITON = triton is not None


def fused_experts(
    hidden: Tensor,
    w13: Tensor,
    w2: Tensor,
    topk_weights: Tensor,
    topk_ids: Tensor,
) -> Tensor:
    """Weighted sum of the routed experts' SwiGLU MLPs; Triton on CUDA, torch otherwise."""
    if hidden.is_cuda and HAS_TRITON:
        return fused_experts_triton(hidden, w13, w2, topk_weights, topk_ids)
    return fused_experts_torch(hidden, w13, w2, topk_weights, topk_ids)


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
        act = F.silu(gate_up[:, :inter]) * gate_up[:, inter:]
        down = F.linear(act.to(hidden.dtype), w2[e]).to(acc_dtype)
        out.index_add_(0, tokens[rows], down * weights[rows, None])
    return out.to(hidden.dtype)


# ---------------------------------------------------------------------------------------
# Triton path
#
# 1. align: order the T*K (token, k) pairs by expert into "slots"; every expert's segment
#    is padded to a multiple of `align` rows, so a tile of BLOCK_M <= align rows never mixes
#    experts. Per align-block we record its expert and how many of its rows are real.
# 2. gate_up GEMM per tile with its expert's w13, SiLU-and-mul in the epilogue -> [T*K, I].
# 3. down GEMM per tile with w2, times the routing weight -> fp32 [T*K, H].
# 4. a sum over k per token (deterministic, no atomics), cast to hidden's dtype.
# Every size is a bound known from the shapes, so nothing syncs with the host.
# ---------------------------------------------------------------------------------------

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


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


if HAS_TRITON:

    @triton.jit(do_not_specialize=["num_pairs", "num_slots", "align"])
    def _align_kernel(
        ids_ptr,
        sorted_ptr,
        block_expert_ptr,
        block_rows_ptr,
        num_pairs,
        num_experts,
        num_slots,
        align,
        EP: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        # One program, all bookkeeping in registers: for decode-sized batches this beats a
        # dozen torch launches. Gathers from a per-expert vector are one-hot sums.
        experts = tl.arange(0, EP)
        lanes = tl.arange(0, BLOCK)
        # while loops: the interpreter cannot range() over a runtime bound
        counts = tl.zeros([EP], dtype=tl.int32)
        start = 0
        while start < num_pairs:
            idx = start + lanes
            e = tl.load(ids_ptr + idx, mask=idx < num_pairs, other=-1).to(tl.int32)
            hit = e[:, None] == experts[None, :]
            counts += tl.sum(hit.to(tl.int32), axis=0)
            start += BLOCK
        counts = tl.where(experts < num_experts, counts, 0)
        padded = (counts + align - 1) // align * align
        ends = tl.cumsum(padded, axis=0)
        starts = ends - padded
        total = tl.sum(padded, axis=0)

        num_blocks = num_slots // align
        b0 = 0
        while b0 < num_blocks:
            blk = b0 + lanes
            first_slot = blk * align
            owner = tl.sum((ends[None, :] <= first_slot[:, None]).to(tl.int32), axis=1)
            onehot = owner[:, None] == experts[None, :]
            seg_start = tl.sum(tl.where(onehot, starts[None, :], 0), axis=1)
            seg_count = tl.sum(tl.where(onehot, counts[None, :], 0), axis=1)
            rows = tl.minimum(tl.maximum(seg_count - (first_slot - seg_start), 0), align)
            used = first_slot < total
            ok = blk < num_blocks
            tl.store(block_expert_ptr + blk, tl.where(used, owner, -1), mask=ok)
            tl.store(block_rows_ptr + blk, tl.where(used, rows, 0), mask=ok)
            b0 += BLOCK

        cursor = starts
        start = 0
        while start < num_pairs:
            idx = start + lanes
            e = tl.load(ids_ptr + idx, mask=idx < num_pairs, other=-1).to(tl.int32)
            e = tl.where((e >= 0) & (e < num_experts), e, -1)
            hit = e[:, None] == experts[None, :]
            base = tl.sum(tl.where(hit, cursor[None, :], 0), axis=1)
            # rank among earlier pairs of this chunk with the same expert: keeps pair order
            earlier = (e[:, None] == e[None, :]) & (lanes[None, :] < lanes[:, None])
            rank = tl.sum(earlier.to(tl.int32), axis=1)
            tl.store(sorted_ptr + base + rank, idx, mask=e >= 0)
            cursor += tl.sum(hit.to(tl.int32), axis=0)
            start += BLOCK

    @triton.jit(do_not_specialize=["num_slots", "align", "a_div", "m_bucket"])
    def _moe_gemm_kernel(
        a_ptr,
        w_ptr,
        out_ptr,
        scale_ptr,
        sorted_ptr,
        block_expert_ptr,
        block_rows_ptr,
        num_slots,
        align,
        a_div,
        m_bucket,
        N,
        K: tl.constexpr,  # fixed per model; a constexpr K-loop bound also suits the interpreter
        stride_am,
        stride_ak,
        stride_we,
        stride_wn,
        stride_wk,
        stride_om,
        GATE_UP: tl.constexpr,
        FP32: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
        GROUP_M: tl.constexpr,
        EVEN_K: tl.constexpr,
    ):
        """out[pair, n] = act(a[pair // a_div] @ w[e].T): gate_up (SiLU*mul) or down (x scale)."""
        pid = tl.program_id(0)
        num_pid_m = num_slots // BLOCK_M
        num_pid_n = tl.cdiv(N, BLOCK_N)
        per_group = GROUP_M * num_pid_n
        first_m = (pid // per_group) * GROUP_M
        group_m = tl.minimum(num_pid_m - first_m, GROUP_M)
        pid_m = first_m + (pid % per_group) % group_m
        pid_n = (pid % per_group) // group_m

        slot0 = pid_m * BLOCK_M
        blk = slot0 // align
        rows = tl.load(block_rows_ptr + blk)
        local = slot0 - blk * align
        if local >= rows:  # padding tail of a segment, or past the last expert
            return
        expert = tl.load(block_expert_ptr + blk).to(tl.int64)

        offs_m = tl.arange(0, BLOCK_M)
        row_ok = local + offs_m < rows
        pair = tl.load(sorted_ptr + slot0 + offs_m, mask=row_ok, other=0).to(tl.int64)
        a_row = pair // a_div
        cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        cols_ld = cols % N  # wrapped, so weight loads need no mask; stores are masked
        offs_k = tl.arange(0, BLOCK_K)

        a_ptrs = a_ptr + a_row[:, None] * stride_am + offs_k[None, :] * stride_ak
        w_ptrs = (
            w_ptr + expert * stride_we + cols_ld[None, :] * stride_wn + offs_k[:, None] * stride_wk
        )
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        if GATE_UP:
            up_ptrs = w_ptrs + N * stride_wn
            acc_up = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for k in range(0, tl.cdiv(K, BLOCK_K)):
            if EVEN_K:
                a = tl.load(a_ptrs)
                w = tl.load(w_ptrs)
            else:
                k_ok = offs_k < K - k * BLOCK_K
                a = tl.load(a_ptrs, mask=k_ok[None, :], other=0.0)
                w = tl.load(w_ptrs, mask=k_ok[:, None], other=0.0)
            if FP32:
                acc = tl.dot(a, w, acc, input_precision="ieee")
            else:
                acc = tl.dot(a, w, acc)
            if GATE_UP:
                if EVEN_K:
                    u = tl.load(up_ptrs)
                else:
                    u = tl.load(up_ptrs, mask=k_ok[:, None], other=0.0)
                if FP32:
                    acc_up = tl.dot(a, u, acc_up, input_precision="ieee")
                else:
                    acc_up = tl.dot(a, u, acc_up)
                up_ptrs += BLOCK_K * stride_wk
            a_ptrs += BLOCK_K * stride_ak
            w_ptrs += BLOCK_K * stride_wk

        if GATE_UP:
            acc = acc * tl.sigmoid(acc) * acc_up
        else:
            acc = acc * tl.load(scale_ptr + pair, mask=row_ok, other=0.0)[:, None]
        out_ptrs = out_ptr + pair[:, None] * stride_om + cols[None, :]
        mask = row_ok[:, None] & (cols[None, :] < N)
        tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask)

    _moe_gemm = triton.heuristics({"EVEN_K": lambda a: a["K"] % a["BLOCK_K"] == 0})(
        _moe_gemm_kernel
    )

    @triton.jit
    def _sum_topk_kernel(
        part_ptr,
        ids_ptr,
        out_ptr,
        H,
        num_experts,
        TOP_K: tl.constexpr,
        BLOCK_H: tl.constexpr,
    ):
        t = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
        ok = cols < H
        acc = tl.zeros([BLOCK_H], dtype=tl.float32)
        for k in tl.static_range(TOP_K):
            e = tl.load(ids_ptr + t * TOP_K + k)
            routed = (e >= 0) & (e < num_experts)
            acc += tl.load(part_ptr + (t * TOP_K + k) * H + cols, mask=ok & routed, other=0.0)
        tl.store(out_ptr + t * H + cols, acc.to(out_ptr.dtype.element_ty), mask=ok)

    def _cfg(bm: int, bn: int, bk: int, group: int, warps: int, stages: int):
        return triton.Config(
            {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": group},
            num_warps=warps,
            num_stages=stages,
        )

    _CONFIGS = [
        # decode: one tile of 16 rows per expert; narrow N tiles give more programs
        _cfg(16, 32, 128, 1, 4, 4),
        _cfg(16, 64, 64, 1, 4, 4),
        _cfg(16, 64, 128, 1, 4, 3),
        _cfg(16, 128, 64, 1, 4, 3),
        _cfg(16, 128, 128, 1, 8, 3),
        _cfg(32, 64, 64, 8, 4, 4),
        _cfg(32, 128, 64, 8, 4, 3),
        _cfg(64, 64, 64, 8, 4, 4),
        _cfg(64, 128, 64, 8, 8, 3),
        _cfg(64, 128, 128, 8, 8, 2),
    ]

    def _prune(configs, named_args, **_):
        align = named_args["align"]
        fits = [c for c in configs if c.kwargs["BLOCK_M"] <= align]
        # with many rows per expert, the narrow decode tile re-reads activations for nothing;
        # the interpreter tries a single config
        if align >= 32:
            fits = [c for c in fits if c.kwargs["BLOCK_M"] >= 32 or c.kwargs["BLOCK_N"] >= 64]
        return fits[:1] if _interpreting() else fits

    def _tune_bench(fn, quantiles):
        if _interpreting():
            fn()
            return [0.0, 0.0, 0.0]
        return triton.testing.do_bench(fn, warmup=5, rep=20, quantiles=quantiles)

    _moe_gemm_tuned = triton.autotune(
        configs=_CONFIGS,
        key=["m_bucket", "align", "N", "K", "GATE_UP"],
        prune_configs_by={"early_config_prune": _prune},
        do_bench=_tune_bench,
        # every rank and every later launch on this machine reuses the timings from disk
        cache_results=True,
    )(_moe_gemm)


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


def _gemm(a, w, out, scale, layout, a_div, m_bucket, gate_up, config):
    sorted_pairs, block_expert, block_rows, align = layout
    num_slots = sorted_pairs.numel()
    n_out = out.shape[1]
    k_dim = a.shape[1]
    grid = lambda meta: (num_slots // meta["BLOCK_M"] * triton.cdiv(n_out, meta["BLOCK_N"]),)
    args = (
        a, w, out, scale, sorted_pairs, block_expert, block_rows,
        num_slots, align, a_div, m_bucket, n_out, k_dim,
        a.stride(0), a.stride(1), w.stride(0), w.stride(1), w.stride(2), out.stride(0),
    )  # fmt: skip
    fp32 = a.dtype == torch.float32
    if config is None:
        _moe_gemm_tuned[grid](*args, GATE_UP=gate_up, FP32=fp32)
    else:
        meta = dict(config)
        warps, stages = meta.pop("num_warps", 4), meta.pop("num_stages", 3)
        _moe_gemm[grid](
            *args, GATE_UP=gate_up, FP32=fp32, num_warps=warps, num_stages=stages, **meta
        )


def fused_experts_triton(
    hidden: Tensor,
    w13: Tensor,
    w2: Tensor,
    topk_weights: Tensor,
    topk_ids: Tensor,
    *,
    config: dict | None = None,
) -> Tensor:
    """Triton grouped GEMM over the routed pairs. ``config`` fixes the tile sizes
    (BLOCK_M/N/K, GROUP_M, num_warps, num_stages) instead of autotuning."""
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
    _gemm(hidden, w13, act, scale, layout, top_k, m_bucket, True, config)
    part = torch.empty(n, h, dtype=torch.float32, device=hidden.device)
    _gemm(act, w2, part, scale, layout, 1, m_bucket, False, config)

    out = torch.empty_like(hidden)
    block_h = min(1024, _next_pow2(h))
    _sum_topk_kernel[(t, triton.cdiv(h, block_h))](
        part, ids, out, h, num_experts, TOP_K=top_k, BLOCK_H=block_h
    )
    return out
