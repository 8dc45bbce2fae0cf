"""The layer communicator: where a decoder layer's rows live, and the collectives that move
them, as the plan (through the `ForwardBatch`) decides. Scatter modes follow SGLang:

- ``SCATTERED``: each attention-TP rank holds its 1/A of its DP group's P padded rows
  (rows [r*S, (r+1)*S), S = P / A).
- ``TP_ATTN_FULL``: every rank of an attention-TP group holds all P rows of its group.
- ``FULL``: the rows a TP-sharded MLP/MoE runs on: the group's P rows, or under DP
  attention with `mlp_tp_gather` the rows of every DP group, concatenated in group order.

Per step, with G = `batch.attn_tp_gather` and M = `batch.mlp_tp_gather`:

- Between decoder layers the residual stream is SCATTERED when G, else TP_ATTN_FULL.
- Attention always sees the group's P rows (TP_ATTN_FULL); when G they are all-gathered
  over attention-TP into the gathered buffer. Its o_proj leaves partial sums, which are
  reduce-scattered (G) or all-reduced (not G) over attention-TP before the post-attention
  norm.
- Each layer's MLP runs SCATTERED when it is an MoE layer with an all-to-all backend or a
  dense layer with ``--moe-dense-tp-size 1`` (complete output for the rows at hand), else
  FULL (TP-sharded over "tp", partial sums reduced afterwards). These two inputs are the
  layers' own configuration (`MoeSettings`, given to the model's constructor); every gather
  decision comes from the plan, via the batch.
- FULL under M: each rank contributes a disjoint slice of its group's rows (its shard
  when G, else an even split of P among the A ranks), all-gathered (uneven) over "tp";
  afterwards the partial sums are all-reduced over "tp" and each rank keeps its group's
  rows (and its shard when G). gloo's reduce-scatter needs equal sizes, DP groups differ.
- FULL without M (then there is no DP attention, "tp" is "attn_tp"): G all-gathers the
  shard before the MLP and reduce-scatters after it; not G all-reduces after it.
- The final norm runs on the residual stream's rows; G all-gathers them before the LM head.

Embedding and LM head are vocab-parallel over the attention-TP group (so replicated across
DP groups rather than sharded over the whole TP group): every group embeds and scores its
own rows, which changes no result and needs no DP gather around them.
"""

from __future__ import annotations

import enum

import torch
from torch import nn

from engine.model_api.contract import MoeSettings
from engine.model_api.forward_batch import ForwardBatch
from engine.model_api.parallel import (
    ParallelState,
    RankGroup,
    all_gather,
    all_gather_uneven,
    all_reduce,
    reduce_scatter,
    split_bounds,
)


class ScatterMode(enum.Enum):
    SCATTERED = "scattered"
    TP_ATTN_FULL = "tp_attn_full"
    FULL = "full"


def mlp_mode(is_moe: bool, moe: MoeSettings) -> ScatterMode:
    """SCATTERED for all-to-all MoE layers and replicated dense layers, else FULL."""
    if (is_moe and moe.a2a_backend != "none") or (not is_moe and moe.dense_tp_size == 1):
        return ScatterMode.SCATTERED
    return ScatterMode.FULL


def attn_tp_shard(x: torch.Tensor, group: RankGroup) -> torch.Tensor:
    """This rank's rows of the group's rows (equal shards: the plan pads to A)."""
    start, end = split_bounds(x.shape[0], group.size, group.rank)
    return x[start:end]


def gather_attn_tp(shard: torch.Tensor, batch: ForwardBatch, group: RankGroup) -> torch.Tensor:
    """All shards of the group, in rank order, into the gathered buffer when it is big enough."""
    rows = shard.shape[0] * group.size
    buffer = batch.gathered_buffer
    out = buffer[:rows] if buffer is not None and buffer.shape[0] >= rows else None
    return all_gather(shard, group, out=out)


def _dp_slices(batch: ForwardBatch, attn_tp_size: int) -> list[int]:
    """Rows each rank of the TP group contributes to the DP gather, in rank order."""
    if batch.global_num_tokens is None:
        raise ValueError("mlp_tp_gather needs batch.global_num_tokens (padded rows per DP group)")
    a = attn_tp_size
    return [
        end - start
        for rows in batch.global_num_tokens
        for start, end in (split_bounds(rows, a, r) for r in range(a))
    ]


def dp_gather(hidden: torch.Tensor, batch: ForwardBatch, p: ParallelState) -> torch.Tensor:
    """The rows of every DP group on every rank of the TP group (`hidden` is this rank's
    shard when G, else its group's P rows, of which it contributes an even slice)."""
    if not batch.attn_tp_gather:
        hidden = attn_tp_shard(hidden, p.attn_tp)
    sizes = _dp_slices(batch, p.attn_tp_size)
    buffer = batch.gathered_buffer
    total = sum(sizes)
    out = buffer[:total] if buffer is not None and buffer.shape[0] >= total else None
    return all_gather_uneven(hidden, sizes, p.tp, out=out)


def dp_scatter(partial: torch.Tensor, batch: ForwardBatch, p: ParallelState) -> torch.Tensor:
    """Sum the TP ranks' partial outputs over all DP groups' rows, keep this group's rows
    (this rank's shard of them when G)."""
    full = all_reduce(partial, p.tp)
    start = sum(batch.global_num_tokens[: p.attn_dp_rank])
    mine = full[start : start + batch.global_num_tokens[p.attn_dp_rank]]
    return attn_tp_shard(mine, p.attn_tp) if batch.attn_tp_gather else mine


class LayerCommunicator:
    """The communication around one decoder layer's attention and MLP.

    The layer calls, in order::

        hidden, residual = comm.prepare_attn(hidden, residual, batch)
        hidden = self_attn(...)                      # partial sums over attention-TP
        hidden, residual, num_valid = comm.prepare_mlp(hidden, residual, batch)
        hidden = mlp(hidden, num_valid)              # partial iff mode is FULL
        hidden, residual = comm.postprocess_mlp(hidden, residual, batch)

    and the model ends with `final_norm`. (hidden, residual) between layers are in the
    residual stream's mode; `residual` is None before the first layer.
    """

    def __init__(
        self,
        input_layernorm: nn.Module,
        post_attention_layernorm: nn.Module,
        mode: ScatterMode,
        parallel: ParallelState,
    ) -> None:
        self.input_layernorm = input_layernorm
        self.post_attention_layernorm = post_attention_layernorm
        self.mlp_mode = mode
        self.parallel = parallel

    def prepare_attn(
        self, hidden: torch.Tensor, residual: torch.Tensor | None, batch: ForwardBatch
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Add + input norm on the residual stream's rows; attention input of P rows."""
        group = self.parallel.attn_tp
        if residual is None:
            # first layer: `hidden` is the embedding of all the group's rows
            if batch.attn_tp_gather:
                hidden = attn_tp_shard(hidden, group)
            hidden, residual = self.input_layernorm(hidden), hidden
        else:
            hidden, residual = self.input_layernorm(hidden, residual)
        if batch.attn_tp_gather:
            hidden = gather_attn_tp(hidden, batch, group)
        return hidden, residual

    def prepare_mlp(
        self, attn_partial: torch.Tensor, residual: torch.Tensor, batch: ForwardBatch
    ) -> tuple[torch.Tensor, torch.Tensor, int | None]:
        """Reduce attention's partial sums, add + post-attention norm, and lay the MLP input
        out in this layer's mode. Also returns how many leading rows of the MLP input are
        real (None: treat every row as real), for the MoE's padding mask."""
        scattered = self.mlp_mode is ScatterMode.SCATTERED
        p = self.parallel
        # layouts no plan produces for these layers; refuse them before any collective
        if scattered and not batch.attn_tp_gather and p.attn_tp_size > 1:
            raise RuntimeError(
                "a scattered MLP with attn_tp_size > 1 needs the plan's attn_tp_gather"
            )
        if not scattered and not batch.mlp_tp_gather and p.attn_dp_size > 1:
            raise RuntimeError("a TP-sharded MLP under DP attention needs the plan's mlp_tp_gather")
        if batch.attn_tp_gather:
            hidden = reduce_scatter(attn_partial, p.attn_tp)
        else:
            hidden = all_reduce(attn_partial, p.attn_tp)
        hidden, residual = self.post_attention_layernorm(hidden, residual)
        if scattered:
            # shard-local when the plan says so (plan.shard_local_token_count)
            return hidden, residual, batch.valid_rows()
        if batch.mlp_tp_gather:
            return dp_gather(hidden, batch, p), residual, None
        if batch.attn_tp_gather:
            hidden = gather_attn_tp(hidden, batch, p.attn_tp)
        return hidden, residual, batch.valid_rows(shard_local=False)

    def postprocess_mlp(
        self, out: torch.Tensor, residual: torch.Tensor, batch: ForwardBatch
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The MLP output back in the residual stream's mode, complete (not partial)."""
        if self.mlp_mode is ScatterMode.SCATTERED:
            return out, residual
        if batch.mlp_tp_gather:
            return dp_scatter(out, batch, self.parallel), residual
        if batch.attn_tp_gather:
            return reduce_scatter(out, self.parallel.tp), residual
        return all_reduce(out, self.parallel.tp), residual


def final_norm(
    norm: nn.Module,
    hidden: torch.Tensor,
    residual: torch.Tensor,
    batch: ForwardBatch,
    group: RankGroup,
) -> torch.Tensor:
    """The last add + norm; all P rows of the attention-TP `group` on every rank, for the
    LM head."""
    hidden, _ = norm(hidden, residual)
    if batch.attn_tp_gather:
        hidden = gather_attn_tp(hidden, batch, group)
    return hidden
