"""The MoE layer's expert backends (none, all2all) and the all-to-all exchanges on real gloo
ranks, against the single-process layer."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from engine.model_api import ModelContext, MoeSettings, ParallelState
from engine.model_api.parallel import all_reduce
from engine.model_api.weights import TensorSource
from engine.runtime.process_groups import destroy_parallel, init_parallel
from models.layers.moe import MoE
from models.layers.moe_weights import load_with_experts
from models.layers.router import softmax_topk
from tests.support.engine import free_port

HIDDEN, EXPERTS, INTER, TOP_K = 32, 8, 16, 2


def expert_weights(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = {"mlp.gate.weight": torch.randn(EXPERTS, HIDDEN, generator=g) / HIDDEN**0.5}
    for e in range(EXPERTS):
        for proj, shape in (("gate_proj", (INTER, HIDDEN)), ("up_proj", (INTER, HIDDEN))):
            out[f"mlp.experts.{e}.{proj}.weight"] = torch.randn(shape, generator=g) / HIDDEN**0.5
        out[f"mlp.experts.{e}.down_proj.weight"] = torch.randn(HIDDEN, INTER, generator=g) / 4
    return out


class Block(torch.nn.Module):
    def __init__(self, ctx: ModelContext) -> None:
        super().__init__()
        route = lambda logits, n: softmax_topk(logits, TOP_K, True, n)
        self.mlp = MoE(HIDDEN, EXPERTS, INTER, route, ctx)


def build_block(backend: str, parallel: ParallelState | None = None) -> Block:
    """The block on this spawned rank (`parallel`), or in one process."""
    block = Block(ModelContext(parallel or ParallelState.single(), MoeSettings(backend)))
    load_with_experts(block, ((k, TensorSource(v)) for k, v in expert_weights(7).items()))
    return block


# Rows per rank (and how many are real): rank 1 of the all2all case has none at all.
ROWS = {0: (6, 4), 1: (0, 0)}


def inputs() -> torch.Tensor:
    return torch.randn(8, HIDDEN, generator=torch.Generator().manual_seed(3))


def moe_worker(rank: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    state = init_parallel(rank, 2, 1, torch.device("cpu"), f"tcp://127.0.0.1:{port}", 60)
    try:
        x = inputs()
        with torch.inference_mode():
            none = build_block("none", state)
            assert none.mlp.partial
            full = all_reduce(none.mlp(x, 7), state.tp)
            a2a = build_block("all2all", state)
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


# The all2all exchanges: fixed capacity (equal splits, no host sync) against the variable
# split and the single-process experts. Rows per rank for 4 ranks (2 ranks take the first
# two), the bound passed as max_rows (None: the largest), and how pairs are routed.
A2A_CASES = {
    "mixed": ((5, 0, 7, 2), None, "mixed"),  # uneven, an empty rank, padding and -1 pairs
    "one_rank": ((3, 6, 1, 4), None, "last_rank"),  # every pair to one rank: C exactly full
    "slack": ((2, 3, 0, 1), 6, "mixed"),  # a bound above every rank's rows
    "idle": ((0, 0, 0, 0), None, "mixed"),  # nobody has rows: nothing to exchange
    "idle_bound": ((0, 0, 0, 0), 2, "mixed"),  # ... or only empty slots
}


def a2a_routing(case: str, nprocs: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Every rank's rows, concatenated: (hidden, topk_weights, topk_ids)."""
    counts, _, kind = A2A_CASES[case]
    n = sum(counts[:nprocs])
    g = torch.Generator().manual_seed(11)
    hidden = torch.randn(n, HIDDEN, generator=g)
    weights = torch.rand(n, TOP_K, generator=g) + 0.1
    if kind == "last_rank":  # the last rank owns the last EXPERTS / nprocs >= TOP_K experts
        ids = torch.tensor([[EXPERTS - 1, EXPERTS - 2]] * n)
        ids[1::2] = ids[1::2].flip(1)
        return hidden, weights, ids
    ids = torch.zeros(n, TOP_K, dtype=torch.long)
    for row in ids:
        row.copy_(torch.randperm(EXPERTS, generator=g)[:TOP_K])
    ids[torch.rand(n, TOP_K, generator=g) < 0.2] = -1  # single -1 pairs
    ends = torch.tensor(counts[:nprocs]).cumsum(0)
    last = ends[torch.tensor(counts[:nprocs]) > 0] - 1
    ids[last], weights[last] = -1, 0.0  # each rank's last row is padding
    return hidden, weights, ids


def rank_rows(case: str, nprocs: int, rank: int) -> slice:
    counts = A2A_CASES[case][0][:nprocs]
    start = sum(counts[:rank])
    return slice(start, start + counts[rank])


def a2a_worker(rank: int, nprocs: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    state = init_parallel(rank, nprocs, 1, torch.device("cpu"), f"tcp://127.0.0.1:{port}", 60)
    try:
        experts = build_block("all2all", state).mlp.experts
        taken: list[str] = []  # which exchange each call took

        def spy(name: str) -> None:
            method = getattr(experts, name)

            def record(*args):
                taken.append(name)
                return method(*args)

            setattr(experts, name, record)

        spy("_fixed_capacity")
        spy("_variable_split")
        got = {}
        with torch.inference_mode():
            for case, (counts, bound, _) in A2A_CASES.items():
                hidden, weights, ids = a2a_routing(case, nprocs)
                mine = rank_rows(case, nprocs, rank)
                args = (hidden[mine], weights[mine], ids[mine])
                max_rows = max(counts[:nprocs]) if bound is None else bound
                taken.clear()
                fixed = experts(*args, max_rows=max_rows)
                variable = experts(*args)  # no bound: the variable split
                assert taken == ["_fixed_capacity", "_variable_split"], (case, taken)
                got[case] = (fixed, variable)
            # a step above the bound takes the variable split on every rank
            experts.max_fixed_slots = 4 * TOP_K * nprocs - 1
            hidden, weights, ids = a2a_routing("mixed", nprocs)
            mine = rank_rows("mixed", nprocs, rank)
            taken.clear()
            large = experts(hidden[mine], weights[mine], ids[mine], max_rows=7)
            small = experts(hidden[mine][:3], weights[mine][:3], ids[mine][:3], max_rows=3)
            assert taken == ["_variable_split", "_fixed_capacity"], taken
            assert experts.fixed_capacity(3, TOP_K) == 3 * TOP_K
            assert experts.fixed_capacity(4, TOP_K) is None
            assert experts.fixed_capacity(None, TOP_K) is None
            got["large"], got["small"] = large, small
            # the bf16 message carries each id in two columns
            bf16 = build_block("all2all", state).mlp.experts.to(torch.bfloat16)
            hidden, weights, ids = a2a_routing("mixed", nprocs)
            args = (hidden[mine].bfloat16(), weights[mine], ids[mine])
            got["bf16"] = (bf16(*args, max_rows=7), bf16(*args))
        torch.save(got, Path(out_dir) / f"a2a{rank}.pt")
    finally:
        destroy_parallel()


@pytest.mark.parametrize("nprocs", [2, 4])
def test_fixed_capacity_all_to_all_matches_variable_split(tmp_path, nprocs):
    mp.spawn(a2a_worker, args=(nprocs, free_port(), str(tmp_path)), nprocs=nprocs, join=True)
    single = build_block("none").mlp.experts
    results = [torch.load(tmp_path / f"a2a{rank}.pt") for rank in range(nprocs)]
    for case in A2A_CASES:
        hidden, weights, ids = a2a_routing(case, nprocs)
        with torch.inference_mode():
            reference = single(hidden, weights, ids)
        for rank, got in enumerate(results):
            fixed, variable = got[case]
            want = reference[rank_rows(case, nprocs, rank)]
            assert fixed.shape == want.shape, (case, rank)
            torch.testing.assert_close(fixed, want, rtol=0, atol=1e-5, msg=f"{case} {rank}")
            torch.testing.assert_close(variable, want, rtol=0, atol=1e-5)
            torch.testing.assert_close(fixed, variable, rtol=0, atol=1e-5)
    hidden, weights, ids = a2a_routing("mixed", nprocs)
    with torch.inference_mode():
        reference = single(hidden, weights, ids)
        bf16 = single.to(torch.bfloat16)(hidden.bfloat16(), weights, ids).float()
    assert reference.abs().sum(-1).gt(0).sum() >= 3  # the routing reaches experts
    for rank, got in enumerate(results):
        want = reference[rank_rows("mixed", nprocs, rank)]
        torch.testing.assert_close(got["large"], want, rtol=0, atol=1e-5)
        torch.testing.assert_close(got["small"], want[:3], rtol=0, atol=1e-5)
        fixed, variable = got["bf16"]
        assert fixed.dtype == torch.bfloat16
        torch.testing.assert_close(fixed, variable, rtol=0.02, atol=0.02)
        want = bf16[rank_rows("mixed", nprocs, rank)]
        torch.testing.assert_close(fixed.float(), want, rtol=0.02, atol=0.02)
