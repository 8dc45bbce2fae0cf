"""A request inside one rank's scheduler: its tokens and where its KV lives."""

from __future__ import annotations

import enum

from engine.messages import Request


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class Sequence:
    def __init__(self, request: Request) -> None:
        self.rid = request.rid
        self.params = request.params
        self.seed = request.seed
        self.token_ids = list(request.prompt_ids)
        self.num_prompt = len(request.prompt_ids)
        self.status = Status.WAITING
        self.row: int | None = None  # row of the request-to-token table
        self.slots: list[int] = []  # KV slots reserved for every token it will feed
        self.generator = None  # torch.Generator, created on first sampled step
        # tokens sampled by steps the host has not read back yet (0, 1, or 2 while the
        # overlap scheduler runs the next step before reading the last one)
        self.in_flight = 0

    def __len__(self) -> int:
        """Tokens the host knows: the prompt and the outputs read back."""
        return len(self.token_ids)

    @property
    def total(self) -> int:
        """Tokens including those still on the device: the next step feeds the last."""
        return len(self.token_ids) + self.in_flight

    @property
    def num_output(self) -> int:
        return len(self.token_ids) - self.num_prompt

    @property
    def scheduled_outputs(self) -> int:
        return self.total - self.num_prompt

    @property
    def budget(self) -> int:
        """KV slots the request can ever need: the last sampled token is never fed back."""
        return self.num_prompt + self.params.max_new_tokens - 1
