"""Routing against transformers 5.23's routers, and the MoE layer's expert backends (none,
all2all) on real gloo ranks against the single-process layer."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F

from engine.communicator import MoeSettings, use_moe_settings
from engine.distributed import all_reduce, destroy_parallel, init_parallel
from engine.loader import TensorSource
from models.layers.moe import MoE, load_with_experts
from models.layers.router import grouped_topk, softmax_topk
from tests.engine_helpers import free_port

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


def expert_weights(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = {"mlp.gate.weight": torch.randn(EXPERTS, HIDDEN, generator=g) / HIDDEN**0.5}
    for e in range(EXPERTS):
        for proj, shape in (("gate_proj", (INTER, HIDDEN)), ("up_proj", (INTER, HIDDEN))):
            out[f"mlp.experts.{e}.{proj}.weight"] = torch.randn(shape, generator=g) / HIDDEN**0.5
        out[f"mlp.experts.{e}.down_proj.weight"] = torch.randn(HIDDEN, INTER, generator=g) / 4
    return out


class Block(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        route = lambda logits, n: softmax_topk(logits, TOP_K, True, n)
        self.mlp = MoE(HIDDEN, EXPERTS, INTER, route)


def build_block(backend: str) -> Block:
    with use_moe_settings(MoeSettings(backend, None)):
        block = Block()
    load_with_experts(block, ((k, TensorSource(v)) for k, v in expert_weights(7).items()))
    return block


# Rows per rank (and how many are real): rank 1 of the all2all case has none at all.
ROWS = {0: (6, 4), 1: (0, 0)}


def inputs() -> torch.Tensor:
    return torch.randn(8, HIDDEN, generator=torch.Generator().manual_seed(3))


def moe_worker(rank: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    init_parallel(rank, 2, 1, torch.device("cpu"), f"tcp://127.0.0.1:{port}", 60)
    try:
        x = inputs()
        with torch.inference_mode():
            none = build_block("none")
            assert none.mlp.partial
            full = all_reduce(none.mlp(x, 7), "tp")
            a2a = build_block("all2all")
            assert not a2a.mlp.partial and a2a.mlp.experts.w13.shape[0] == EXPERTS // 2
            rows, valid = ROWS[rank]
            start = 0 if rank == 0 else 6
            mine = a2a.mlp(x[start : start + rows], valid)
        torch.save({"none": full, "a2a": mine}, Path(out_dir) / f"rank{rank}.pt")
    finally:
        destroy_parallel()


def test_expert_backends_match_single_process(tmp_path):
    mp.spawn(moe_worker, args=(free_port(), str(tmp_path)), nprocs=2, join=True)
    single = build_block("none")
    assert not single.mlp.partial
    with torch.inference_mode():
        reference = single.mlp(inputs(), 7)
    assert reference[:7].abs().sum(dim=-1).gt(0).all()
    assert (reference[7:] == 0).all()  # padding rows produce nothing
    for rank in (0, 1):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        torch.testing.assert_close(got["none"], reference, rtol=0, atol=1e-5)
        rows, valid = ROWS[rank]
        assert got["a2a"].shape == (rows, HIDDEN)
        torch.testing.assert_close(got["a2a"][:valid], reference[:valid], rtol=0, atol=1e-5)
        assert (got["a2a"][valid:] == 0).all()
