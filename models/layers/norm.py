"""RMSNorm with the residual add fused in, as transformers' Llama computes it, and
DeepSeek-V4's variants (float32 weight multiplied before the cast; unweighted)."""

from __future__ import annotations

import torch
from torch import nn

from models.layers.elementwise_triton import fusable, rmsnorm


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size), requires_grad=False)

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Without `residual`: norm(x). With it: (norm(x + residual), x + residual).
        On CUDA one Triton kernel (`elementwise_triton.rmsnorm`) does either."""
        if type(self)._norm is RMSNorm._norm and fusable(x):
            return rmsnorm(x, self.weight, self.eps, residual)
        if residual is None:
            return self._norm(x)
        x = x + residual
        return self._norm(x), x


class Fp32RMSNorm(RMSNorm):
    """DeepSeek-V4's RMSNorm: a float32 weight (whatever the model dtype, as transformers'
    `_keep_in_fp32_modules_strict`) multiplied by the float32-normalised x, cast once at
    the end; `RMSNorm` casts first, which rounds differently in bf16."""

    def __init__(self, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__(hidden_size, eps)
        weight = torch.ones(hidden_size, dtype=torch.float32)
        self.weight = nn.Parameter(weight, requires_grad=False)

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return (self.weight * x).to(dtype)


def rms_norm_unweighted(x: torch.Tensor, eps: float) -> torch.Tensor:
    """RMS-normalise the last dim without a weight; the statistic in float32, the multiply
    in x's dtype (transformers' `DeepseekV4UnweightedRMSNorm`)."""
    return x * torch.rsqrt(x.float().square().mean(-1, keepdim=True) + eps).to(x.dtype)
