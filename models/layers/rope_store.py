"""Rotary embedding fused with the KV-cache write: one kernel rotates a step's q in place
and writes its rotated k, and v, into the paged pool at the step's slots.

The torch path is the reference and the CPU path: `RotaryEmbedding.forward`, then
`KVPool.store` in the attention layer. The Triton kernel (`rope_and_store`) runs on CUDA
for the rope types whose cos/sin depend on the position alone (not "dynamic", not
interleaved), reading them from a float32 table shared by the layers; it computes in
float32 and rounds once.
"""

from __future__ import annotations

import torch

from models.layers.fused_moe_triton import HAS_TRITON

if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _rope_store_kernel(
        q_ptr,
        k_ptr,
        v_ptr,
        pos_ptr,
        slot_ptr,
        cos_sin_ptr,
        kbuf_ptr,
        vbuf_ptr,
        q_stride_t,
        q_stride_h,
        k_stride_t,
        k_stride_h,
        v_stride_t,
        v_stride_h,
        kbuf_stride_s,
        kbuf_stride_h,
        vbuf_stride_s,
        vbuf_stride_h,
        num_q_heads,
        HEAD_DIM: tl.constexpr,
        V_DIM: tl.constexpr,
        HALF: tl.constexpr,  # rotary_dim // 2
        BLOCK: tl.constexpr,
        V_BLOCK: tl.constexpr,
    ):
        t = tl.program_id(0).to(tl.int64)
        head = tl.program_id(1)
        pos = tl.load(pos_ptr + t)
        lanes = tl.arange(0, BLOCK)
        # pair (i, i + HALF) of the first 2*HALF channels rotates; the rest passes through
        first = lanes < HALF
        second = (lanes >= HALF) & (lanes < 2 * HALF)
        freq = tl.where(first, lanes, lanes - HALF)
        rotated = first | second
        cos = tl.load(cos_sin_ptr + pos * 2 * HALF + freq, mask=rotated, other=1.0)
        sin = tl.load(cos_sin_ptr + pos * 2 * HALF + HALF + freq, mask=rotated, other=0.0)
        partner = tl.where(first, lanes + HALF, lanes - HALF)
        sign = tl.where(first, -1.0, 1.0)
        in_head = lanes < HEAD_DIM
        if head < num_q_heads:
            base = q_ptr + t * q_stride_t + head * q_stride_h
        else:
            base = k_ptr + t * k_stride_t + (head - num_q_heads) * k_stride_h
        x = tl.load(base + lanes, mask=in_head, other=0.0).to(tl.float32)
        other = tl.load(base + partner, mask=rotated, other=0.0).to(tl.float32)
        out = tl.where(rotated, x * cos + sign * other * sin, x)
        if head < num_q_heads:
            tl.store(base + lanes, out.to(q_ptr.dtype.element_ty), mask=in_head)
        else:
            kv_head = head - num_q_heads
            slot = tl.load(slot_ptr + t)
            kdst = kbuf_ptr + slot * kbuf_stride_s + kv_head * kbuf_stride_h
            tl.store(kdst + lanes, out.to(kbuf_ptr.dtype.element_ty), mask=in_head)
            vlanes = tl.arange(0, V_BLOCK)
            vin = vlanes < V_DIM
            vals = tl.load(v_ptr + t * v_stride_t + kv_head * v_stride_h + vlanes, mask=vin)
            vdst = vbuf_ptr + slot * vbuf_stride_s + kv_head * vbuf_stride_h
            tl.store(vdst + vlanes, vals.to(vbuf_ptr.dtype.element_ty), mask=vin)


def cos_sin_table(inv_freq: torch.Tensor, attention_factor: float, max_positions: int):
    """[max_positions, rotary_dim] float32: cos of each position's frequencies, then sin,
    scaled by the attention factor as `RotaryEmbedding.cos_sin` scales them."""
    positions = torch.arange(max_positions, dtype=torch.float32, device=inv_freq.device)
    freqs = positions[:, None] * inv_freq.float()[None, :]
    return torch.cat([freqs.cos(), freqs.sin()], dim=-1) * attention_factor


def rope_and_store(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    positions: torch.Tensor,
    slots: torch.Tensor,
    cos_sin: torch.Tensor,
    k_buf: torch.Tensor,
    v_buf: torch.Tensor,
) -> None:
    """q [T, Hq, D] rotated in place; k [T, Hk, D] rotated into `k_buf[slots]`, v [T, Hk, Dv]
    into `v_buf[slots]` (buffers [S, Hk, D]); rotary_dim is `cos_sin.shape[1]`, NeoX halves."""
    rows, num_q = q.shape[0], q.shape[1]
    if rows == 0:
        return
    head_dim, v_dim, half = q.shape[2], v.shape[2], cos_sin.shape[1] // 2
    if q.stride(2) != 1 or k.stride(2) != 1 or v.stride(2) != 1:
        raise ValueError("rope_and_store needs the head dim contiguous")
    grid = (rows, num_q + k.shape[1])
    _rope_store_kernel[grid](
        q, k, v, positions, slots, cos_sin, k_buf, v_buf,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        k_buf.stride(0), k_buf.stride(1), v_buf.stride(0), v_buf.stride(1), num_q,
        HEAD_DIM=head_dim, V_DIM=v_dim, HALF=half,
        BLOCK=triton.next_power_of_2(head_dim), V_BLOCK=triton.next_power_of_2(v_dim),
    )  # fmt: skip
