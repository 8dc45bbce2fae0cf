"""Routing against transformers 5.23's routers, and the all-to-all message's id encoding."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from models.layers.moe import _bits_as
from models.layers.router import grouped_topk, softmax_topk

HIDDEN, EXPERTS, INTER, TOP_K = 32, 8, 16, 2


def by_expert(weights: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's (id, weight) pairs sorted by id, so unsorted top-k compares equal."""
    ids, order = ids.long().sort(dim=-1)
    return weights.gather(1, order), ids


@pytest.mark.parametrize("norm", [True, False])
def test_softmax_topk_matches_qwen3_moe_router(norm):
    import transformers
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeTopKRouter

    config = transformers.Qwen3MoeConfig(
        hidden_size=HIDDEN, num_experts=EXPERTS, num_experts_per_tok=TOP_K, norm_topk_prob=norm
    )
    router = Qwen3MoeTopKRouter(config)
    g = torch.Generator().manual_seed(0)
    router.weight.data = torch.randn(EXPERTS, HIDDEN, generator=g)
    hidden = torch.randn(40, HIDDEN, generator=g)
    _, ref_weights, ref_ids = router(hidden)
    weights, ids = softmax_topk(F.linear(hidden, router.weight), TOP_K, norm)
    assert torch.equal(ids, ref_ids.long())
    torch.testing.assert_close(weights, ref_weights, rtol=0, atol=1e-6)
    if norm:
        torch.testing.assert_close(weights.sum(-1), torch.ones(40))


@pytest.mark.parametrize("norm", [True, False])
def test_grouped_topk_matches_deepseek_v3_router(norm):
    import transformers
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3TopkRouter

    config = transformers.DeepseekV3Config(
        hidden_size=HIDDEN,
        n_routed_experts=16,
        num_experts_per_tok=4,
        n_group=4,
        topk_group=2,
        routed_scaling_factor=2.5,
        norm_topk_prob=norm,
    )
    router = DeepseekV3TopkRouter(config)
    g = torch.Generator().manual_seed(1)
    router.weight.data = torch.randn(16, HIDDEN, generator=g)
    # a bias large enough to change choices: routing must pick by biased, weigh by raw
    router.e_score_correction_bias.data = torch.randn(16, generator=g)
    hidden = torch.randn(64, HIDDEN, generator=g)
    _, ref_weights, ref_ids = router(hidden)
    logits = F.linear(hidden.float(), router.weight.float())
    weights, ids = grouped_topk(logits, 4, 4, 2, router.e_score_correction_bias, 2.5, norm)
    ours, ref = by_expert(weights, ids), by_expert(ref_weights, ref_ids)
    assert torch.equal(ours[1], ref[1])
    torch.testing.assert_close(ours[0], ref[0], rtol=0, atol=1e-6)
    unbiased = grouped_topk(logits, 4, 4, 2, None, 2.5, norm)[1]
    assert not torch.equal(unbiased.sort(-1)[0], ids.sort(-1)[0])  # the bias mattered
    assert all(len(set(row.tolist())) <= 2 for row in ids // 4)  # at most topk_group groups


def test_rows_past_num_valid_route_nowhere():
    logits = torch.randn(5, EXPERTS)
    weights, ids = softmax_topk(logits, TOP_K, True, num_valid=3)
    assert (ids[3:] == -1).all() and (weights[3:] == 0).all() and (ids[:3] >= 0).all()
    weights, ids = grouped_topk(logits, 2, 2, 1, None, 1.0, True, num_valid=0)
    assert (ids == -1).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_expert_ids_survive_the_message_dtype(dtype):
    ids = torch.tensor([-1, 0, 1, 127, 255, 2**20])
    id_dtype = torch.int32 if dtype.itemsize <= 4 else torch.int64
    cols = _bits_as(ids.to(id_dtype), dtype)
    assert cols.dtype == dtype and cols.shape == (6, id_dtype.itemsize // dtype.itemsize)
    assert torch.equal(cols.clone().contiguous().view(id_dtype).reshape(-1).long(), ids)
