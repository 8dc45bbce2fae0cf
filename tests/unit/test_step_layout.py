"""One step's row layout (padding, graph buckets, the token count) and the gathered buffer,
as the plan decides them."""

from __future__ import annotations

import pytest
import torch

from engine.model_api import ForwardMode, ParallelState, RankGroup
from engine.runtime.model_runner import gathered_buffer
from engine.runtime.step_layout import StepLayouter, capture_sizes
from engine.runtime.step_sync import StepInfo
from registry import ParallelCapabilities, PlanArgs, resolve_plan

DECODE, EXTEND = ForwardMode.DECODE, ForwardMode.EXTEND


def test_capture_sizes_are_aligned_buckets():
    assert capture_sizes(32, 1) == [1, 2, 4, 8, 16, 24, 32]
    assert capture_sizes(32, 2) == [2, 4, 8, 16, 24, 32]
    assert capture_sizes(20, 8) == [8, 16, 24]
    assert capture_sizes(5, 1) == [1, 2, 4, 5]


DEFAULT = ParallelCapabilities()


def plan(caps=DEFAULT, **kw):
    return resolve_plan(caps, PlanArgs(**kw))


def rank(attn_tp_rank: int = 0, attn_tp_size: int = 1) -> ParallelState:
    return ParallelState(
        0,
        RankGroup("tp", attn_tp_rank, attn_tp_size),
        RankGroup("attn_tp", attn_tp_rank, attn_tp_size),
        0,
        1,
        torch.device("cpu"),
    )


def layouter(p, max_bs=32, disable=False, parallel=None):
    sizes = [] if disable else capture_sizes(max_bs, p.token_alignment)
    return StepLayouter(p, sizes, parallel or rank())


def info(n: int, extend: bool = False) -> StepInfo:
    return StepInfo(n, not extend, extend, n > 0, False, 0)


def test_padding_follows_the_plan_alignment():
    g = layouter(plan(tp_size=4, moe_dense_tp_size=1))
    assert g.alignment == 4 and all(s % 4 == 0 for s in g.sizes)
    assert g.can_run_graph(3, is_decode=True) and not g.can_run_graph(3, is_decode=False)
    assert g.local(DECODE, 3).rows == 4 and g.local(DECODE, 3).use_graph
    assert g.local(DECODE, 17).rows == 24  # the bucket, beyond the alignment
    big = g.local(DECODE, 33)
    assert not g.can_run_graph(33, is_decode=True) and not big.use_graph and big.rows == 36
    eager = g.synced(EXTEND, 3, [info(3, True), info(17), info(8), info(0)])
    assert eager.padding_tokens == 1 + 3 + 0 + 0 and not eager.use_graph
    assert eager.group_rows == (4, 20, 8, 0)
    plain = layouter(plan(tp_size=4))
    assert plain.local(EXTEND, 5).rows == 5 and plain.local(DECODE, 5).rows == 8


def test_a_graph_step_pads_every_group_to_the_largest_bucket():
    g = layouter(plan(tp_size=4, dp_size=2, enable_dp_attention=True), parallel=rank(0, 2))
    step = g.synced(DECODE, 3, [info(3), info(9)])
    assert step.use_graph and step.group_rows == (16, 16) and step.rows == 16
    assert step.max_rows_per_rank == 8  # 16 rows over attn_tp_size 2
    idle = g.synced(ForwardMode.IDLE, 0, [info(0), info(0)])
    assert not idle.use_graph and idle.rows == 0


@pytest.mark.parametrize(
    ("kw", "rows"),
    [
        ({"tp_size": 2}, 0),
        ({"tp_size": 2, "moe_dense_tp_size": 1}, 32),
        ({"tp_size": 4, "dp_size": 2, "enable_dp_attention": True}, 64),
        (
            {"tp_size": 4, "dp_size": 2, "enable_dp_attention": True, "moe_dense_tp_size": 1},
            64,
        ),
    ],
)
def test_gathered_buffer_allocated_once_iff_the_plan_says(kw, rows):
    p = plan(**kw)
    buf = gathered_buffer(p, capture_sizes(32, p.token_alignment), 32, 64, torch.float32, "cpu")
    assert (buf is not None) == p.gathered_buffer.value
    assert (0 if buf is None else buf.numel() * buf.element_size()) == rows * 64 * 4


def test_disabled_graphs_pad_to_alignment_only():
    p = plan(tp_size=2, moe_dense_tp_size=1)
    g = layouter(p, disable=True)
    assert g.sizes == [] and not g.can_run_graph(1, is_decode=True)
    assert g.local(DECODE, 3).rows == 4 and not g.local(DECODE, 3).use_graph
    buf = gathered_buffer(p, [], 32, 64, torch.float32, "cpu")
    assert buf.numel() * buf.element_size() == 32 * 64 * 4


def test_num_token_non_padded_is_shard_local_only_when_the_plan_says():
    scattered = dict(tp_size=4, moe_dense_tp_size=1)
    engine_gather = plan(**scattered)
    own_split = plan(ParallelCapabilities(self_managed_sp=True), **scattered, attn_tp_gather="on")
    assert engine_gather.shard_local_token_count.value
    assert not own_split.shard_local_token_count.value
    counts = lambda p: [layouter(p, parallel=rank(r, 4)).non_padded(5, 8) for r in range(4)]
    assert counts(engine_gather) == [2, 2, 1, 0]
    assert counts(own_split) == [5, 5, 5, 5]


def test_max_rows_per_rank_is_the_largest_group_over_attention_tp():
    p = plan(tp_size=8, dp_size=2, enable_dp_attention=True)
    eager = [info(5, True), info(13, True)]
    assert layouter(p, parallel=rank(0, 1)).synced(EXTEND, 5, eager).max_rows_per_rank == 13
    assert layouter(p, parallel=rank(0, 4)).synced(EXTEND, 5, eager).max_rows_per_rank == 4
