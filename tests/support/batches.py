"""The one ForwardBatch builder of the tests: a step's rows from per-row lists, padded."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any

import torch

from engine.model_api import ForwardBatch, ForwardMode
from engine.runtime.kv_cache import SINK_SLOT


def make_batch(
    mode: ForwardMode,
    num_tokens: int,
    *,
    rows: int | None = None,
    input_ids: Sequence[int] | None = None,
    positions: Sequence[int] | None = None,
    slots: Sequence[int] | None = None,
    req_rows: Sequence[int] = (),
    seq_lens: Sequence[int] = (),
    extend_lens: Sequence[int] = (),
    sample_rows: Sequence[int] | None = None,
    kv_pool: Any = None,
    req_to_token: torch.Tensor | None = None,
    backend: Any = None,
    device: torch.device | str = "cpu",
    num_token_non_padded: int | None = None,
    **facts: Any,
) -> ForwardBatch:
    """`num_tokens` real rows (token ids, positions and KV slots default to 0), then padding
    rows up to `rows` (token 0, position 0, the sink slot). Samples the last row of each
    request unless `sample_rows` says otherwise; `num_token_non_padded` defaults to
    `num_tokens`; `facts` are the plan's per-step fields (gathered_buffer, ...)."""
    rows = num_tokens if rows is None else rows
    pad = rows - num_tokens
    as_tensor = lambda values: torch.tensor(list(values), dtype=torch.int64, device=device)
    real = lambda values: list(values) if values is not None else [0] * num_tokens
    if sample_rows is None:
        sample_rows = [end - 1 for end in itertools.accumulate(extend_lens)]
    if req_to_token is None:
        req_to_token = torch.zeros((1, 1), dtype=torch.int64, device=device)
    return ForwardBatch(
        mode=mode,
        input_ids=as_tensor(real(input_ids) + [0] * pad),
        positions=as_tensor(real(positions) + [0] * pad),
        out_cache_loc=as_tensor(real(slots) + [SINK_SLOT] * pad),
        req_pool_indices=as_tensor(req_rows),
        seq_lens=list(seq_lens),
        extend_lens=list(extend_lens),
        num_tokens=num_tokens,
        sample_rows=as_tensor(sample_rows),
        kv_pool=kv_pool,
        req_to_token=req_to_token,
        attn_backend=backend,
        num_token_non_padded=num_tokens if num_token_non_padded is None else num_token_non_padded,
        **facts,
    )
