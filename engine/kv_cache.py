"""Paged KV storage: a token-slot pool per layer and a request-to-slot table."""

from __future__ import annotations

from collections.abc import Sequence

import torch

SINK_SLOT = 0  # written by padding rows, never read


class KVPool:
    """`layer_shapes[l]` lists the per-slot shapes of layer l's buffers (K and V, or one latent)."""

    def __init__(
        self,
        num_slots: int,
        layer_shapes: Sequence[Sequence[tuple[int, ...]]],
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        self.num_slots = num_slots
        self.buffers = [
            [torch.zeros((num_slots + 1, *shape), dtype=dtype, device=device) for shape in shapes]
            for shapes in layer_shapes
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
        self.table[row, start : start + len(slots)] = torch.tensor(slots, dtype=torch.int64)
