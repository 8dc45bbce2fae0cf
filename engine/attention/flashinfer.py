"""GPU attention through FlashInfer: paged decode for GQA and MLA models, CUDA-graph ready.

One eager wrapper is re-planned every decode step; one CUDA-graph wrapper per captured
size is made when first planned, and `plan_replay` re-plans it in place (same buffers, new
contents) before each replay. Prefill runs eagerly, per request: torch SDPA for GQA,
`torch_mla` for MLA. A layer of the kind the backend was not built for is computed in
torch, so the backend serves every layer.
"""

from __future__ import annotations

import importlib.util
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from engine.attention.base import AttentionBackend, AttentionSpec, MLASpec
from engine.attention.flashinfer_kernels import GQADecode, MLADecode, unserved
from engine.attention.torch_backend import RequestRows, request_rows, torch_attention, torch_mla
from engine.model_api.forward_batch import ForwardMode

if TYPE_CHECKING:
    from engine.model_api.forward_batch import ForwardBatch

WORKSPACE_BYTES = 128 * 1024 * 1024  # FlashInfer's recommended split-k scratch size


def installed() -> bool:
    return importlib.util.find_spec("flashinfer") is not None


class FlashInferBackend(AttentionBackend):
    name = "flashinfer"
    supports_cuda_graph = True

    @classmethod
    def unavailable(cls, dtype: torch.dtype, device: torch.device) -> str | None:
        if device.type != "cuda":
            return "FlashInfer runs on CUDA devices only (add --device cuda)"
        if not installed():
            return "the flashinfer package is not installed (pip install -e '.[gpu]')"
        if dtype not in (torch.bfloat16, torch.float16):
            return f"FlashInfer decodes bfloat16 or float16, not {dtype}"
        return None

    @classmethod
    def unusable(
        cls, spec: AttentionSpec | MLASpec | None, dtype: torch.dtype, device: torch.device
    ) -> str | None:
        return cls.unavailable(dtype, device) or unserved(spec, dtype)

    @classmethod
    def create(
        cls,
        spec: AttentionSpec | MLASpec | None,
        dtype: torch.dtype,
        device: torch.device,
        max_slots: int,
    ) -> FlashInferBackend:
        return cls(spec, dtype, device, max_slots)

    def __init__(
        self,
        spec: AttentionSpec | MLASpec,
        dtype: torch.dtype,
        device: torch.device,
        max_slots: int,
    ) -> None:
        self.kernel = (
            GQADecode(spec, dtype) if isinstance(spec, AttentionSpec) else MLADecode(spec, dtype)
        )
        self.device = device
        self.workspace = torch.zeros(WORKSPACE_BYTES, dtype=torch.uint8, device=device)
        # Shared by every graph wrapper: one replays at a time. Real contexts never hold
        # more slots than the pool; padding rows add one each.
        self.max_slots = max_slots
        self.graph_indices: torch.Tensor | None = None
        self.eager_wrapper = None
        self.graph_wrappers: dict[int, object] = {}
        self.wrapper = None  # what this step's decode runs
        self._batch: ForwardBatch | None = None
        self._requests: RequestRows | None = None

    def plan(self, batch: ForwardBatch) -> None:
        self._start(batch)
        if batch.mode is ForwardMode.EXTEND or batch.rows == 0:
            return
        if self.eager_wrapper is None:
            self.eager_wrapper = self.kernel.new_wrapper(self.workspace, None, None)
        self.kernel.plan(self.eager_wrapper, batch)
        self.wrapper = self.eager_wrapper

    def plan_capture(self, batch: ForwardBatch) -> None:
        self.plan_replay(batch)

    def plan_replay(self, batch: ForwardBatch) -> None:
        self._start(batch)
        wrapper = self.graph_wrappers.get(batch.rows)
        if wrapper is None:
            if self.graph_indices is None:
                self.graph_indices = torch.zeros(
                    self.max_slots, dtype=torch.int32, device=self.device
                )
            wrapper = self.kernel.new_wrapper(self.workspace, batch.rows, self.graph_indices)
            self.graph_wrappers[batch.rows] = wrapper
        self.kernel.plan(wrapper, batch)
        self.wrapper = wrapper

    def _start(self, batch: ForwardBatch) -> None:
        self._batch, self.wrapper, self._requests = batch, None, None

    def _rows(self) -> RequestRows:
        # only a torch-computed layer needs them: reading them syncs with the device
        if self._requests is None:
            self._requests = request_rows(self._batch)
        return self._requests

    def _decoding(self, batch: ForwardBatch, kind: type) -> bool:
        """Whether this step's layer of `kind` runs the planned wrapper (else torch)."""
        if self._batch is not batch:
            raise RuntimeError("FlashInferBackend.plan(batch) was not called for this batch")
        return self.wrapper is not None and isinstance(self.kernel.spec, kind)

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        layer_id: int,
        spec: AttentionSpec,
        batch: ForwardBatch,
    ) -> torch.Tensor:
        if self._decoding(batch, AttentionSpec):
            return self.kernel.run(self.wrapper, q, layer_id, batch)
        if batch.mode is ForwardMode.EXTEND:
            return sdpa_extend(q, layer_id, spec, batch, self._rows())
        return torch_attention(q, layer_id, spec, batch, self._rows())

    def forward_mla(
        self,
        q_latent: torch.Tensor,
        q_pe: torch.Tensor,
        layer_id: int,
        spec: MLASpec,
        batch: ForwardBatch,
    ) -> torch.Tensor:
        if self._decoding(batch, MLASpec):
            return self.kernel.run(self.wrapper, q_latent, q_pe, layer_id, batch)
        return torch_mla(q_latent, q_pe, layer_id, spec, batch, self._rows())


def sdpa_extend(
    q: torch.Tensor, layer_id: int, spec: AttentionSpec, batch: ForwardBatch, rows: RequestRows
) -> torch.Tensor:
    """Causal attention of each request's new rows over its cached context; padding rows 0."""
    k_buf, v_buf = batch.kv_pool.layer(layer_id)
    out = q.new_zeros(q.shape[0], q.shape[1], spec.v_head_dim)
    for start, new, req_row, seq_len in rows:
        slots = batch.req_to_token[req_row, :seq_len]
        qs = q[start : start + new].transpose(0, 1).unsqueeze(0)
        ks, vs = (buf[slots].transpose(0, 1).unsqueeze(0) for buf in (k_buf, v_buf))
        mask = None
        if new != seq_len:  # a cached prefix: the new rows sit at the end of the context
            mask = torch.ones(new, seq_len, dtype=torch.bool, device=q.device).tril(seq_len - new)
        o = F.scaled_dot_product_attention(
            qs, ks, vs, attn_mask=mask, is_causal=mask is None, scale=spec.scaling, enable_gqa=True
        )
        out[start : start + new] = o[0].transpose(0, 1)
    return out
