"""The layer communicator on 4 real gloo ranks, every scatter-mode combination the plan can
produce, against the same arithmetic on whole rows; and the shard-local count that a
model gets (never for a self-managed one: SGLang issue #38606)."""

from __future__ import annotations

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

from engine.communicator import (
    LayerCommunicator,
    MoeSettings,
    ScatterMode,
    final_norm,
    split_bounds,
    use_moe_settings,
)
from engine.distributed import (
    ParallelState,
    destroy_parallel,
    get_parallel,
    init_parallel,
    set_parallel,
    single_process_state,
)
from engine.forward_batch import ForwardBatch, ForwardMode
from engine.model_runner import num_token_non_padded
from tests.engine_helpers import free_port

HIDDEN = 4


class Double(nn.Module):
    """A stand-in norm that is easy to follow: 2x, with the residual add fused in."""

    def forward(self, x, residual=None):
        if residual is None:
            return 2 * x
        return 2 * (x + residual), x + residual


def group_rows(group: int, rows: int) -> torch.Tensor:
    return torch.randn(rows, HIDDEN, generator=torch.Generator().manual_seed(100 + group))


def make_batch(
    rows: list[int], real: list[int], gather: bool, mlp_gather: bool, buffer_rows: int = 64
) -> ForwardBatch:
    """This rank's view of a step where DP group g has rows[g] padded rows, real[g] real."""
    p = get_parallel()
    g = p.attn_dp_rank
    zeros = torch.zeros(rows[g], dtype=torch.int64)
    return ForwardBatch(
        mode=ForwardMode.EXTEND if real[g] else ForwardMode.IDLE,
        input_ids=zeros,
        positions=zeros,
        out_cache_loc=zeros,
        req_pool_indices=zeros[:0],
        seq_lens=[],
        extend_lens=[],
        num_tokens=real[g],
        sample_rows=zeros[:0],
        kv_pool=None,
        req_to_token=zeros,
        attn_backend=None,
        num_token_non_padded=num_token_non_padded(
            real[g], rows[g], p.attn_tp_rank, p.attn_tp_size, gather
        ),
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
    batch = make_batch(rows, real, gather, mlp_gather, buffer_rows)
    x = group_rows(p.attn_dp_rank, rows[p.attn_dp_rank])
    stream = shard if gather else (lambda t: t)
    backend = "all2all" if mode is ScatterMode.SCATTERED else "none"
    with use_moe_settings(MoeSettings(backend, None)):
        comm = LayerCommunicator(Double(), Double(), is_moe=True)
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
    torch.testing.assert_close(final_norm(Double(), hidden, residual, batch), 12 * x, msg=where)


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


def test_scattered_mlp_without_gather_is_refused_when_attention_tp_is_split():
    set_parallel(ParallelState(0, 2, 0, 2, 0, 1, torch.device("cpu")))
    try:
        with use_moe_settings(MoeSettings("all2all", None)):
            comm = LayerCommunicator(Double(), Double(), is_moe=True)
        batch = make_batch([4], [3], False, False)
        with pytest.raises(RuntimeError, match="needs the plan's attn_tp_gather"):
            comm.prepare_mlp(torch.zeros(4, HIDDEN), torch.zeros(4, HIDDEN), batch)
    finally:
        set_parallel(single_process_state(torch.device("cpu")))


def test_self_managed_model_never_gets_a_shard_local_count():
    """Under ``--attn-tp-gather on`` both plans gather; only the communicator model's count
    becomes shard-local. A shard-local count reaching a self-managed model's full-width
    MoE input is how Hunyuan-V4 computed one token in every attn_tp_size."""
    from engine.model_runner import ModelRunner, ModelSource
    from engine.scheduler import Batch
    from engine.sequence import Request, SamplingParams, Sequence
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
    state = ParallelState(1, 2, 1, 2, 0, 1, torch.device("cpu"))
    set_parallel(state)
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
            runner = ModelRunner(source, args, plan, state)
            seq = Sequence(Request.make(0, [1, 2, 3, 4, 5], SamplingParams(max_new_tokens=2), 0))
            seq.slots, seq.row = runner.kv.alloc(seq.budget), runner.table.alloc()
            runner.table.write(seq.row, 0, seq.slots)
            batch = runner.prepare(Batch(ForwardMode.EXTEND, [seq]), 6, [6])
            assert batch.attn_tp_gather and batch.num_tokens == 5
            assert batch.num_token_non_padded == expected, name
    finally:
        reset_model_registry()
        set_parallel(single_process_state(torch.device("cpu")))
