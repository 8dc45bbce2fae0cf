"""DeepSeek-V4 KV compressors (transformers 5.23 `DeepseekV4HCACompressor` and
`DeepseekV4CSACompressor`) over per-token state rows in the paged KV pool.

Every token writes one float32 state row at its own slot,
``[kv_proj(h) | gate_proj(h) + ape[pos % m]]``; the projections are 1 (HCA) or 2 (CSA)
times the entry width wide. The token that closes window w (position ``(w+1)m - 1``)
turns the state rows of the window into compressed entry w, stored at that token's slot:

- HCA: ``softmax_j(gate_j) · kv_j`` over the m tokens of window w, per channel;
- CSA: the same over 2m slots, the Ca half (``[:d]``) of window w-1 and the Cb half
  (``[d:]``) of window w; window -1 does not exist (zero kv, -inf gate: weight 0);

then the weighted norm and the compress RoPE at position ``w * m``. State rows persist, so a
window opened in an earlier step (or prefill chunk) closes from the pool like any other;
the caller writes all of a step's state rows before closing any window.
"""

from __future__ import annotations

import torch
from torch import nn

from engine.model_api.contract import KVBufferSpec
from engine.model_api.forward_batch import ForwardBatch
from models.layers.dsv4_rotary import DeepseekV4Rotary, apply_dsv4_rotary
from models.layers.linear import ReplicatedLinear
from models.layers.norm import Fp32RMSNorm


class ClosedWindows:
    """The windows of `rate` tokens closed by the real rows of one step, every request's."""

    def __init__(self, batch: ForwardBatch, rate: int) -> None:
        counts, ids = [], []
        for seq_len, new in zip(batch.seq_lens, batch.extend_lens):
            # window w closes at position (w+1)*rate - 1; this step wrote [seq_len - new, seq_len)
            first, end = (seq_len - new) // rate, seq_len // rate
            counts.append(end - first)
            ids.extend(range(first, end))
        device = batch.req_to_token.device
        self.rate = rate
        self.count = len(ids)
        self.window = torch.tensor(ids, dtype=torch.int64, device=device)
        counts_t = torch.tensor(counts, dtype=torch.int64, device=device)
        self.table_row = batch.req_pool_indices.repeat_interleave(counts_t, output_size=len(ids))
        self.req_to_token = batch.req_to_token

    def slots(self, offsets: range) -> torch.Tensor:
        """[windows, len(offsets)] slots of positions ``w*rate + offset`` (clamped at 0:
        callers mask the positions before the sequence)."""
        off = torch.tensor(list(offsets), dtype=torch.int64, device=self.window.device)
        pos = (self.window[:, None] * self.rate + off[None]).clamp(min=0)
        return self.req_to_token[self.table_row[:, None], pos]


def entry_slots(table: torch.Tensor, num_entries: int, rate: int) -> torch.Tensor:
    """Slots holding a request's entries 0..num_entries-1 (each at its closing token), given
    its row of the request-to-token table."""
    closing = torch.arange(1, num_entries + 1, device=table.device) * rate - 1
    return table[closing]


class DeepseekV4Compressor(nn.Module):
    """One compressor: `overlap` False is HCA's, True is CSA's (also the indexer's, at its
    own width). Parameter names are the saved checkpoint's (`wkv`, `wgate`, `ape`, `norm`)."""

    def __init__(
        self,
        hidden_size: int,
        width: int,
        rate: int,
        overlap: bool,
        eps: float,
        rotary: DeepseekV4Rotary,
    ) -> None:
        super().__init__()
        self.width, self.rate, self.overlap = width, rate, overlap
        coff = 2 if overlap else 1
        self.proj_width = coff * width
        self.wkv = ReplicatedLinear(hidden_size, self.proj_width)
        self.wgate = ReplicatedLinear(hidden_size, self.proj_width)
        # transformers keeps the position bias in float32 whatever the model dtype
        self.ape = nn.Parameter(
            torch.zeros(rate, self.proj_width, dtype=torch.float32), requires_grad=False
        )
        self.norm = Fp32RMSNorm(width, eps)
        self.rotary = rotary

    def kv_cache_shapes(self) -> list[KVBufferSpec]:
        """The float32 state row, then the closed-entry row (pool dtype)."""
        return [((1, 2 * self.proj_width), torch.float32), (1, self.width)]

    def write_state(
        self,
        hidden: torch.Tensor,
        positions: torch.Tensor,
        slots: torch.Tensor,
        state: torch.Tensor,
    ) -> None:
        """Write every row's state row at its slot (padding rows write the sink slot)."""
        kv = self.wkv(hidden).float()
        gate = self.wgate(hidden).float() + self.ape.float()[positions % self.rate]
        state[slots] = torch.cat((kv, gate), dim=-1).unsqueeze(1)

    def close(self, windows: ClosedWindows, state: torch.Tensor, entries: torch.Tensor) -> None:
        """Compute the entries of `windows` from the state rows; store each at its closing
        token's slot."""
        if windows.count == 0:
            return
        m, d = self.rate, self.width
        if self.overlap:
            rows = state[windows.slots(range(-m, m))].flatten(1, 2)  # [n, 2m, 4d]
            kv = torch.cat((rows[:, :m, :d], rows[:, m:, d : 2 * d]), dim=1)
            gate = torch.cat((rows[:, :m, 2 * d : 3 * d], rows[:, m:, 3 * d :]), dim=1)
            # entry 0 has no previous window: its Ca slots take softmax weight 0
            ca_slot = torch.arange(2 * m, device=kv.device) < m
            first = (windows.window == 0)[:, None, None] & ca_slot[None, :, None]
            kv = kv.masked_fill(first, 0.0)
            gate = gate.masked_fill(first, float("-inf"))
        else:
            rows = state[windows.slots(range(m))].flatten(1, 2)  # [n, m, 2d]
            kv, gate = rows[..., :d], rows[..., d:]
        dtype = entries.dtype
        # the softmax over the window runs in float32, the weighted sum in the model dtype
        weights = gate.softmax(dim=1, dtype=torch.float32).to(dtype)
        pooled = self.norm((kv.to(dtype) * weights).sum(dim=1))
        cos, sin = self.rotary.cos_sin(windows.window * m, dtype)
        pooled = apply_dsv4_rotary(pooled, cos, sin)
        entries[windows.slots(range(m - 1, m))[:, 0]] = pooled.unsqueeze(1)
