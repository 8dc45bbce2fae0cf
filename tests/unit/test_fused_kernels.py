"""The fused decode kernels against the torch path they replace on CUDA, run here in
Triton's interpreter: rotary embedding fused with the KV-cache write."""

from __future__ import annotations

import os

import pytest
import torch

from models.layers.fused_moe_triton import HAS_TRITON
from models.layers.rope_store import cos_sin_table, rope_and_store
from models.layers.rotary import RotaryEmbedding

pytestmark = pytest.mark.skipif(
    not (HAS_TRITON and os.environ.get("TRITON_INTERPRET") == "1"),
    reason="needs triton with TRITON_INTERPRET=1",
)

BF16_TWO_ULPS = dict(rtol=2**-6, atol=2**-6)
ROPES = {
    "default": ({"rope_type": "default", "rope_theta": 10000.0}, 64),
    "llama3-partial": (
        {
            "rope_type": "llama3",
            "rope_theta": 500000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 32,
            "partial_rotary_factor": 0.5,
        },
        64,
    ),
    "yarn-scaled": (
        {
            "rope_type": "yarn",
            "rope_theta": 10000.0,
            "factor": 4.0,
            "original_max_position_embeddings": 32,
            "attention_factor": 1.3,
        },
        48,
    ),
}


@pytest.mark.parametrize("case", list(ROPES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rope_and_store_matches_rotary_then_store(case, dtype):
    params, head_dim = ROPES[case]
    rotary = RotaryEmbedding(head_dim, params, 128)
    g = torch.Generator().manual_seed(0)
    rows, heads, kv_heads, slots = 5, 4, 2, 16
    qkv = torch.randn(rows, (heads + 2 * kv_heads) * head_dim, generator=g).to(dtype)
    q, k, v = qkv.split([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], -1)
    q, k = q.view(rows, heads, head_dim), k.view(rows, kv_heads, head_dim)
    v = v.view(rows, kv_heads, head_dim)
    positions = torch.tensor([0, 7, 3, 100, 127])
    where = torch.tensor([3, 9, 1, 15, 0])  # 0: the sink a padding row writes
    want_q, want_k = rotary(positions, q.clone(), k.clone())
    want_kbuf = torch.zeros(slots, kv_heads, head_dim, dtype=dtype)
    want_vbuf = torch.zeros(slots, kv_heads, head_dim, dtype=dtype)
    want_kbuf[where], want_vbuf[where] = want_k, v
    table = cos_sin_table(rotary.inv_freq, rotary.attention_factor, 128)
    kbuf = torch.zeros(slots, kv_heads, head_dim, dtype=dtype)
    vbuf = torch.zeros(slots, kv_heads, head_dim, dtype=dtype)
    rope_and_store(q, k, v, positions, where, table, kbuf, vbuf)
    # float32 math, one rounding: within a bf16 ulp of torch's bf16 arithmetic
    tol = dict(rtol=0, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-2, atol=2e-2)
    torch.testing.assert_close(q, want_q, **tol)  # rotated in place, inside the qkv output
    torch.testing.assert_close(kbuf, want_kbuf, **tol)
    torch.testing.assert_close(vbuf, want_vbuf, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_residual", [False, True])
def test_rmsnorm_kernel_matches_the_torch_norm(dtype, with_residual):
    from models.layers.elementwise_triton import rmsnorm
    from models.layers.norm import RMSNorm

    g = torch.Generator().manual_seed(1)
    norm = RMSNorm(96, eps=1e-5).to(dtype)
    norm.weight.data.copy_(1 + 0.1 * torch.randn(96, generator=g))
    x = torch.randn(3, 4, 96, generator=g).to(dtype)  # rows of heads, as q/k norms see them
    residual = torch.randn(3, 4, 96, generator=g).to(dtype) if with_residual else None
    want = norm(x) if residual is None else norm(x, residual)
    got = rmsnorm(x, norm.weight, norm.eps, residual)
    if residual is None:
        want, got = (want,), (got,)
    for a, b in zip(got, want, strict=True):
        # the same order of roundings as the torch path; float32 arithmetic that differs in
        # the last bits (rsqrt, the sum's order) can move a rounding: two bf16 ulps (2**-6)
        tol = dict(rtol=0, atol=1e-5) if dtype == torch.float32 else BF16_TWO_ULPS
        torch.testing.assert_close(a, b, **tol)


@pytest.mark.parametrize("limit", [None, 1.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_silu_and_mul_kernel_matches_the_torch_activation(limit, dtype):
    from models.layers.activation import SiluAndMul
    from models.layers.elementwise_triton import silu_and_mul

    x = (2 * torch.randn(5, 2 * 1500, generator=torch.Generator().manual_seed(2))).to(dtype)
    want = SiluAndMul(limit)(x)
    if limit is not None:
        assert (x[:, :1500] > limit).float().mean() > 0.1  # the clamp fires
    tol = dict(rtol=0, atol=1e-5) if dtype == torch.float32 else BF16_TWO_ULPS
    torch.testing.assert_close(silu_and_mul(x, limit), want, **tol)
