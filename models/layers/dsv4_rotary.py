"""DeepSeek-V4 RoPE (transformers 5.23 `deepseek_v4.apply_rotary_pos_emb`).

V4 lays each head out as ``[nope | rope]`` and rotates only the TRAILING `rotary_dim`
channels, as GPT-J pairs kept in place: channels (2i, 2i+1) turn by angle i. parcap's
`apply_rotary(interleaved=True)` rotates the leading channels and de-interleaves them into
halves (V3 style); since V4 reads K as V and feeds the output through `wo_a`, that channel
permutation would not cancel, so V4 has its own rotation here.

The output of the attention is rotated back with ``-sin`` (`inverse=True`) at the query
position, which undoes the rotation every value picked up with its key.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from models.layers.rotary import rope_inv_freq


class DeepseekV4Rotary(nn.Module):
    """cos and sin of one V4 rope table ("main" or "compress") at per-row positions."""

    def __init__(
        self, rope_parameters: dict[str, Any], rotary_dim: int, max_position_embeddings: int
    ) -> None:
        super().__init__()
        self.rotary_dim = rotary_dim
        # the table is built for the rotated slice itself, so the partial factor must not
        # shrink it a second time (transformers: int(head_dim * factor) == rotary_dim)
        params = {**rope_parameters, "partial_rotary_factor": 1.0}
        inv_freq, self.attention_factor = rope_inv_freq(params, rotary_dim, max_position_embeddings)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def cos_sin(
        self, positions: torch.Tensor, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin [rows, rotary_dim // 2] (one angle per pair), computed in float32 and
        cast to the activations' dtype as transformers does before rotating."""
        freqs = positions[:, None].float() * self.inv_freq.float()
        cos = freqs.cos() * self.attention_factor
        sin = freqs.sin() * self.attention_factor
        return cos.to(dtype), sin.to(dtype)


def apply_dsv4_rotary(
    x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, inverse: bool = False
) -> torch.Tensor:
    """Rotate the trailing ``2 * cos.shape[-1]`` channels of x [rows, ..., dim] by the
    angles of each row (cos/sin [rows, pairs]); `inverse` turns by ``-angle``.

    The math runs in float32 and is cast back once, as transformers does.
    """
    pairs = cos.shape[-1]
    extra = x.dim() - 2  # head axes between the row and the channel axis
    cos = cos.view(cos.shape[0], *([1] * extra), pairs, 1).float()
    sin = sin.view(sin.shape[0], *([1] * extra), pairs, 1).float()
    if inverse:
        sin = -sin
    nope, rope = x[..., : x.shape[-1] - 2 * pairs], x[..., x.shape[-1] - 2 * pairs :]
    r = rope.float().unflatten(-1, (pairs, 2))
    even, odd = r[..., :1], r[..., 1:]
    # (x0, x1) -> (x0 cos - x1 sin, x1 cos + x0 sin), in place of the pair
    rotated = torch.cat((even * cos - odd * sin, odd * cos + even * sin), dim=-1)
    return torch.cat((nope, rotated.flatten(-2).to(x.dtype)), dim=-1)
