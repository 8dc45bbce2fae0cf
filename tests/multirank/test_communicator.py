"""The layer communicator on 4 real gloo ranks, every scatter-mode combination the plan can
produce, against the same arithmetic on whole rows; and the shard-local count that a
model gets (never for a self-managed one: SGLang issue #38606)."""

from __future__ import annotations

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

from engine.model_api import ForwardBatch, ForwardMode, MoeSettings, ParallelState, RankGroup
from engine.model_api.communicator import LayerCommunicator, ScatterMode, final_norm, mlp_mode
from engine.model_api.parallel import get_parallel, split_bounds
from engine.runtime.process_groups import destroy_parallel, init_parallel
from engine.runtime.step_layout import non_padded_count
from tests.support.batches import make_batch
from tests.support.engine import free_port

HIDDEN = 4


class Double(nn.Module):
    """A stand-in norm that is easy to follow: 2x, with the residual add fused in."""

    def forward(self, x, residual=None):
        if residual is None:
            return 2 * x
        return 2 * (x + residual), x + residual


def group_rows(group: int, rows: int) -> torch.Tensor:
    return torch.randn(rows, HIDDEN, generator=torch.Generator().manual_seed(100 + group))


def step_batch(
    rows: list[int],
    real: list[int],
    gather: bool,
    mlp_gather: bool,
    buffer_rows: int = 64,
    p: ParallelState | None = None,
) -> ForwardBatch:
    """Rank `p`'s view (this rank's by default) of a step where DP group g has rows[g]
    padded rows, real[g] real."""
    p = p or get_parallel()
    g = p.attn_dp_rank
    return make_batch(
        ForwardMode.EXTEND if real[g] else ForwardMode.IDLE,
        real[g],
        rows=rows[g],
        num_token_non_padded=non_padded_count(real[g], rows[g], p.attn_tp, gather),
        gathered_buffer=torch.full((buffer_rows, HIDDEN), float("nan")),
        global_num_tokens=rows,
        attn_tp_gather=gather,
        mlp_tp_gather=mlp_gather,
    )


def shard(x: torch.Tensor) -> torch.Tensor:
    p = get_parallel()
    start, end = split_bounds(x.shape[0], p.attn_tp_size, p.attn_tp_rank)
    return x[start:end]


def weight(rank: int, size: int) -> float:
    """Rank r's share of a partial sum; the shares of a group add up to 1."""
    return (rank + 1) / (size * (size + 1) / 2)


def check_case(
    rows: list[int],
    real: list[int],
    gather: bool,
    mlp_gather: bool,
    mode: ScatterMode,
    buffer_rows: int = 64,
) -> None:
    """One layer and the final norm; every tensor checked against whole-row arithmetic:
    with the 2x norm, a partial attention summing to its input and an MLP halving its
    input, the stream goes X -> (2X | X) -> (6X | 3X) -> 3X -> final 12X."""
    p = get_parallel()
    batch = step_batch(rows, real, gather, mlp_gather, buffer_rows)
    x = group_rows(p.attn_dp_rank, rows[p.attn_dp_rank])
    stream = shard if gather else (lambda t: t)
    backend = "all2all" if mode is ScatterMode.SCATTERED else "none"
    comm = LayerCommunicator(Double(), Double(), mlp_mode(True, MoeSettings(backend)), p)
    assert comm.mlp_mode is mode
    where = f"rows={rows} gather={gather} mlp_gather={mlp_gather} {mode} rank {p.rank}"

    hidden, residual = comm.prepare_attn(x, None, batch)
    torch.testing.assert_close(hidden, 2 * x, msg=where)
    torch.testing.assert_close(residual, stream(x), msg=where)
    if gather and x.shape[0]:
        # gathered into the buffer, unless the step is larger than the buffer
        in_buffer = hidden.data_ptr() == batch.gathered_buffer.data_ptr()
        assert in_buffer == (x.shape[0] <= buffer_rows), where

    partial = hidden * weight(p.attn_tp_rank, p.attn_tp_size)
    mlp_in, residual, valid = comm.prepare_mlp(partial, residual, batch)
    torch.testing.assert_close(residual, stream(3 * x), msg=where)
    if mode is ScatterMode.SCATTERED:
        torch.testing.assert_close(mlp_in, stream(6 * x), msg=where)
        start = split_bounds(x.shape[0], p.attn_tp_size, p.attn_tp_rank)[0] if gather else 0
        assert valid == min(max(real[p.attn_dp_rank] - start, 0), mlp_in.shape[0]), where
        out = mlp_in / 2
    else:
        if mlp_gather:
            every = torch.cat([group_rows(g, n) for g, n in enumerate(rows)])
            torch.testing.assert_close(mlp_in, 6 * every, msg=where)
            assert valid is None, where
        else:
            torch.testing.assert_close(mlp_in, 6 * x, msg=where)
            # full-width input: the group's count, never a shard-local one
            assert valid == real[p.attn_dp_rank], where
        out = mlp_in / 2 * weight(p.rank, p.tp_size)
    hidden, residual = comm.postprocess_mlp(out, residual, batch)
    torch.testing.assert_close(hidden, stream(3 * x), msg=where)
    final = final_norm(Double(), hidden, residual, batch, p.attn_tp)
    torch.testing.assert_close(final, 12 * x, msg=where)


# (rows per DP group, real rows per DP group, attn_tp_gather, mlp_tp_gather, MLP mode);
# gathered steps have rows divisible by attn_tp_size, as the plan's padding makes them.
DP2_CASES = [
    ([6, 2], [5, 1], True, True, ScatterMode.FULL),
    ([4, 0], [3, 0], True, True, ScatterMode.FULL),  # group 1 idle
    ([6, 2], [5, 2], True, True, ScatterMode.SCATTERED),
    ([2, 0], [1, 0], True, False, ScatterMode.SCATTERED),
    ([5, 3], [5, 2], False, True, ScatterMode.FULL),  # rows split unevenly in the DP gather
    ([3, 0], [3, 0], False, True, ScatterMode.FULL),
]
TP4_CASES = [
    ([8], [5], True, False, ScatterMode.FULL),
    ([8], [5], True, False, ScatterMode.FULL, 4),  # a prefill larger than the buffer
    ([8], [5], True, False, ScatterMode.SCATTERED),
    ([4], [1], True, False, ScatterMode.SCATTERED),  # three ranks without real rows
    ([5], [5], False, False, ScatterMode.FULL),
]


def worker(rank: int, ports: tuple[int, int]) -> None:
    torch.set_num_threads(1)
    for dp, port, cases in ((2, ports[0], DP2_CASES), (1, ports[1], TP4_CASES)):
        init_parallel(rank, 4, dp, torch.device("cpu"), f"tcp://127.0.0.1:{port}", 60)
        try:
            for case in cases:
                check_case(*case)
        finally:
            destroy_parallel()


@pytest.mark.slow
def test_scatter_modes_on_four_ranks():
    mp.spawn(worker, args=((free_port(), free_port()),), nprocs=4, join=True)


def attn_tp_rank(rank: int, size: int) -> ParallelState:
    """Rank `rank` of a `size`-way attention-TP group (no process group: nothing is sent)."""
    group = lambda name: RankGroup(name, rank, size)
    return ParallelState(rank, group("tp"), group("attn_tp"), 0, 1, torch.device("cpu"))


def test_scattered_mlp_without_gather_is_refused_when_attention_tp_is_split():
    state = attn_tp_rank(0, 2)
    comm = LayerCommunicator(Double(), Double(), mlp_mode(True, MoeSettings("all2all")), state)
    batch = step_batch([4], [3], False, False, p=state)
    with pytest.raises(RuntimeError, match="needs the plan's attn_tp_gather"):
        comm.prepare_mlp(torch.zeros(4, HIDDEN), torch.zeros(4, HIDDEN), batch)


def test_self_managed_model_never_gets_a_shard_local_count():
    """Under ``--attn-tp-gather on`` both plans gather; only the communicator model's count
    becomes shard-local. A shard-local count reaching a self-managed model's full-width
    MoE input is how Hunyuan-V4 computed one token in every attn_tp_size."""
    from engine.messages import Launch, ModelSource, Request, SamplingParams
    from engine.runtime.model_runner import ModelRunner
    from engine.runtime.scheduler import Batch
    from engine.runtime.sequence import Sequence
    from engine.server_args import ServerArgs
    from models.llama import LlamaForCausalLM
    from registry import (
        ParallelCapabilities,
        get_model_info,
        register_model,
        reset_model_registry,
        resolve_plan,
    )

    class SelfManagedLlama(LlamaForCausalLM):
        parallel_capabilities = ParallelCapabilities(self_managed_sp=True)

    # rank 1 of attention-TP 2; a 5-token prefill padded to 6 rows: its shard holds 2 real
    state = attn_tp_rank(1, 2)
    register_model("SelfManagedLlama", SelfManagedLlama)
    try:
        for name, expected in (("LlamaForCausalLM", 2), ("SelfManagedLlama", 5)):
            argv = ["--model", name, "--tp-size", "2", "--moe-a2a-backend", "all2all"]
            args = ServerArgs.from_cli(
                [*argv, "--attn-tp-gather", "on", "--max-total-tokens", "64"]
            )
            plan = resolve_plan(get_model_info(name).capabilities, args)
            assert plan.attn_tp_gather.value and plan.token_alignment == 2
            source = ModelSource(name, LlamaForCausalLM.tiny_config(), None)
            runner = ModelRunner(Launch(args, plan, source, "", frozenset()), state)
            seq = Sequence(Request.make(0, [1, 2, 3, 4, 5], SamplingParams(max_new_tokens=2), 0))
            seq.slots, seq.row = runner.kv.alloc(seq.budget), runner.table.alloc()
            runner.table.write(seq.row, 0, seq.slots)
            layout = runner.layouter.local(ForwardMode.EXTEND, 5)
            assert layout.rows == 6
            batch = runner.prepare(Batch(ForwardMode.EXTEND, [seq]), layout)
            assert batch.attn_tp_gather and batch.num_tokens == 5
            assert batch.num_token_non_padded == expected, name
    finally:
        reset_model_registry()
