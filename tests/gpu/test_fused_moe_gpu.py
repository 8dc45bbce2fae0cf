"""The Triton fused-MoE kernel on a GPU against the torch reference path, token row by token
row: at the benchmark's expert shapes for every token bucket the autotuner keys on, with
every tile config it may pick, and with unrouted ids in fp32.

Tolerance per row: ROW_TOL = 2u, u = 2^-8 the unit roundoff of bf16. The reference runs in
fp32 on the same bf16-rounded inputs (TF32 off). The kernel's products are exact and its
sums fp32; what rounds is the SiLU-and-mul activation stored in bf16 (each element within u,
so about u / sqrt(3) relative rms after the down projection's random mix) and the output
(u / sqrt(3) rms): about 0.8u together, 2u leaves a factor 2.4. A wrong expert, a lost or
doubled (token, k) pair or a tile reading a neighbour's rows moves a row by far more.
"""

from __future__ import annotations

import functools

import pytest
import torch

from bench.bench_fused_moe import SHAPES
from models.layers import fused_moe as fm
from tests.unit.test_fused_moe import make_inputs

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not (torch.cuda.is_available() and fm.HAS_TRITON), reason="needs CUDA"),
]

U = 2.0**-8
ROW_TOL = 2 * U
TOP_K = 8  # both bench shapes route 8 experts per token
MAX_BUCKET = 8192  # fused_moe_host._MAX_BUCKET: the autotuner's largest row bucket
# one token count per power-of-two row bucket (t * TOP_K rows: 8 .. 8192), plus counts in
# the middle of a bucket and one past the largest
TOKENS = [2**i for i in range(MAX_BUCKET.bit_length() - TOP_K.bit_length() + 1)] + [3, 300, 1500]


@pytest.fixture(autouse=True)
def fp32_reference():
    """The reference's fp32 matmuls stay fp32 (no TF32)."""
    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = before


@functools.lru_cache(maxsize=1)  # one shape's weights on the GPU at a time
def experts(shape: str) -> tuple[torch.Tensor, torch.Tensor]:
    """bf16 expert weights of a bench shape, drawn on the CPU from a fixed seed."""
    h, inter, e, _ = SHAPES[shape]
    gen = torch.Generator().manual_seed(0)
    w13 = (torch.randn(e, 2 * inter, h, generator=gen) * h**-0.5).bfloat16().cuda()
    w2 = (torch.randn(e, h, inter, generator=gen) * inter**-0.5).bfloat16().cuda()
    return w13, w2


def bench_inputs(shape: str, t: int):
    """t bf16 tokens and their top-8 routing (weights renormalised), drawn on the CPU."""
    h, _, e, _ = SHAPES[shape]
    gen = torch.Generator().manual_seed(t)
    x = torch.randn(t, h, generator=gen).bfloat16().cuda()
    weights, ids = torch.randn(t, e, generator=gen).softmax(-1).topk(TOP_K, dim=-1)
    weights = weights / weights.sum(-1, keepdim=True)
    return x, *experts(shape), weights.cuda(), ids.cuda()


def row_errors(out: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """Relative error of each token row; a row the reference leaves zero must be zero."""
    diff = (out.float() - ref).norm(dim=1)
    norm = ref.norm(dim=1)
    return torch.where(norm > 0, diff / norm.clamp_min(1e-30), diff)


def assert_rows_close(out: torch.Tensor, ref: torch.Tensor, what: str) -> None:
    errors = row_errors(out, ref)
    worst = int(errors.argmax())
    assert errors[worst] < ROW_TOL, (
        f"{what}: {int((errors >= ROW_TOL).sum())} of {len(errors)} rows off by more than "
        f"{ROW_TOL:.4f}; row {worst}: {errors[worst]:.4f}"
    )


def reference(x, w13, w2, weights, ids) -> torch.Tensor:
    return fm.fused_experts_torch(x.float(), w13.float(), w2.float(), weights, ids)


@pytest.mark.parametrize("t", TOKENS)
@pytest.mark.parametrize("shape", list(SHAPES))
def test_autotuned_kernel_per_row_at_bench_shapes(shape, t):
    """What the model runs: the autotuned config of this row bucket, bf16."""
    x, w13, w2, weights, ids = bench_inputs(shape, t)
    out = fm.fused_experts(x, w13, w2, weights, ids)
    assert out.dtype == torch.bfloat16 and out.shape == x.shape
    assert_rows_close(out, reference(x, w13, w2, weights, ids), f"{shape}, {t} tokens")


@pytest.mark.parametrize("shape", list(SHAPES))
def test_every_tile_config_per_row(shape):
    """Each config the autotuner may choose, run directly: a decode step, a small prefill
    and a larger one."""
    from models.layers.fused_moe_triton import _CONFIGS

    for t in (1, 37, 512):
        x, w13, w2, weights, ids = bench_inputs(shape, t)
        ref = reference(x, w13, w2, weights, ids)
        for cfg in _CONFIGS:
            config = {**cfg.kwargs, "num_warps": cfg.num_warps, "num_stages": cfg.num_stages}
            out = fm.fused_experts_triton(x, w13, w2, weights, ids, config=config)
            assert_rows_close(out, ref, f"{shape}, {t} tokens, config {config}")


@pytest.mark.parametrize("t", [1, 3, 16, 64, 300])
def test_unrouted_ids_bf16_and_fp32(t):
    """Ids of -1 (some tokens routed nowhere, whose rows stay zero), expert E-1 never used;
    bf16 per row, and the fp32 kernel (IEEE dot products) to 1e-4."""
    x, w13, w2, weights, ids = make_inputs(
        t, 512, 384, 16, 4, dtype=torch.float32, seed=t, device="cuda"
    )
    ref = fm.fused_experts_torch(x, w13, w2, weights, ids)
    bf = [a.bfloat16() for a in (x, w13, w2)]
    out = fm.fused_experts(*bf, weights, ids)
    assert out.dtype == torch.bfloat16
    assert_rows_close(out, fm.fused_experts_torch(*(a.float() for a in bf), weights, ids), "bf16")
    out32 = fm.fused_experts_triton(x, w13, w2, weights, ids)
    torch.testing.assert_close(out32, ref, rtol=1e-4, atol=1e-4)
