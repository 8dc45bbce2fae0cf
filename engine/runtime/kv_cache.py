"""Paged KV storage: a token-slot pool per layer and a request-to-slot table."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from engine.model_api.contract import KVBufferSpec

SINK_SLOT = 0  # written by padding rows, never read


def buffer_spec(spec: KVBufferSpec, dtype: torch.dtype) -> tuple[tuple[int, ...], torch.dtype]:
    """(per-slot shape, dtype) of a declared buffer: a bare shape takes the pool's dtype."""
    if len(spec) == 2 and isinstance(spec[1], torch.dtype):
        return tuple(spec[0]), spec[1]
    return tuple(spec), dtype


class KVPool:
    """`layer_shapes[l]` declares layer l's per-slot buffers (K and V, one latent, ...), each
    a shape in the pool's `dtype` or a (shape, dtype) pair (see `KVBufferSpec`)."""

    def __init__(
        self,
        num_slots: int,
        layer_shapes: Sequence[Sequence[KVBufferSpec]],
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        self.num_slots = num_slots
        self.buffers = [
            [
                torch.zeros((num_slots + 1, *shape), dtype=buf_dtype, device=device)
                for shape, buf_dtype in (buffer_spec(spec, dtype) for spec in specs)
            ]
            for specs in layer_shapes
        ]
        self._free = list(range(num_slots, 0, -1))

    @property
    def available(self) -> int:
        return len(self._free)

    def alloc(self, n: int) -> list[int] | None:
        if n > len(self._free):
            return None
        taken, self._free = self._free[len(self._free) - n :], self._free[: len(self._free) - n]
        return taken[::-1]

    def free(self, slots: Sequence[int]) -> None:
        self._free.extend(slots)

    def layer(self, layer_id: int) -> list[torch.Tensor]:
        return self.buffers[layer_id]

    def store(self, layer_id: int, slots: torch.Tensor, *values: torch.Tensor) -> None:
        for buf, value in zip(self.buffers[layer_id], values, strict=True):
            buf[slots] = value.to(buf.dtype)

    @property
    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for layer in self.buffers for b in layer)


class ReqToTokenPool:
    """Row r holds the KV slots of the request placed at r, in token order."""

    def __init__(self, max_requests: int, max_context: int, device: torch.device) -> None:
        self.table = torch.zeros((max_requests, max_context), dtype=torch.int64, device=device)
        self.max_context = max_context
        self._free = list(range(max_requests - 1, -1, -1))

    @property
    def available(self) -> int:
        return len(self._free)

    def alloc(self) -> int | None:
        return self._free.pop() if self._free else None

    def free(self, row: int) -> None:
        self._free.append(row)

    def write(self, row: int, start: int, slots: Sequence[int]) -> None:
        # non-blocking: queued behind the steps in flight, without waiting for them
        values = torch.tensor(slots, dtype=torch.int64)
        self.table[row, start : start + len(slots)].copy_(values, non_blocking=True)
