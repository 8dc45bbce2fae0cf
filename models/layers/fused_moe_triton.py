"""Triton kernels of the fused MoE: slot alignment, grouped GEMM (with autotuning), top-k sum.

Only kernels and their tuning configs live here; `fused_moe_host` sizes and launches them.
The kernels are decorated at import time, so TRITON_INTERPRET=1 (set by tests/conftest.py
on CPU machines before this import) runs them in Triton's interpreter.
"""

from __future__ import annotations

import os

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU machines and CI run without triton
    triton = None
    tl = None

HAS_TRITON = triton is not None


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

    @triton.jit(do_not_specialize=["num_slots", "align", "a_div", "m_bucket", "limit"])
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
        limit,  # swiglu_limit, read only when CLAMP
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
        CLAMP: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
        GROUP_M: tl.constexpr,
        EVEN_K: tl.constexpr,
    ):
        """out[pair, n] = act(a[pair // a_div] @ w[e].T): gate_up (SiLU*mul, gate and up
        clamped at `limit` when CLAMP) or down (x scale)."""
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
            if CLAMP:
                acc = tl.minimum(acc, limit)
                acc_up = tl.minimum(tl.maximum(acc_up, -limit), limit)
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
