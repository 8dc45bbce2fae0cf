"""One step's row layout, computed in one place from the batch, the plan and the sync.

Decode steps that fit a capture size are padded to the smallest one (what a CUDA-graph
replay runs; CPU pads alike so every plan is testable without a GPU); other steps are
padded to `plan.token_alignment` only. Under mlp_sync, one extending group makes the step
eager everywhere and a graph step pads every group to the bucket of the largest.
"""

from __future__ import annotations

from attrs import frozen

from engine.model_api.forward_batch import ForwardMode
from engine.model_api.parallel import ParallelState, RankGroup
from engine.runtime.step_sync import StepInfo
from registry import ParallelPlan

BASE_SIZES = (1, 2, 4, 8)
SIZE_STEP = 8


def round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def capture_sizes(max_bs: int, alignment: int) -> list[int]:
    """1, 2, 4, 8, then every multiple of 8 up to `max_bs`, each rounded up to `alignment`."""
    raw = [s for s in BASE_SIZES if s < max_bs] + list(range(SIZE_STEP, max_bs, SIZE_STEP))
    return sorted({round_up(s, alignment) for s in [*raw, max_bs]})


@frozen
class StepLayout:
    """How this rank's step is laid out (read by the worker, model runner, graph runner)."""

    mode: ForwardMode  # IDLE: this group has no batch but joins the step's collectives
    num_tokens: int  # real rows of this attention-DP group
    rows: int  # this group's rows after padding
    group_rows: tuple[int, ...]  # every attention-DP group's padded rows, in group order
    num_token_non_padded: int  # real rows as this rank's model input counts them
    max_rows_per_rank: int  # bound on any rank's rows in its all-to-all MoE layers
    use_graph: bool  # replay the CUDA graph of `rows` (where one was captured)
    padding_tokens: int  # rows alignment alone added, summed over the groups

    @property
    def idle(self) -> bool:
        return self.mode is ForwardMode.IDLE


class StepLayouter:
    def __init__(self, plan: ParallelPlan, sizes: list[int], parallel: ParallelState) -> None:
        self.alignment = plan.token_alignment
        self.shard_local = plan.shard_local_token_count.value
        self.sizes = sizes
        self.attn_tp = parallel.attn_tp
        self.attn_dp_rank = parallel.attn_dp_rank

    def can_run_graph(self, num_tokens: int, is_decode: bool) -> bool:
        return is_decode and bool(self.sizes) and num_tokens <= self.sizes[-1]

    def bucket(self, num_tokens: int) -> int:
        return next(s for s in self.sizes if s >= num_tokens)

    def info(self, mode: ForwardMode, num_tokens: int, idle_after: bool, seen: int) -> StepInfo:
        extend = mode is ForwardMode.EXTEND
        return StepInfo(
            num_tokens=num_tokens,
            can_run_graph=self.can_run_graph(num_tokens, not extend),
            is_extend=extend,
            has_work=mode is not ForwardMode.IDLE,
            idle_after=idle_after,
            seen=seen,
        )

    def local(self, mode: ForwardMode, num_tokens: int) -> StepLayout:
        """A step without mlp_sync: one group, decided alone."""
        graph = self.can_run_graph(num_tokens, mode is ForwardMode.DECODE)
        rows = self.bucket(num_tokens) if graph else round_up(num_tokens, self.alignment)
        return self._layout(mode, num_tokens, [rows], [num_tokens], graph)

    def synced(self, mode: ForwardMode, num_tokens: int, infos: list[StepInfo]) -> StepLayout:
        """A step every attention-DP group agreed on through `infos`."""
        tokens = [i.num_tokens for i in infos]
        # one extending group makes the step eager everywhere, as SGLang does
        graph = all(i.can_run_graph and not i.is_extend for i in infos) and any(
            i.has_work for i in infos
        )
        if graph:
            rows = [self.bucket(max(tokens))] * len(tokens)
        else:
            rows = [round_up(t, self.alignment) for t in tokens]
        return self._layout(mode, num_tokens, rows, tokens, graph)

    def capture(self, rows: int, groups: int) -> StepLayout:
        """The decode step a graph of `rows` rows is recorded on: every row real, so that
        nothing the model derives from the counts masks rows out of the graph."""
        return self._layout(ForwardMode.DECODE, rows, [rows] * groups, [rows] * groups, True)

    def _layout(
        self,
        mode: ForwardMode,
        num_tokens: int,
        group_rows: list[int],
        group_tokens: list[int],
        graph: bool,
    ) -> StepLayout:
        rows = group_rows[self.attn_dp_rank]
        return StepLayout(
            mode=mode,
            num_tokens=num_tokens,
            rows=rows,
            group_rows=tuple(group_rows),
            num_token_non_padded=self.non_padded(num_tokens, rows),
            max_rows_per_rank=-(-max(group_rows, default=0) // self.attn_tp.size),
            use_graph=graph,
            padding_tokens=sum(round_up(n, self.alignment) - n for n in group_tokens),
        )

    def non_padded(self, n: int, rows: int) -> int:
        return non_padded_count(n, rows, self.attn_tp, self.shard_local)


def non_padded_count(n: int, rows: int, attn_tp: RankGroup, shard_local: bool) -> int:
    """Real rows among this rank's model input: all `n`, or, when the plan makes the count
    shard-local, the real ones in this rank's even shard of the group's `rows`."""
    if not shard_local:
        return n
    shard = rows // attn_tp.size
    return min(max(n - attn_tp.rank * shard, 0), shard)
