"""The OpenAI wire format of requests: request bodies to validated engine inputs.

Validation follows the OpenAI API: a bad value is a 400 `invalid_request_error` naming
the parameter, an unknown model a 404, and a prompt that cannot fit the model's context
(or the launch's KV-cache and prefill limits) a 400 `context_length_exceeded`. Parameters
this engine cannot honour (`n` > 1, penalties, logit_bias, echo, ...) are refused with a
400 rather than silently ignored.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from attrs import frozen

from engine.frontend.tokenizer import Tokenizer
from engine.http.chat import ChatError, ChatFormat
from engine.messages import SamplingParams

MAX_STOP = 4  # OpenAI's limit on stop sequences
DEFAULT_COMPLETION_TOKENS = 16  # OpenAI's default max_tokens for /v1/completions
# Parameters a client may send at their neutral value; anything else is refused.
NEUTRAL = {
    "presence_penalty": (0, 0.0, None),
    "frequency_penalty": (0, 0.0, None),
    "logit_bias": (None, {}),
    "echo": (False, None),
    "suffix": (None, ""),
    "best_of": (1, None),
    "tools": (None, []),
    "functions": (None, []),
    "response_format": (None, {"type": "text"}),
}


class APIError(Exception):
    """An error response: HTTP status and the OpenAI error object."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }


def bad(param: str, message: str) -> APIError:
    return APIError(400, f"'{param}': {message}", param=param)


@frozen
class ModelCard:
    """What the server knows about the model it serves."""

    name: str
    context_len: int
    vocab_size: int
    tokenizer: Tokenizer | None
    chat: ChatFormat
    # why a (prompt_len, max_tokens) pair can never run, or None (the scheduler's check)
    check: Callable[[int, int], str | None]
    default_max_tokens: Callable[[int], int]  # for chat without max_tokens


@frozen
class GenRequest:
    """A validated completion or chat request, ready for the engine."""

    prompt_ids: list[int]
    params: SamplingParams
    stop: tuple[str, ...]
    stream: bool
    include_usage: bool
    logprobs: bool


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def _get(
    body: dict[str, Any], key: str, kind: str, check: Callable[[Any], bool], default: Any
) -> Any:
    value = body.get(key)
    if value is None:
        return default
    if not check(value):
        raise bad(key, f"must be {kind} (got {value!r})")
    return value


def _check_model(body: dict[str, Any], card: ModelCard) -> None:
    model = body.get("model")
    if model is None:
        return  # OpenAI requires it; one served model makes it unambiguous
    if not isinstance(model, str):
        raise bad("model", f"must be a string (got {model!r})")
    if model != card.name:
        raise APIError(
            404,
            f"The model '{model}' does not exist; this server serves '{card.name}'",
            param="model",
            code="model_not_found",
        )


def _check_neutral(body: dict[str, Any]) -> None:
    for key, neutral in NEUTRAL.items():
        if key in body and body[key] not in neutral:
            raise bad(key, f"is not supported by this server (got {body[key]!r})")
    n = body.get("n")
    if n is not None and (not _is_int(n) or n != 1):
        raise bad("n", f"only n=1 is supported (got {n!r})")


def _stop(body: dict[str, Any]) -> tuple[str, ...]:
    stop = body.get("stop")
    if stop is None:
        return ()
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop):
        raise bad("stop", "must be a non-empty string or a list of non-empty strings")
    if len(stop) > MAX_STOP:
        raise bad("stop", f"at most {MAX_STOP} stop sequences (got {len(stop)})")
    return tuple(stop)


def _sampling(
    body: dict[str, Any], prompt_len: int, card: ModelCard, default_max: int
) -> SamplingParams:
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    key = "max_completion_tokens" if "max_completion_tokens" in body else "max_tokens"
    if max_tokens is None:
        max_tokens = default_max
    elif not _is_int(max_tokens) or max_tokens < 1:
        raise bad(key, f"must be an integer >= 1 (got {max_tokens!r})")
    elif max_tokens > card.context_len:
        raise bad(
            key, f"must be at most the model's context length {card.context_len} (got {max_tokens})"
        )
    temperature = _get(
        body, "temperature", "a number >= 0", lambda v: _is_number(v) and v >= 0, 1.0
    )
    top_p = _get(body, "top_p", "a number in (0, 1]", lambda v: _is_number(v) and 0 < v <= 1, 1.0)
    top_k = _get(body, "top_k", "an integer >= -1", lambda v: _is_int(v) and v >= -1, 0)
    seed = _get(body, "seed", "an integer", _is_int, None)
    ignore_eos = _get(body, "ignore_eos", "a boolean", lambda v: isinstance(v, bool), False)
    why = card.check(prompt_len, max_tokens)
    if why is not None:
        raise APIError(
            400,
            why,
            param="messages" if "messages" in body else "prompt",
            code="context_length_exceeded",
        )
    return SamplingParams(
        max_new_tokens=max_tokens,
        temperature=float(temperature),
        top_p=float(top_p),
        top_k=max(top_k, 0),  # -1 (vLLM's "off") and 0 both mean no top-k
        seed=None if seed is None else seed % 2**64,  # torch seeds are unsigned 64-bit
        ignore_eos=ignore_eos,
    )


def _stream_options(body: dict[str, Any], stream: bool) -> bool:
    options = body.get("stream_options")
    if options is None:
        return False
    if not stream:
        raise bad("stream_options", "is only allowed with stream=true")
    if not isinstance(options, dict):
        raise bad("stream_options", "must be an object")
    return bool(_get(options, "include_usage", "a boolean", lambda v: isinstance(v, bool), False))


def _prompt_ids(prompt: Any, card: ModelCard) -> list[int]:
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str | list):
        prompt = prompt[0]  # a batch of one
    if isinstance(prompt, str):
        if card.tokenizer is None:
            raise bad("prompt", "this model has no tokenizer; send the prompt as token ids")
        return card.tokenizer.encode(prompt)
    if isinstance(prompt, list) and prompt and all(_is_int(t) for t in prompt):
        out = [t for t in prompt if not 0 <= t < card.vocab_size]
        if out:
            raise bad(
                "prompt", f"token id {out[0]} is outside the vocabulary (0..{card.vocab_size - 1})"
            )
        return list(prompt)
    if (
        isinstance(prompt, list)
        and len(prompt) > 1
        and all(isinstance(p, str | list) for p in prompt)
    ):
        raise bad("prompt", "one prompt per request is supported (got a batch)")
    raise bad("prompt", "must be a string or a non-empty list of token ids")


def parse_completion(body: dict[str, Any], card: ModelCard) -> GenRequest:
    _check_model(body, card)
    _check_neutral(body)
    if "prompt" not in body:
        raise bad("prompt", "is required")
    ids = _prompt_ids(body["prompt"], card)
    logprobs = _get(body, "logprobs", "an integer", _is_int, None)
    if logprobs is not None and logprobs != 0:
        raise bad("logprobs", "only 0 is supported: the sampled token's logprob, no alternatives")
    return _finish(body, card, ids, DEFAULT_COMPLETION_TOKENS, logprobs is not None)


def parse_chat(body: dict[str, Any], card: ModelCard) -> GenRequest:
    _check_model(body, card)
    _check_neutral(body)
    if card.tokenizer is None:
        raise bad("messages", "this model has no tokenizer; use /v1/completions with token ids")
    try:
        ids = card.chat.encode(body.get("messages"), card.tokenizer)
    except ChatError as e:
        raise bad("messages", str(e)) from None
    logprobs = _get(body, "logprobs", "a boolean", lambda v: isinstance(v, bool), False)
    top = _get(body, "top_logprobs", "an integer", _is_int, 0)
    if top != 0:
        raise bad(
            "top_logprobs", "only 0 is supported: the sampled token's logprob, no alternatives"
        )
    return _finish(body, card, ids, card.default_max_tokens(len(ids)), logprobs)


def _finish(
    body: dict[str, Any], card: ModelCard, ids: list[int], default_max: int, logprobs: bool
) -> GenRequest:
    if not ids:
        raise bad("messages" if "messages" in body else "prompt", "encodes to no tokens")
    stream = _get(body, "stream", "a boolean", lambda v: isinstance(v, bool), False)
    return GenRequest(
        prompt_ids=ids,
        params=_sampling(body, len(ids), card, default_max),
        stop=_stop(body),
        stream=stream,
        include_usage=_stream_options(body, stream),
        logprobs=logprobs,
    )
