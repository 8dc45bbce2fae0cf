"""Resolve a launch once in the front end, before any rank starts: the model source, the
plan, every check `engine.frontend.preflight` can make, and the tokenizer. The ranks are
then started by `Ranks` (spawned here), by a node agent on the other hosts of a multi-host
launch, or by torchrun."""

from __future__ import annotations

import socket
from typing import Any

import torch
from attrs import frozen

from engine.attention.registry import BackendUnavailable, check_available
from engine.frontend.model_source import ModelSourceError, model_source, with_context
from engine.frontend.preflight import (
    check_device,
    check_divisible,
    check_kv_pool,
    check_nodes,
    check_weights,
    is_torchrun,
)
from engine.frontend.ranks import Ranks, describe_exit
from engine.frontend.tokenizer import Tokenizer, TokenizerError, eos_ids, load_tokenizer
from engine.messages import Launch
from engine.server_args import ServerArgs
from registry import (
    ModelInfo,
    ModelLoadError,
    PlanRefused,
    UnknownArchitecture,
    explain_json,
    get_model_info,
    resolve_plan,
)
from registry.args import UsageError

__all__ = [
    "USER_ERRORS",
    "RankError",
    "Ranks",
    "Setup",
    "check_divisible",
    "describe_exit",
    "init_method",
    "is_torchrun",
    "prepare",
]

# What `prepare` raises for a user's mistake: one line, exit code 2, before any rank starts.
USER_ERRORS = (
    UnknownArchitecture,
    ModelLoadError,
    ModelSourceError,
    PlanRefused,
    TokenizerError,
    UsageError,
    BackendUnavailable,
)


class RankError(RuntimeError):
    """A rank failed; the message names it (``rank N: Error: ...``)."""


@frozen
class Setup:
    """A launch resolved in the front end, before any rank starts."""

    launch: Launch
    info: ModelInfo
    tokenizer: Tokenizer | None

    @property
    def explain(self) -> dict[str, Any]:
        return explain_json(self.info, self.launch.plan)


def prepare(args: ServerArgs) -> Setup:
    """Model source, plan and tokenizer for `args`.

    Raises one of USER_ERRORS for a user's mistake.
    """
    if args.dp_size > 1 and not args.enable_dp_attention:
        raise UsageError(
            f"--dp-size {args.dp_size} without --enable-dp-attention would ask for "
            "data-parallel replicas, which parcap does not run; add --enable-dp-attention "
            "or drop --dp-size"
        )
    check_nodes(args)
    check_device(args)
    check_available(
        args.attention_backend, getattr(torch, args.resolved_dtype), torch.device(args.device)
    )
    source = with_context(model_source(args.model, args.model_path), args.context_length)
    info = get_model_info(source.architecture)
    plan = resolve_plan(info.capabilities, args, model=source.architecture)
    check_divisible(info.cls, source, args, plan)
    check_kv_pool(args, source)
    check_weights(args, source)
    tokenizer = load_tokenizer(args.model_path, source.namespace)
    launch = Launch(args, plan, source, init_method(args), eos_ids(source.namespace))
    return Setup(launch, info, tokenizer)


def init_method(args: ServerArgs) -> str:
    if is_torchrun():
        return "env://"
    if args.dist_init_addr:
        return f"tcp://{args.dist_init_addr}"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"tcp://127.0.0.1:{s.getsockname()[1]}"
