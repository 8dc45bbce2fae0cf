import os

import pytest
import torch
import torch.nn.functional as F

from models.layers import fused_moe as fm
from models.layers import fused_moe_host as host

INTERPRET = fm.HAS_TRITON and os.environ.get("TRITON_INTERPRET") == "1"
needs_interpreter = pytest.mark.skipif(not INTERPRET, reason="needs triton with TRITON_INTERPRET=1")


def naive(x, w13, w2, weights, ids):
    """Per-token, per-slot loop: the definition, in float64."""
    inter = w2.shape[2]
    x, w13, w2, weights = (a.double() for a in (x, w13, w2, weights))
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for k in range(ids.shape[1]):
            e = int(ids[t, k])
            if e < 0:
                continue
            gate, up = w13[e, :inter] @ x[t], w13[e, inter:] @ x[t]
            out[t] += weights[t, k] * (w2[e] @ (F.silu(gate) * up))
    return out


def make_inputs(t, h, inter, e, k, dtype=torch.float64, seed=0, device="cpu", unrouted=0.15):
    """Distinct experts per token (as top-k gives), expert e-1 never chosen, some ids -1."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(t, h, generator=g)
    w13 = torch.randn(e, 2 * inter, h, generator=g) / h**0.5
    w2 = torch.randn(e, h, inter, generator=g) / inter**0.5
    ids = torch.stack([torch.randperm(e - 1, generator=g)[:k] for _ in range(t)])
    ids = ids.reshape(t, k)
    ids[torch.rand(t, k, generator=g) < unrouted] = -1
    weights = torch.rand(t, k, generator=g)
    cast = lambda a: a.to(device=device, dtype=dtype)
    return cast(x), cast(w13), cast(w2), weights.to(device), ids.to(device)


@pytest.mark.parametrize("t,e,k", [(1, 4, 2), (7, 8, 2), (33, 16, 4), (64, 6, 3), (5, 3, 1)])
def test_torch_matches_naive(t, e, k):
    x, w13, w2, weights, ids = make_inputs(t, 24, 20, e, k)
    out = fm.fused_experts_torch(x, w13, w2, weights, ids)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, naive(x, w13, w2, weights, ids), rtol=1e-10, atol=1e-12)


def test_torch_repeated_expert_and_int32_ids():
    x, w13, w2, weights, _ = make_inputs(6, 16, 12, 5, 3)
    ids = torch.tensor([[0, 0, 1], [2, -1, 2], [-1, -1, -1], [4, 4, 4], [1, 3, 0], [0, 1, -1]])
    out = fm.fused_experts_torch(x, w13, w2, weights, ids.int())
    torch.testing.assert_close(out, naive(x, w13, w2, weights, ids), rtol=1e-10, atol=1e-12)
    assert out[2].abs().max() == 0


def test_torch_low_precision_and_edges():
    x, w13, w2, weights, ids = make_inputs(9, 64, 48, 8, 2, dtype=torch.bfloat16)
    out = fm.fused_experts_torch(x, w13, w2, weights, ids)
    ref = naive(x, w13, w2, weights, ids)
    assert out.dtype == torch.bfloat16
    assert (out.double() - ref).norm() / ref.norm() < 1e-2

    assert fm.fused_experts(x[:0], w13, w2, weights[:0], ids[:0]).shape == (0, 64)
    none = fm.fused_experts(x, w13, w2, weights, torch.full_like(ids, -1))
    assert none.abs().max() == 0


def test_shape_errors():
    x, w13, w2, weights, ids = make_inputs(3, 16, 8, 4, 2)
    with pytest.raises(ValueError, match="expert weight"):
        fm.fused_experts_torch(x, w13, w2[:, :, :4], weights, ids)
    with pytest.raises(ValueError, match="routing"):
        fm.fused_experts_torch(x, w13, w2, weights[:, :1], ids)


@needs_interpreter
@pytest.mark.parametrize("n,e,align", [(1, 4, 16), (24, 6, 16), (40, 3, 32), (300, 20, 64)])
def test_align_kernel_matches_torch(n, e, align):
    g = torch.Generator().manual_seed(n)
    ids = torch.randint(-1, e, (n,), generator=g)
    ids[ids == 1] = 2  # an expert with no pairs
    slots = host._num_slots(n, e, align)
    ref = host._align_torch(ids, e, align, slots)
    got = host._align(ids, e, align, slots)
    sorted_ref, expert_ref, rows_ref = ref
    assert torch.equal(got[1], expert_ref)
    assert torch.equal(got[2], rows_ref)
    real = (torch.arange(align) < rows_ref[:, None]).reshape(-1)
    assert torch.equal(got[0][real], sorted_ref[real])
    # every routed pair appears once, in its expert's blocks
    assert sorted(sorted_ref[real].tolist()) == torch.nonzero(ids >= 0).flatten().tolist()
    assert torch.equal(ids[sorted_ref[real].long()], expert_ref.repeat_interleave(rows_ref))


CONFIGS = [
    None,  # autotuned (the interpreter tries the first fitting config)
    dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=32, GROUP_M=1),
    dict(BLOCK_M=32, BLOCK_N=64, BLOCK_K=16, GROUP_M=4),
    dict(BLOCK_M=64, BLOCK_N=32, BLOCK_K=64, GROUP_M=8),
]


@needs_interpreter
@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("t,h,inter,e,k", [(1, 64, 32, 4, 2), (13, 40, 48, 6, 3)])
def test_triton_matches_torch(config, t, h, inter, e, k):
    x, w13, w2, weights, ids = make_inputs(t, h, inter, e, k, dtype=torch.float32, seed=t)
    out = fm.fused_experts_triton(x, w13, w2, weights, ids.int(), config=config)
    ref = fm.fused_experts_torch(x, w13, w2, weights, ids)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


@needs_interpreter
def test_triton_torch_align_path_and_half(monkeypatch):
    x, w13, w2, weights, ids = make_inputs(20, 32, 32, 5, 2, dtype=torch.float16, seed=3)
    ref = naive(x, w13, w2, weights, ids)
    monkeypatch.setattr(host, "_ALIGN_KERNEL_MAX_PAIRS", 0)
    out = fm.fused_experts_triton(x, w13, w2, weights, ids)
    assert out.dtype == torch.float16
    assert (out.double() - ref).norm() / ref.norm() < 1e-2
