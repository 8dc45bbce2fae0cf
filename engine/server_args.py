"""Server arguments: the plan's inputs (`registry.PlanArgs`) plus the engine's own.

One source of truth: every flag, its default and its validation come from the fields
below (see `registry.args.option`). Another command adds these flags to its own parser
and builds the instance from the namespace::

    parser = registry.args.Parser(prog="parcap generate")
    ServerArgs.add_arguments(parser)          # or a parser.add_argument_group(...)
    parser.add_argument("--prompt", action="append")
    ns = parser.parse_args(argv)
    args = ServerArgs.from_namespace(ns, parser).require_model(parser)
"""

from __future__ import annotations

import argparse

from attrs import frozen

from engine.attention.registry import AUTO, choices
from registry.args import PlanArgs, at_least, fail, option, optional_str
from registry.capabilities import is_bool

DEVICES = ("cpu", "cuda")
LOAD_FORMATS = ("auto", "dummy")
DTYPES = ("auto", "float32", "bfloat16", "float16")


def _optional_at_least(low: int):
    check = at_least(low)

    def optional(inst: object, attr: object, value: object) -> None:
        if value is not None:
            check(inst, attr, value)

    return optional


@frozen
class ServerArgs(PlanArgs):
    """Everything a launch is configured with; the parallel part is `PlanArgs`."""

    model: str | None = option(
        None,
        validator=optional_str,
        metavar="ARCH",
        help="architecture name (see 'parcap registry list'): embedded tiny config with "
        "seeded random weights",
    )
    model_path: str | None = option(
        None,
        validator=optional_str,
        metavar="DIR",
        help="Hugging Face checkpoint directory (config.json + safetensors)",
    )
    load_format: str = option(
        "auto",
        choices=LOAD_FORMATS,
        help="auto: the checkpoint's safetensors (--model-path) or seeded random weights "
        "(--model); dummy: seeded random weights for --model-path's config.json (no weight "
        "files needed; drawn on the GPU under --device cuda)",
    )
    device: str = option("cpu", choices=DEVICES, help="where the model runs")
    dtype: str = option(
        "auto",
        choices=DTYPES,
        help="weight and activation dtype; auto is float32 on cpu, bfloat16 on cuda",
    )
    attention_backend: str = option(
        AUTO,
        choices=choices(),
        help="attention kernels: auto takes flashinfer on cuda where it is installed and "
        "serves the model, else torch",
    )
    seed: int = option(0, validator=at_least(0), metavar="N", help="random seed")
    cuda_graph_max_bs: int = option(
        32, validator=at_least(1), metavar="N", help="largest batch size captured in a CUDA graph"
    )
    disable_cuda_graph: bool = option(
        False, validator=is_bool, help="run decode eagerly on cuda (cpu always runs eagerly)"
    )
    disable_overlap_schedule: bool = option(
        False,
        validator=is_bool,
        help="wait for each step's tokens before scheduling the next (the default overlaps: "
        "the host prepares step N+1 while the device runs step N)",
    )
    max_running_requests: int = option(
        64, validator=at_least(1), metavar="N", help="most requests decoded together"
    )
    max_total_tokens: int = option(
        8192,
        validator=at_least(1),
        metavar="N",
        help="KV-cache pool size in tokens, per attention-DP group",
    )
    max_prefill_tokens: int = option(
        4096, validator=at_least(1), metavar="N", help="most tokens prefilled in one step"
    )
    dist_timeout: int = option(
        60, validator=at_least(1), metavar="SECONDS", help="timeout of collective operations"
    )
    dist_init_addr: str | None = option(
        None,
        validator=optional_str,
        metavar="HOST:PORT",
        help="rendezvous address of rank 0 for torch.distributed (default: chosen by the "
        "launcher); across nodes, node 0's address, where every node meets (node 0 also "
        "listens for the other nodes on PORT+1)",
    )
    nnodes: int = option(
        1,
        validator=at_least(1),
        metavar="N",
        help="number of hosts the launch spans; --tp-size counts the ranks of all of them "
        "(tp_size / nnodes on each)",
    )
    node_rank: int = option(
        0,
        validator=at_least(0),
        metavar="R",
        help="this host's index among --nnodes; node 0 runs the front end (and the HTTP server) "
        "and writes the results, the others only run their ranks",
    )
    context_length: int | None = option(
        None,
        validator=_optional_at_least(1),
        metavar="N",
        help="longest request served, prompt plus generated tokens (default: the model's "
        "max_position_embeddings)",
    )

    def _check(self) -> None:
        super()._check()
        if self.model is not None and self.model_path is not None:
            raise ValueError(
                f"give one of 'model' or 'model_path', not both (got model={self.model!r}, "
                f"model_path={self.model_path!r})"
            )

    def require_model(self, parser: argparse.ArgumentParser | None = None) -> ServerArgs:
        """Self, for a command that runs a model: exactly one of model / model_path.

        Without it, reports through `parser.error` or as ``parcap: error: ...``, exit 2.
        """
        if self.model is None and self.model_path is None:
            message = "one of --model ARCH or --model-path DIR is required"
            if parser is not None:
                parser.error(message)
            fail(message)
        return self

    @property
    def resolved_dtype(self) -> str:
        """The dtype name to run with: `dtype`, or float32 on cpu / bfloat16 on cuda."""
        if self.dtype != "auto":
            return self.dtype
        return "float32" if self.device == "cpu" else "bfloat16"
