"""What can be known about a launch before any rank starts, checked in the front end.

Each check raises a `UsageError` (or `ModelSourceError` for the model's files) whose one
line names the flag and the numbers; every command reports it with exit code 2. What a
rank would otherwise find out after the spawn (a size that does not split over the ranks,
a device that is not there, weights that cannot be read) costs seconds here and no rank.
"""

from __future__ import annotations

import os

import torch

from engine.frontend.model_source import ModelSourceError
from engine.messages import ModelSource
from engine.model_api.contract import MoeSettings
from engine.model_api.weights import CheckpointError
from engine.server_args import ServerArgs
from registry import ParallelPlan
from registry.args import UsageError

TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "MASTER_ADDR")


def is_torchrun() -> bool:
    return all(v in os.environ for v in TORCHRUN_VARS)


def local_ranks(args: ServerArgs) -> int:
    """How many ranks run on this host."""
    if is_torchrun():
        return int(os.environ.get("LOCAL_WORLD_SIZE", os.environ["WORLD_SIZE"]))
    return args.tp_size // args.nnodes


def split_address(addr: str, flag: str = "--dist-init-addr") -> tuple[str, int]:
    """HOST:PORT (IPv6 hosts in brackets) as (host, port)."""
    host, _, port = addr.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65535:
        raise UsageError(f"{flag} {addr}: expected HOST:PORT with a port in 1..65534")
    return host.strip("[]"), int(port)


def check_nodes(args: ServerArgs) -> None:
    """--nnodes / --node-rank / --dist-init-addr agree, and parcap's own nodes are not
    mixed with torchrun's."""
    if args.dist_init_addr is not None:
        split_address(args.dist_init_addr)
    if args.nnodes == 1 and args.node_rank == 0:
        return
    if is_torchrun():
        raise UsageError(
            f"--nnodes {args.nnodes} --node-rank {args.node_rank}: under torchrun, torchrun's "
            "own --nnodes and rendezvous place the ranks; drop parcap's --nnodes and --node-rank"
        )
    if args.node_rank >= args.nnodes:
        raise UsageError(
            f"--node-rank {args.node_rank}: must be below --nnodes {args.nnodes} (nodes count "
            "from 0)"
        )
    if args.dist_init_addr is None:
        raise UsageError(
            f"--nnodes {args.nnodes} needs --dist-init-addr HOST:PORT: node 0's address, "
            "where every node meets (the same on every node)"
        )
    if args.tp_size % args.nnodes:
        raise UsageError(
            f"--tp-size {args.tp_size} --nnodes {args.nnodes}: every node runs tp_size / nnodes "
            f"ranks; {args.tp_size} ranks do not split evenly over {args.nnodes} nodes"
        )


def check_device(args: ServerArgs) -> None:
    """--device cuda needs CUDA and one visible GPU per rank on this host."""
    if args.device != "cuda":
        return
    if not torch.cuda.is_available():
        why = (
            "this torch has no CUDA support" if torch.version.cuda is None else "no GPU is visible"
        )
        raise UsageError(f"--device cuda: CUDA is not available here ({why}); use --device cpu")
    count, needed = torch.cuda.device_count(), local_ranks(args)
    if count < needed:
        nodes = f" --nnodes {args.nnodes}" if args.nnodes > 1 else ""
        raise UsageError(
            f"--device cuda --tp-size {args.tp_size}{nodes}: this host runs {needed} ranks, one "
            f"GPU each, but {count} GPU{'s are' if count != 1 else ' is'} visible"
        )


def check_divisible(cls: type, source: ModelSource, args: ServerArgs, plan: ParallelPlan) -> None:
    """Every config size the model splits over a parallel group splits evenly: else the
    flag and the numbers, as a user mistake (not a rank's error after the spawn)."""
    sizes = {"tp": (args.tp_size, "TP"), "attn_tp": (plan.attn_tp_size, "attention-TP")}
    flags = f"--tp-size {args.tp_size}"
    if plan.attn_dp_size > 1:
        flags += f" --dp-size {args.dp_size} --enable-dp-attention"
    for c in cls.parallel_constraints(source.namespace, MoeSettings.from_args(args)):
        size, label = sizes[c.group]
        if not c.holds(size):
            either = " (or divide it)" if c.either_way else ""
            raise UsageError(
                f"{flags}: {source.architecture}'s {c.name} ({c.value}) must be divisible "
                f"by the {label} size ({size}){either}"
            )


def check_kv_pool(args: ServerArgs, source: ModelSource) -> None:
    """The KV pool holds one request of the context asked for (`--context-length`)."""
    if args.context_length is None:
        return  # the model's whole context is not asked for: longer requests are refused one by one
    slots = args.context_length - 1  # the last generated token is never written to the cache
    if slots > args.max_total_tokens:
        raise UsageError(
            f"--context-length {args.context_length}: one request that long needs {slots} KV "
            f"slots, more than --max-total-tokens {args.max_total_tokens}"
        )


def check_weights(args: ServerArgs, source: ModelSource) -> None:
    """A checkpoint's weight files are all there and readable (headers only: every
    safetensors file is opened, no tensor is read)."""
    if source.path is None or args.load_format == "dummy":
        return
    from engine.runtime.loader import iter_checkpoint

    try:
        for _ in iter_checkpoint(source.path):
            pass
    except CheckpointError as e:
        hint = ""
        if "no *.safetensors" in str(e):
            hint = " (--load-format dummy runs its config.json on seeded random weights)"
        raise ModelSourceError(f"{e}{hint}") from None
