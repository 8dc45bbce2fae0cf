"""GPU attention through FlashInfer: paged decode for GQA models and for MLA, CUDA-graph ready.

The engine's KV pool has one slot per token, so FlashInfer sees pages of one token: a
request's pages are its KV slots in token order (its `req_to_token` row), `indptr` is the
running sum of context lengths and every last page holds one token.

Every row of a decode step is a request of its own. Padding rows (token 0 at the sink slot,
see `engine.forward_batch`) get a one-token context, the sink they have just written, so
the wrapper's batch size always equals the step's rows: a CUDA graph captured at a size
replays any step padded to it, and `prepare_graph` re-plans that size's wrapper in place
(same buffers, new contents) before each replay.

Prefill runs eagerly, per request: torch SDPA for GQA, `torch_mla` for MLA.
"""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F

from engine.forward_batch import ForwardBatch, ForwardMode
from engine.kv_cache import SINK_SLOT
from models.layers.attention import Attention, AttentionBackend

WORKSPACE_BYTES = 128 * 1024 * 1024  # FlashInfer's recommended split-k scratch size
# Head dims FlashInfer's decode kernels are built for here (the JIT takes others, unchecked).
DECODE_HEAD_DIMS = (64, 128, 256)
# Query heads per KV head that the CUDA-core decode kernel dispatches; others need tensor cores.
CUDA_CORE_GROUPS = (1, 2, 3, 4, 8)


def available() -> bool:
    try:
        import flashinfer  # noqa: F401
    except ImportError:
        return False
    return True


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


class _PagedBackend(AttentionBackend):
    """Wrapper bookkeeping shared by the GQA and MLA backends: one eager wrapper re-planned
    every decode step, one CUDA-graph wrapper per captured size (made when first planned)."""

    supports_cuda_graph = True

    def __init__(self, dtype: torch.dtype, device: torch.device, max_slots: int) -> None:
        self.dtype, self.device = dtype, device
        self.workspace = torch.zeros(WORKSPACE_BYTES, dtype=torch.uint8, device=device)
        # Shared by every graph wrapper: one replays at a time. Real contexts never hold
        # more slots than the pool; padding rows add one each.
        self.max_slots = max_slots
        self.graph_indices: torch.Tensor | None = None
        self.eager_wrapper = None
        self.graph_wrappers: dict[int, object] = {}
        self.wrapper = None  # what forward() runs this step
        self.mode = ForwardMode.IDLE
        self._batch: ForwardBatch | None = None

    def prepare(self, batch: ForwardBatch) -> None:
        self._set_batch(batch)
        if self.mode is ForwardMode.EXTEND or batch.rows == 0:
            return
        if self.eager_wrapper is None:
            self.eager_wrapper = self.new_wrapper(None)
        self.plan(self.eager_wrapper, batch)

    def prepare_graph(self, batch: ForwardBatch) -> None:
        """Plan the CUDA-graph wrapper of size `batch.rows` (a decode step) in place."""
        self._set_batch(batch)
        wrapper = self.graph_wrappers.get(batch.rows)
        if wrapper is None:
            if self.graph_indices is None:
                self.graph_indices = torch.zeros(
                    self.max_slots, dtype=torch.int32, device=self.device
                )
            wrapper = self.graph_wrappers[batch.rows] = self.new_wrapper(batch.rows)
        self.plan(wrapper, batch)

    def _set_batch(self, batch: ForwardBatch) -> None:
        self._batch = batch
        # idle rows are all padding: a decode step of one-token sink contexts
        self.mode = ForwardMode.EXTEND if batch.mode is ForwardMode.EXTEND else ForwardMode.DECODE
        self.wrapper = None

    def _check(self, batch: ForwardBatch) -> None:
        if self._batch is not batch:
            raise RuntimeError(
                f"{type(self).__name__}.prepare(batch) was not called for this batch"
            )

    def new_wrapper(self, graph_rows: int | None) -> object:
        raise NotImplementedError

    def plan(self, wrapper: object, batch: ForwardBatch) -> None:
        raise NotImplementedError


class FlashInferBackend(_PagedBackend):
    """GQA decode with `BatchDecodeWithPagedKVCacheWrapper` (NHD, one token a page)."""

    def __init__(
        self,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        scaling: float,
        dtype: torch.dtype,
        device: torch.device,
        max_slots: int,
    ) -> None:
        super().__init__(dtype, device, max_slots)
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.scaling = scaling
        self.use_tensor_cores = num_heads // num_kv_heads not in CUDA_CORE_GROUPS
        self._sdpa_plan: list[tuple[int, int, int, int]] = []

    @classmethod
    def supports(cls, layer: Attention, dtype: torch.dtype) -> bool:
        return (
            dtype in (torch.bfloat16, torch.float16)
            and layer.head_dim in DECODE_HEAD_DIMS
            and layer.v_head_dim == layer.head_dim
        )

    def new_wrapper(self, graph_rows: int | None) -> object:
        from flashinfer import BatchDecodeWithPagedKVCacheWrapper

        common = dict(kv_layout="NHD", use_tensor_cores=self.use_tensor_cores, backend="fa2")
        if graph_rows is None:
            return BatchDecodeWithPagedKVCacheWrapper(self.workspace, **common)
        return BatchDecodeWithPagedKVCacheWrapper(
            self.workspace,
            use_cuda_graph=True,
            paged_kv_indptr_buffer=torch.zeros(
                graph_rows + 1, dtype=torch.int32, device=self.device
            ),
            paged_kv_indices_buffer=self.graph_indices,
            paged_kv_last_page_len_buffer=torch.ones(
                graph_rows, dtype=torch.int32, device=self.device
            ),
            **common,
        )

    def prepare(self, batch: ForwardBatch) -> None:
        super().prepare(batch)
        if self.mode is ForwardMode.EXTEND:
            self._sdpa_plan = sdpa_plan(batch)

    def plan(self, wrapper: object, batch: ForwardBatch) -> None:
        lens, real = decode_rows(batch)
        wrapper.plan(
            indptr_of(lens),
            kv_indices(batch, real),
            torch.ones(len(lens), dtype=torch.int32),
            self.num_heads,
            self.num_kv_heads,
            self.head_dim,
            1,
            q_data_type=self.dtype,
            kv_data_type=self.dtype,
            sm_scale=self.scaling,
        )
        self.wrapper = wrapper

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        layer: Attention,
        batch: ForwardBatch,
    ) -> torch.Tensor:
        self._check(batch)
        k_buf, v_buf = batch.kv_pool.layer(layer.layer_id)
        if self.mode is ForwardMode.EXTEND:
            return sdpa_extend(q, k_buf, v_buf, layer.scaling, self._sdpa_plan, batch)
        if q.shape[0] == 0:
            return q.new_empty(q.shape)
        pages = (
            k_buf.view(-1, 1, layer.num_kv_heads, layer.head_dim),
            v_buf.view(-1, 1, layer.num_kv_heads, layer.v_head_dim),
        )
        return self.wrapper.run(q.contiguous(), pages)


def sdpa_plan(batch: ForwardBatch) -> list[tuple[int, int, int, int]]:
    """(first row, new tokens, table row, context length) per request of an extend step."""
    plan, start = [], 0
    for req_row, seq_len, new in zip(
        batch.req_pool_indices.tolist(), batch.seq_lens, batch.extend_lens, strict=True
    ):
        plan.append((start, new, req_row, seq_len))
        start += new
    return plan


def sdpa_extend(
    q: torch.Tensor,
    k_buf: torch.Tensor,
    v_buf: torch.Tensor,
    scaling: float,
    plan: list[tuple[int, int, int, int]],
    batch: ForwardBatch,
) -> torch.Tensor:
    """Causal attention of each request's new rows over its cached context; padding rows 0."""
    out = q.new_zeros(q.shape[0], q.shape[1], v_buf.shape[-1])
    for start, new, req_row, seq_len in plan:
        slots = batch.req_to_token[req_row, :seq_len]
        qs = q[start : start + new].transpose(0, 1).unsqueeze(0)
        ks, vs = (buf[slots].transpose(0, 1).unsqueeze(0) for buf in (k_buf, v_buf))
        mask = None
        if new != seq_len:  # a cached prefix: the new rows sit at the end of the context
            mask = torch.ones(new, seq_len, dtype=torch.bool, device=q.device).tril(seq_len - new)
        o = F.scaled_dot_product_attention(
            qs, ks, vs, attn_mask=mask, is_causal=mask is None, scale=scaling, enable_gqa=True
        )
        out[start : start + new] = o[0].transpose(0, 1)
    return out


class FlashInferMLABackend(_PagedBackend):
    """MLA decode with `BatchMLAPagedAttentionWrapper` (fa2) over the latent ‖ k_pe pool
    (see `models.layers.mla`): `forward_mla` returns the attention-weighted latents."""

    def __init__(
        self,
        num_heads: int,
        kv_lora_rank: int,
        rope_dim: int,
        scaling: float,
        dtype: torch.dtype,
        device: torch.device,
        max_slots: int,
    ) -> None:
        super().__init__(dtype, device, max_slots)
        self.num_heads, self.kv_lora_rank, self.rope_dim = num_heads, kv_lora_rank, rope_dim
        self.scaling = scaling

    @classmethod
    def supports(cls, layer: object, dtype: torch.dtype) -> bool:
        # FlashInfer's fa2 MLA kernel: ckv a multiple of 128, kpe a multiple of 64
        return (
            dtype in (torch.bfloat16, torch.float16)
            and layer.kv_lora_rank % 128 == 0
            and layer.rope_dim % 64 == 0
        )

    def new_wrapper(self, graph_rows: int | None) -> object:
        from flashinfer.mla import BatchMLAPagedAttentionWrapper

        if graph_rows is None:
            return BatchMLAPagedAttentionWrapper(self.workspace, backend="fa2")
        n = graph_rows
        ints = lambda size: torch.zeros(size, dtype=torch.int32, device=self.device)
        return BatchMLAPagedAttentionWrapper(
            self.workspace,
            use_cuda_graph=True,
            qo_indptr=ints(n + 1),
            kv_indptr=ints(n + 1),
            kv_indices=self.graph_indices,
            kv_len_arr=ints(n),
            backend="fa2",
        )

    def plan(self, wrapper: object, batch: ForwardBatch) -> None:
        from flashinfer.mla import MLAPlanMetadata

        lens, real = decode_rows(batch)
        metadata = MLAPlanMetadata.csr(
            qo_indptr=torch.arange(len(lens) + 1, dtype=torch.int32),
            kv_indptr=indptr_of(lens),
            kv_indices=kv_indices(batch, real),
            kv_len_arr=torch.tensor(lens, dtype=torch.int32),
        )
        wrapper.plan(
            metadata=metadata,
            num_heads=self.num_heads,
            head_dim_ckv=self.kv_lora_rank,
            head_dim_kpe=self.rope_dim,
            page_size=1,
            causal=False,
            sm_scale=self.scaling,
            q_data_type=self.dtype,
            kv_data_type=self.dtype,
            query_layout="split",
            kv_cache_layout="split",
        )
        self.wrapper = wrapper

    def forward(self, *args: object) -> torch.Tensor:
        raise RuntimeError("MLA layers call forward_mla")

    def forward_mla(
        self, q_latent: torch.Tensor, q_pe: torch.Tensor, layer: object, batch: ForwardBatch
    ) -> torch.Tensor:
        """q_latent [rows, heads, kv_lora_rank], q_pe [rows, heads, rope_dim] ->
        [rows, heads, kv_lora_rank]."""
        from models.layers.mla import torch_mla

        self._check(batch)
        if self.mode is ForwardMode.EXTEND:
            return torch_mla(q_latent, q_pe, layer, batch)
        if q_latent.shape[0] == 0:
            return q_latent.new_empty(q_latent.shape)
        (cache,) = batch.kv_pool.layer(layer.layer_id)  # [slots, 1, kv_lora_rank + rope_dim]
        ckv, kpe = cache[..., : self.kv_lora_rank], cache[..., self.kv_lora_rank :]
        return self.wrapper.run(
            query=(q_latent.contiguous(), q_pe.contiguous()), kv_cache=(ckv, kpe)
        )


def backend_for(model: torch.nn.Module, dtype: torch.dtype, max_slots: int) -> object | None:
    """The FlashInfer backend for `model`'s attention layers, or None where FlashInfer does
    not serve them (then the engine keeps the torch backend and runs eagerly)."""
    from models.layers.mla import MLAAttention

    device = next(model.parameters()).device
    for m in model.modules():
        if isinstance(m, Attention) and FlashInferBackend.supports(m, dtype):
            return FlashInferBackend(
                m.num_heads, m.num_kv_heads, m.head_dim, m.scaling, dtype, device, max_slots
            )
        if isinstance(m, MLAAttention) and FlashInferMLABackend.supports(m, dtype):
            return FlashInferMLABackend(
                m.num_heads, m.kv_lora_rank, m.rope_dim, m.scaling, dtype, device, max_slots
            )
        if isinstance(m, Attention | MLAAttention):
            return None
    return None
