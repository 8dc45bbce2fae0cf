"""Gated activations over a fused [gate | up] projection."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from models.layers.elementwise_triton import fusable, silu_and_mul


def clamp_gate_up(
    gate: torch.Tensor, up: torch.Tensor, limit: float | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepSeek-V4's `swiglu_limit`: gate clamped from above only, up on both sides (None:
    no clamp)."""
    if limit is None:
        return gate, up
    return gate.clamp(max=limit), up.clamp(min=-limit, max=limit)


class SiluAndMul(nn.Module):
    """silu(gate) * up, with the gate and up optionally clamped at `swiglu_limit`."""

    def __init__(self, swiglu_limit: float | None = None) -> None:
        super().__init__()
        self.swiglu_limit = swiglu_limit

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if fusable(x):  # one Triton kernel on CUDA
            return silu_and_mul(x, self.swiglu_limit)
        gate, up = clamp_gate_up(*x.chunk(2, dim=-1), self.swiglu_limit)
        return F.silu(gate) * up
