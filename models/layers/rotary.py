"""Rotary position embedding with the rope types of transformers 5.23 `modeling_rope_utils`.

`rope_parameters` is the standardized dict (`engine.model_config.rope_parameters`): it carries
`rope_type`, `rope_theta` and the type's own keys. cos/sin are computed from the positions of
each step, in float32 then cast, exactly as transformers does, so no cache needs sizing.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn


def yarn_get_mscale(scale: float, mscale: float = 1.0) -> float:
    if scale <= 1:
        return 1.0
    return 0.1 * mscale * math.log(scale) + 1.0


def yarn_softmax_scale(rope_parameters: dict[str, Any], scaling: float) -> float:
    """DeepSeek's attention softmax scale: `scaling` times mscale(factor, mscale_all_dim)**2."""
    if rope_parameters.get("rope_type", "default") != "default":
        mscale_all_dim = rope_parameters.get("mscale_all_dim", 0)
        if mscale_all_dim:
            mscale = yarn_get_mscale(rope_parameters["factor"], mscale_all_dim)
            scaling = scaling * mscale * mscale
    return scaling


def rotary_dim(rope_parameters: dict[str, Any], head_dim: int) -> int:
    return int(head_dim * rope_parameters.get("partial_rotary_factor", 1.0))


def _base_inv_freq(base: float, dim: int) -> torch.Tensor:
    return 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))


def rope_inv_freq(
    rope_parameters: dict[str, Any],
    head_dim: int,
    max_position_embeddings: int,
    seq_len: int | None = None,
) -> tuple[torch.Tensor, float]:
    """Inverse frequencies [rotary_dim // 2] (float32) and the factor scaling cos and sin.

    `seq_len` matters only to "dynamic": the context length the step reaches.
    """
    p = rope_parameters
    rope_type = p.get("rope_type", "default")
    base = p["rope_theta"]
    dim = rotary_dim(p, head_dim)
    if rope_type == "default":
        return _base_inv_freq(base, dim), 1.0
    if rope_type == "linear":
        return _base_inv_freq(base, dim) / p["factor"], 1.0
    if rope_type == "dynamic":
        factor, length = p["factor"], max(seq_len or 0, max_position_embeddings)
        base = base * ((factor * length / max_position_embeddings) - (factor - 1)) ** (
            dim / (dim - 2)
        )
        return _base_inv_freq(base, dim), 1.0
    if rope_type == "llama3":
        return _llama3_inv_freq(p, _base_inv_freq(base, dim)), 1.0
    if rope_type == "yarn":
        return _yarn_inv_freq(p, base, dim, max_position_embeddings)
    raise ValueError(
        f"unsupported rope_type {rope_type!r} (parcap supports default, linear, "
        "dynamic, llama3, yarn)"
    )


def _llama3_inv_freq(p: dict[str, Any], inv_freq: torch.Tensor) -> torch.Tensor:
    factor, low, high = p["factor"], p["low_freq_factor"], p["high_freq_factor"]
    old_context = p["original_max_position_embeddings"]
    low_freq_wavelen, high_freq_wavelen = old_context / low, old_context / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_context / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


def _yarn_inv_freq(
    p: dict[str, Any], base: float, dim: int, max_position_embeddings: int
) -> tuple[torch.Tensor, float]:
    original = p["original_max_position_embeddings"]
    factor = p.get("factor") or max_position_embeddings / original
    attention_factor = p.get("attention_factor")
    if attention_factor is None:
        mscale, mscale_all_dim = p.get("mscale"), p.get("mscale_all_dim")
        if mscale and mscale_all_dim:
            attention_factor = yarn_get_mscale(factor, mscale) / yarn_get_mscale(
                factor, mscale_all_dim
            )
        else:
            attention_factor = yarn_get_mscale(factor)
    beta_fast, beta_slow = p.get("beta_fast") or 32, p.get("beta_slow") or 1

    def correction_dim(rotations: float) -> float:
        return (dim * math.log(original / (rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if p.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    pos_freqs = base ** (torch.arange(0, dim, 2).float() / dim)
    extrapolation, interpolation = 1.0 / pos_freqs, 1.0 / (factor * pos_freqs)
    extrapolation_weight = 1 - ramp
    inv_freq = interpolation * (1 - extrapolation_weight) + extrapolation * extrapolation_weight
    return inv_freq, float(attention_factor)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(
    x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool = False
) -> torch.Tensor:
    """Rotate x [tokens, heads, dim >= rotary_dim] by cos/sin [tokens, rotary_dim].

    Interleaved pairs (x0, x1), (x2, x3)... come out in halves, as transformers' DeepSeek does.
    """
    dim = cos.shape[-1]
    rot, rest = x[..., :dim], x[..., dim:]
    cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)
    if interleaved:
        cos, sin = cos[..., : dim // 2], sin[..., : dim // 2]
        x1, x2 = rot[..., 0::2], rot[..., 1::2]
        rot = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
    else:
        rot = rot * cos + _rotate_half(rot) * sin
    return torch.cat((rot, rest), dim=-1) if rest.shape[-1] else rot


_FUSED_TABLES: dict[tuple, torch.Tensor] = {}


class RotaryEmbedding(nn.Module):
    def __init__(
        self,
        head_dim: int,
        rope_parameters: dict[str, Any],
        max_position_embeddings: int,
        interleaved: bool = False,
    ) -> None:
        super().__init__()
        self.head_dim = head_dim
        self.rope_parameters = dict(rope_parameters)
        self.rope_type = self.rope_parameters.get("rope_type", "default")
        self.max_position_embeddings = max_position_embeddings
        self.interleaved = interleaved
        self.rotary_dim = rotary_dim(self.rope_parameters, head_dim)
        inv_freq, self.attention_factor = rope_inv_freq(
            self.rope_parameters, head_dim, max_position_embeddings
        )
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self._fused: torch.Tensor | None = None

    def fused_table(self, q: torch.Tensor) -> torch.Tensor | None:
        """The cos/sin table of the fused rope-and-store kernel for `q`'s device, or None
        where the kernel does not apply (CPU, no Triton, position-dependent frequencies,
        interleaved pairs): then the torch path runs."""
        from models.layers.rope_store import HAS_TRITON, cos_sin_table

        if not (q.is_cuda and HAS_TRITON) or self.interleaved or self.rope_type == "dynamic":
            return None
        if self._fused is not None and self._fused.device == q.device:
            # kept: the key below reads inv_freq on the host, a sync that a CUDA-graph
            # capture (and its host-sync probe) must not see
            return self._fused
        key = (self.rope_type, tuple(self.inv_freq.tolist()), self.attention_factor, q.device)
        table = _FUSED_TABLES.get(key)
        if table is None:  # one per rope configuration: every layer of a model shares it
            table = cos_sin_table(
                self.inv_freq, self.attention_factor, self.max_position_embeddings
            )
            _FUSED_TABLES[key] = table
        self._fused = table
        return table

    def _step_inv_freq(self, positions: torch.Tensor) -> torch.Tensor:
        if self.rope_type == "dynamic" and positions.numel():
            seq_len = int(positions.max()) + 1
            if seq_len > self.max_position_embeddings:
                inv_freq, _ = rope_inv_freq(
                    self.rope_parameters, self.head_dim, self.max_position_embeddings, seq_len
                )
                return inv_freq.to(self.inv_freq.device)
        return self.inv_freq

    def cos_sin(
        self, positions: torch.Tensor, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin [tokens, rotary_dim], scaled by the attention factor, in `dtype`."""
        freqs = positions[:, None].float() * self._step_inv_freq(positions).float()
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = emb.cos() * self.attention_factor, emb.sin() * self.attention_factor
        return cos.to(dtype), sin.to(dtype)

    def forward(
        self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """q [tokens, heads, head_dim] and k [tokens, kv_heads, head_dim], rotated."""
        cos, sin = self.cos_sin(positions, q.dtype)
        return apply_rotary(q, cos, sin, self.interleaved), apply_rotary(
            k, cos, sin, self.interleaved
        )
