"""What one forward step hands to the model: token rows, cache slots, per-request lengths
and the plan's per-step facts.

Rows are laid out request by request (all new tokens of request 0, then request 1, ...),
followed by padding rows up to the step's padded size. Padding rows carry token 0,
position 0 and KV slot 0, a slot reserved as a sink that no request ever reads.
"""

from __future__ import annotations

import enum
from typing import TYPE_CHECKING

import attrs
import torch

if TYPE_CHECKING:
    from engine.attention.base import AttentionBackend
    from engine.runtime.kv_cache import KVPool


class ForwardMode(enum.Enum):
    EXTEND = "extend"
    DECODE = "decode"
    IDLE = "idle"


@attrs.define
class ForwardBatch:
    mode: ForwardMode
    input_ids: torch.Tensor  # [rows] int64, rows = num_tokens + padding
    positions: torch.Tensor  # [rows] int64
    out_cache_loc: torch.Tensor  # [rows] int64 KV slot written by each row
    req_pool_indices: torch.Tensor  # [bs] int64 rows of the req-to-token table
    seq_lens: list[int]  # [bs] context length of each request after this step
    extend_lens: list[int]  # [bs] new tokens of each request in this step (1 in decode)
    num_tokens: int  # real rows of this attention-DP group
    sample_rows: torch.Tensor  # [bs] int64 rows whose logits are sampled
    kv_pool: KVPool
    req_to_token: torch.Tensor  # [max_requests, max_context] int64 slot table
    attn_backend: AttentionBackend
    # Real rows as this rank's model input counts them: the group's, or shard-local when
    # the plan says so (`plan.shard_local_token_count`).
    num_token_non_padded: int = 0
    gathered_buffer: torch.Tensor | None = None
    global_num_tokens: list[int] | None = None  # padded rows per attention-DP group
    # A bound on the rows any rank of the TP group gives its all-to-all MoE layers in this
    # step, the same on every rank: the largest group's padded rows over attention-TP,
    # rounded up (covers both an even shard and a model's own uneven split).
    max_rows_per_rank: int | None = None
    attn_tp_gather: bool = False
    mlp_tp_gather: bool = False
    seq_lens_tensor: torch.Tensor | None = None  # [bs] int64 `seq_lens` on the device
    # (num_token_non_padded, num_tokens) on the device: the counts of this step also inside
    # a replayed CUDA graph, whose Python ints are those of the capture
    real_rows: torch.Tensor | None = None

    @property
    def rows(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def batch_size(self) -> int:
        return len(self.seq_lens)

    @property
    def is_decode(self) -> bool:
        return self.mode is ForwardMode.DECODE

    def valid_rows(self, shard_local: bool = True) -> int | torch.Tensor:
        """Leading real rows of the model input, for masking padding out of the MoE
        routing: `num_token_non_padded` (`shard_local`) or `num_tokens`, as a device
        scalar where the step has one (so a replayed graph masks its own padding)."""
        if self.real_rows is not None:
            return self.real_rows[0 if shard_local else 1]
        return self.num_token_non_padded if shard_local else self.num_tokens

    def real_in(self, start: int, size: int) -> int | torch.Tensor:
        """Real rows among rows [start, start + size) of the group's rows, the real ones
        first (`num_token_non_padded` of them): a model's own token shard."""
        real = self.valid_rows()
        if isinstance(real, torch.Tensor):
            return (real - start).clamp(0, size)
        return min(max(real - start, 0), size)
