"""FlashInfer's paged decode wrappers for the two layer kinds, and the index tensors they
are planned with.

The engine's KV pool has one slot per token, so FlashInfer sees pages of one token: a
request's pages are its KV slots in token order (its `req_to_token` row), `indptr` is the
running sum of context lengths and every last page holds one token. Padding rows (token 0
at the sink slot, see `engine.model_api.forward_batch`) get a one-token context, the sink
they have just written, so a wrapper's batch size always equals the step's rows.
"""

from __future__ import annotations

import itertools
from typing import TYPE_CHECKING

import torch

from engine.attention.base import AttentionSpec, MLASpec
from engine.runtime.kv_cache import SINK_SLOT

if TYPE_CHECKING:
    from engine.model_api.forward_batch import ForwardBatch

# Head dims FlashInfer's decode kernels are built for here (the JIT takes others, unchecked).
DECODE_HEAD_DIMS = (64, 128, 256)
# Query heads per KV head that the CUDA-core decode kernel dispatches; others need tensor cores.
CUDA_CORE_GROUPS = (1, 2, 3, 4, 8)


def decode_rows(batch: ForwardBatch) -> tuple[list[int], int]:
    """Context length of each row's request (padding rows: 1) and the total real context."""
    real = list(batch.seq_lens)
    return real + [1] * (batch.rows - len(real)), sum(real)


def kv_indices(batch: ForwardBatch, real_tokens: int) -> torch.Tensor:
    """int32 KV slots of every row's context, row after row (padding rows: the sink)."""
    device = batch.req_to_token.device
    pad = torch.full((batch.rows - batch.num_tokens,), SINK_SLOT, dtype=torch.int32, device=device)
    if real_tokens == 0:
        return pad
    lens = batch.seq_lens_tensor
    if lens is None:
        lens = torch.tensor(batch.seq_lens, dtype=torch.int64, device=device)
    # row r of the table repeated seq_len times, with columns 0..seq_len-1: no host loop
    req = torch.repeat_interleave(batch.req_pool_indices, lens, output_size=real_tokens)
    first = torch.cumsum(lens, 0) - lens
    col = torch.arange(real_tokens, device=device) - torch.repeat_interleave(
        first, lens, output_size=real_tokens
    )
    return torch.cat([batch.req_to_token[req, col].to(torch.int32), pad])


def indptr_of(lens: list[int]) -> torch.Tensor:
    """CPU int32 offsets [len(lens) + 1]: FlashInfer plans on the host from them."""
    return torch.tensor([0, *itertools.accumulate(lens)], dtype=torch.int32)


def unserved(spec: AttentionSpec | MLASpec | None, dtype: torch.dtype) -> str | None:
    """Why FlashInfer's decode kernels do not serve `spec` in `dtype`, or None."""
    if dtype not in (torch.bfloat16, torch.float16):
        return f"FlashInfer decodes bfloat16 or float16, not {dtype}"
    if isinstance(spec, AttentionSpec):
        if spec.head_dim not in DECODE_HEAD_DIMS or spec.v_head_dim != spec.head_dim:
            return f"FlashInfer decode needs head_dim in {DECODE_HEAD_DIMS} (got {spec.head_dim})"
        return None
    if isinstance(spec, MLASpec):
        # FlashInfer's fa2 MLA kernel: ckv a multiple of 128, kpe a multiple of 64
        if spec.kv_lora_rank % 128 or spec.rope_dim % 64:
            return (
                f"FlashInfer MLA needs kv_lora_rank % 128 == 0 and a rope dim % 64 == 0 "
                f"(got {spec.kv_lora_rank}, {spec.rope_dim})"
            )
        return None
    return "the model's attention calls no backend kernel"


class GQADecode:
    """`BatchDecodeWithPagedKVCacheWrapper` (NHD, one token a page)."""

    def __init__(self, spec: AttentionSpec, dtype: torch.dtype) -> None:
        self.spec, self.dtype = spec, dtype
        self.use_tensor_cores = spec.num_heads // spec.num_kv_heads not in CUDA_CORE_GROUPS

    def new_wrapper(self, workspace: torch.Tensor, graph_rows: int | None, indices: torch.Tensor):
        from flashinfer import BatchDecodeWithPagedKVCacheWrapper

        common = dict(kv_layout="NHD", use_tensor_cores=self.use_tensor_cores, backend="fa2")
        if graph_rows is None:
            return BatchDecodeWithPagedKVCacheWrapper(workspace, **common)
        ints = lambda fill, size: torch.full(
            (size,), fill, dtype=torch.int32, device=workspace.device
        )
        return BatchDecodeWithPagedKVCacheWrapper(
            workspace,
            use_cuda_graph=True,
            paged_kv_indptr_buffer=ints(0, graph_rows + 1),
            paged_kv_indices_buffer=indices,
            paged_kv_last_page_len_buffer=ints(1, graph_rows),
            **common,
        )

    def plan(self, wrapper: object, batch: ForwardBatch) -> None:
        s = self.spec
        lens, real = decode_rows(batch)
        wrapper.plan(
            indptr_of(lens),
            kv_indices(batch, real),
            torch.ones(len(lens), dtype=torch.int32),
            s.num_heads,
            s.num_kv_heads,
            s.head_dim,
            1,
            q_data_type=self.dtype,
            kv_data_type=self.dtype,
            sm_scale=s.scaling,
        )

    def run(self, wrapper: object, q: torch.Tensor, layer_id: int, batch: ForwardBatch):
        s = self.spec
        k_buf, v_buf = batch.kv_pool.layer(layer_id)
        pages = (
            k_buf.view(-1, 1, s.num_kv_heads, s.head_dim),
            v_buf.view(-1, 1, s.num_kv_heads, s.v_head_dim),
        )
        return wrapper.run(q.contiguous(), pages)


class MLADecode:
    """`BatchMLAPagedAttentionWrapper` (fa2) over the latent ‖ k_pe pool."""

    def __init__(self, spec: MLASpec, dtype: torch.dtype) -> None:
        self.spec, self.dtype = spec, dtype

    def new_wrapper(self, workspace: torch.Tensor, graph_rows: int | None, indices: torch.Tensor):
        from flashinfer.mla import BatchMLAPagedAttentionWrapper

        if graph_rows is None:
            return BatchMLAPagedAttentionWrapper(workspace, backend="fa2")
        n = graph_rows
        ints = lambda size: torch.zeros(size, dtype=torch.int32, device=workspace.device)
        return BatchMLAPagedAttentionWrapper(
            workspace,
            use_cuda_graph=True,
            qo_indptr=ints(n + 1),
            kv_indptr=ints(n + 1),
            kv_indices=indices,
            kv_len_arr=ints(n),
            backend="fa2",
        )

    def plan(self, wrapper: object, batch: ForwardBatch) -> None:
        from flashinfer.mla import MLAPlanMetadata

        s = self.spec
        lens, real = decode_rows(batch)
        metadata = MLAPlanMetadata.csr(
            qo_indptr=torch.arange(len(lens) + 1, dtype=torch.int32),
            kv_indptr=indptr_of(lens),
            kv_indices=kv_indices(batch, real),
            kv_len_arr=torch.tensor(lens, dtype=torch.int32),
        )
        wrapper.plan(
            metadata=metadata,
            num_heads=s.num_heads,
            head_dim_ckv=s.kv_lora_rank,
            head_dim_kpe=s.rope_dim,
            page_size=1,
            causal=False,
            sm_scale=s.scaling,
            q_data_type=self.dtype,
            kv_data_type=self.dtype,
            query_layout="split",
            kv_cache_layout="split",
        )

    def run(
        self,
        wrapper: object,
        q_latent: torch.Tensor,
        q_pe: torch.Tensor,
        layer_id: int,
        batch: ForwardBatch,
    ) -> torch.Tensor:
        (cache,) = batch.kv_pool.layer(layer_id)  # [slots, 1, kv_lora_rank + rope_dim]
        rank = self.spec.kv_lora_rank
        return wrapper.run(
            query=(q_latent.contiguous(), q_pe.contiguous()),
            kv_cache=(cache[..., :rank], cache[..., rank:]),
        )
