"""Triton kernels for a decode step's elementwise work: RMSNorm with the residual add fused
in, and SiLU·mul (optionally clamped). One kernel each, where torch launches four to six.

They compute what the torch paths in `norm.py` and `activation.py` compute, in the same
order (float32 statistics, the normalised value rounded to the activations' dtype before
the weight multiplies it) and are checked against them in Triton's interpreter on the CPU.
FlashInfer 0.7 has norm and activation kernels too, but on Hopper its norms dispatch to
CuTe-DSL kernels whose package the GPU machines lack, and its CUDA fallbacks build for
tens of seconds on every fresh machine; these build in about a second.
"""

from __future__ import annotations

import torch

from models.layers.fused_moe_triton import HAS_TRITON

if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _rmsnorm_kernel(
        x_ptr,
        res_ptr,
        w_ptr,
        out_ptr,
        res_out_ptr,
        stride_x,
        stride_res,
        n_cols,
        eps,
        HAS_RESIDUAL: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        ok = cols < n_cols
        x = tl.load(x_ptr + row * stride_x + cols, mask=ok, other=0.0)
        if HAS_RESIDUAL:
            r = tl.load(res_ptr + row * stride_res + cols, mask=ok, other=0.0)
            # rounded like torch's add in the activations' dtype
            x = (x.to(tl.float32) + r.to(tl.float32)).to(x_ptr.dtype.element_ty)
            tl.store(res_out_ptr + row * n_cols + cols, x, mask=ok)
        xf = x.to(tl.float32)
        rstd = tl.rsqrt(tl.sum(xf * xf, axis=0) / n_cols + eps)
        normed = (xf * rstd).to(x_ptr.dtype.element_ty).to(tl.float32)
        w = tl.load(w_ptr + cols, mask=ok, other=0.0).to(tl.float32)
        tl.store(out_ptr + row * n_cols + cols, (normed * w).to(out_ptr.dtype.element_ty), mask=ok)

    @triton.jit
    def _silu_mul_kernel(
        x_ptr,
        out_ptr,
        stride_x,
        n_cols,
        limit,
        CLAMP: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        ok = cols < n_cols
        gate = tl.load(x_ptr + row * stride_x + cols, mask=ok, other=0.0).to(tl.float32)
        up = tl.load(x_ptr + row * stride_x + n_cols + cols, mask=ok, other=0.0).to(tl.float32)
        if CLAMP:
            gate = tl.minimum(gate, limit)
            up = tl.minimum(tl.maximum(up, -limit), limit)
        # silu rounded to the dtype first, as torch's F.silu(gate) * up does
        act = (gate * tl.sigmoid(gate)).to(x_ptr.dtype.element_ty).to(tl.float32)
        up = up.to(x_ptr.dtype.element_ty).to(tl.float32)
        tl.store(out_ptr + row * n_cols + cols, (act * up).to(out_ptr.dtype.element_ty), mask=ok)


def fusable(x: torch.Tensor) -> bool:
    """Whether the Triton kernels take `x`: on CUDA (or in Triton's interpreter, for the
    tests), with contiguous rows."""
    return HAS_TRITON and x.is_cuda and x.stride(-1) == 1


def rmsnorm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """`RMSNorm.forward` in one kernel: norm(x), or (norm(x + residual), x + residual)."""
    shape, n = x.shape, x.shape[-1]
    x2 = x.reshape(-1, n)
    out = torch.empty(x2.shape, dtype=x.dtype, device=x.device)
    res_out = None if residual is None else torch.empty_like(out)
    res2 = x2 if residual is None else residual.reshape(-1, n)
    if x2.shape[0]:
        _rmsnorm_kernel[(x2.shape[0],)](
            x2, res2, weight, out, out if res_out is None else res_out,
            x2.stride(0), res2.stride(0), n, eps,
            HAS_RESIDUAL=residual is not None, BLOCK=triton.next_power_of_2(n),
        )  # fmt: skip
    if residual is None:
        return out.view(shape)
    return out.view(shape), res_out.view(shape)


def silu_and_mul(x: torch.Tensor, limit: float | None = None) -> torch.Tensor:
    """`SiluAndMul.forward` in one kernel: silu(gate) * up over x = [gate | up]."""
    n = x.shape[-1] // 2
    x2 = x.reshape(-1, 2 * n)
    out = torch.empty((x2.shape[0], n), dtype=x.dtype, device=x.device)
    if x2.shape[0]:
        block = min(1024, triton.next_power_of_2(n))
        grid = (x2.shape[0], triton.cdiv(n, block))
        _silu_mul_kernel[grid](
            x2, out, x2.stride(0), n, 0.0 if limit is None else float(limit),
            CLAMP=limit is not None, BLOCK=block,
        )  # fmt: skip
    return out.view(*x.shape[:-1], n)
