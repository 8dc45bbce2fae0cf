"""The OpenAI wire format of responses: the completion and chat bodies and their SSE chunks.

A streamed response is a series of `data: {chunk}` events ending with `data: [DONE]`; each
chunk repeats the response's id, creation time and model, like OpenAI's.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import TYPE_CHECKING, Any

from attrs import frozen

from engine.frontend.tokenizer import Tokenizer
from engine.http.openai_request import ModelCard

if TYPE_CHECKING:
    from engine.http.streaming import Piece

DONE = "data: [DONE]\n\n"


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def token_texts(tokenizer: Tokenizer | None, ids: list[int]) -> list[str]:
    if tokenizer is None:
        return [f"token_id:{i}" for i in ids]
    return [tokenizer.decode([i]) for i in ids]


def completion_logprobs(
    tokenizer: Tokenizer | None, ids: list[int], logprobs: list[float], offset: int
) -> dict[str, Any]:
    tokens = token_texts(tokenizer, ids)
    offsets = []
    for t in tokens:
        offsets.append(offset)
        offset += len(t)
    return {
        "tokens": tokens,
        "token_logprobs": logprobs,
        "top_logprobs": None,
        "text_offset": offsets,
    }


def chat_logprobs(
    tokenizer: Tokenizer | None, ids: list[int], logprobs: list[float]
) -> dict[str, Any]:
    return {
        "content": [
            {"token": t, "logprob": lp, "bytes": list(t.encode()), "top_logprobs": []}
            for t, lp in zip(token_texts(tokenizer, ids), logprobs, strict=True)
        ]
    }


# -- the two OpenAI endpoints' shapes -----------------------------------------------


class CompletionShape:
    prefix, object, chunk_object = "cmpl", "text_completion", "text_completion"

    @staticmethod
    def choice(
        card: ModelCard, p: Piece, offset: int, logprobs: bool, first: bool, chunk: bool
    ) -> dict[str, Any]:
        lp = completion_logprobs(card.tokenizer, p.ids, p.logprobs, offset) if logprobs else None
        return {"index": 0, "text": p.text, "logprobs": lp, "finish_reason": p.finish_reason}


class ChatShape:
    prefix, object, chunk_object = "chatcmpl", "chat.completion", "chat.completion.chunk"

    @staticmethod
    def choice(
        card: ModelCard, p: Piece, offset: int, logprobs: bool, first: bool, chunk: bool
    ) -> dict[str, Any]:
        lp = chat_logprobs(card.tokenizer, p.ids, p.logprobs) if logprobs else None
        if not chunk:
            message = {"role": "assistant", "content": p.text}
            return {
                "index": 0,
                "message": message,
                "logprobs": lp,
                "finish_reason": p.finish_reason,
            }
        delta: dict[str, Any] = {"role": "assistant"} if first else {}
        if p.text or first:
            delta["content"] = p.text
        return {"index": 0, "delta": delta, "logprobs": lp, "finish_reason": p.finish_reason}


Shape = type[CompletionShape] | type[ChatShape]


def sse(data: dict[str, Any]) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


@frozen
class Reply:
    """What one response's body, or each of its chunks, starts with."""

    shape: Shape
    ident: str
    created: int
    model: str

    @classmethod
    def start(cls, shape: Shape, model: str) -> Reply:
        return cls(shape, new_id(shape.prefix), now(), model)

    def _head(self, obj: str) -> dict[str, Any]:
        return {"id": self.ident, "object": obj, "created": self.created, "model": self.model}

    def body(self, choice: dict[str, Any], usage: dict[str, int]) -> dict[str, Any]:
        return {**self._head(self.shape.object), "choices": [choice], "usage": usage}

    def chunk(
        self,
        choices: list[dict[str, Any]],
        *,
        with_usage: bool,
        usage: dict[str, int] | None = None,
    ) -> str:
        """One SSE event; asked for usage, OpenAI puts `"usage": null` on every chunk but
        the last, which has no choices and the totals."""
        data = {**self._head(self.shape.chunk_object), "choices": choices}
        if with_usage:
            data["usage"] = usage
        return sse(data)
