"""The Triton fused-MoE kernel on a GPU against the torch reference path."""

import pytest
import torch

from models.layers import fused_moe as fm
from tests.unit.test_fused_moe import make_inputs


@pytest.mark.gpu
@pytest.mark.skipif(not (torch.cuda.is_available() and fm.HAS_TRITON), reason="needs CUDA")
@pytest.mark.parametrize("t", [1, 3, 16, 64, 300])
def test_triton_cuda_bf16(t):
    x, w13, w2, weights, ids = make_inputs(
        t, 512, 384, 16, 4, dtype=torch.float32, seed=t, device="cuda"
    )
    ref = fm.fused_experts_torch(x, w13, w2, weights, ids)
    bf = [a.bfloat16() for a in (x, w13, w2)]
    out = fm.fused_experts(*bf, weights, ids)
    assert out.dtype == torch.bfloat16
    assert ((out.float() - ref).norm() / ref.norm()).item() < 1e-2
    out32 = fm.fused_experts_triton(x, w13, w2, weights, ids)
    torch.testing.assert_close(out32, ref, rtol=1e-4, atol=1e-4)
