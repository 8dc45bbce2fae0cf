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

    def __len__(self) -> int:
        return len(self.token_ids)

    @property
    def num_output(self) -> int:
        return len(self.token_ids) - self.num_prompt

    @property
    def budget(self) -> int:
        """KV slots the request can ever need: the last sampled token is never fed back."""
        return self.num_prompt + self.params.max_new_tokens - 1
