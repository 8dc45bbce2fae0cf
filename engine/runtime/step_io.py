"""A step's sampled tokens on their way to the host, and on the device for the next step.

The overlap scheduler launches step N+1 before the host has read step N's tokens: every
request's latest sampled token is kept on the device (`TokenBoard`), where the next decode
step gathers its input ids, and the host reads the tokens back asynchronously
(`SampledStep`), one step later, for stop checks and streaming.
"""

from __future__ import annotations

import torch


class TokenBoard:
    """Row r holds the latest token sampled for the request at request-table row r; one more
    row, always 0, is what padding rows feed."""

    def __init__(self, max_requests: int, device: torch.device) -> None:
        self.tokens = torch.zeros(max_requests + 1, dtype=torch.int64, device=device)
        self.pad_row = max_requests

    def write(self, rows: torch.Tensor, tokens: torch.Tensor) -> None:
        self.tokens.index_copy_(0, rows, tokens)

    def read(self, rows: torch.Tensor) -> torch.Tensor:
        return self.tokens.index_select(0, rows)


class DeviceClock:
    """The device time of decode steps, from CUDA events around each launch: the GPU time
    between the step's first and last kernel, whatever the host did meanwhile. Read when a
    step's tokens are, so it never waits on the device itself. A no-op on the CPU."""

    def __init__(self, device: torch.device) -> None:
        self.enabled = device.type == "cuda"
        self.total_ms, self.steps = 0.0, 0

    def start(self) -> torch.cuda.Event | None:
        if not self.enabled:
            return None
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def stop(self, start: torch.cuda.Event | None) -> tuple | None:
        if start is None:
            return None
        end = torch.cuda.Event(enable_timing=True)
        end.record()
        return start, end

    def add(self, span: tuple | None) -> None:
        """Count a finished step's span (its tokens were read, so its events completed)."""
        if span is not None:
            self.total_ms += span[0].elapsed_time(span[1])
            self.steps += 1

    @property
    def mean_ms(self) -> float | None:
        return round(self.total_ms / self.steps, 4) if self.steps else None


class SampledStep:
    """One step's tokens and logprobs, copied to the host without waiting for the device;
    `resolve` waits for that copy only."""

    def __init__(self, tokens: torch.Tensor, logprobs: torch.Tensor, must_wait: bool) -> None:
        # one copy: ids < 2**53 are exact in float64
        both = torch.stack([tokens.double(), logprobs.double()])
        self.event = None
        if both.is_cuda:
            self.host = torch.empty(both.shape, dtype=both.dtype, pin_memory=True)
            self.host.copy_(both, non_blocking=True)
            self.event = torch.cuda.Event()
            self.event.record()
        else:
            self.host = both
        # rows drawn on the host made this step wait already: nothing to overlap
        self.must_wait = must_wait

    def resolve(self) -> tuple[list[int], list[float]]:
        if self.event is not None:
            self.event.synchronize()
        return [int(t) for t in self.host[0].tolist()], self.host[1].tolist()
