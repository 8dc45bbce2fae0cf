"""The plan's inputs: `PlanArgs`, the server arguments the parallel plan depends on.

Its fields are command-line flags through `registry.flags`; the flag plumbing's names are
re-exported here for the modules that import them from `registry.args`.
"""

from __future__ import annotations

from typing import Any

import attrs
from attrs import frozen

from registry.capabilities import is_bool
from registry.flags import (
    PROG,
    Flag,
    FromCli,
    Parser,
    UsageError,
    add_arguments,
    at_least,
    cli_fields,
    fail,
    flag_name,
    from_namespace,
    one_line,
    one_of,
    option,
    optional_str,
)

__all__ = [
    "ATTN_TP_GATHER_MODES",
    "MOE_A2A_BACKENDS",
    "PROG",
    "Flag",
    "FromCli",
    "Parser",
    "PlanArgs",
    "UsageError",
    "add_arguments",
    "at_least",
    "cli_fields",
    "fail",
    "flag_name",
    "from_namespace",
    "one_line",
    "one_of",
    "option",
    "optional_str",
]

MOE_A2A_BACKENDS = ("none", "all2all")
ATTN_TP_GATHER_MODES = ("auto", "on", "off")


@frozen
class PlanArgs(FromCli):
    """The server arguments the parallel plan depends on (SGLang names and meanings)."""

    tp_size: int = option(1, validator=at_least(1), metavar="N", help="tensor-parallel size")
    dp_size: int = option(
        1,
        validator=at_least(1),
        metavar="N",
        help="data-parallel size; with --enable-dp-attention, the number of attention-DP "
        "groups that split the TP ranks (must divide --tp-size)",
    )
    enable_dp_attention: bool = option(
        False,
        validator=is_bool,
        help="data-parallel attention: each of the dp_size groups of tp_size/dp_size ranks "
        "runs attention on its own requests (needs --dp-size > 1)",
    )
    moe_a2a_backend: str = option(
        "none",
        choices=MOE_A2A_BACKENDS,
        help="MoE token dispatch: none (every rank sees every token) or all2all (experts "
        "partitioned across the TP group, tokens moved with all_to_all; this scatters "
        "attention input across attention-TP ranks)",
    )
    moe_dense_tp_size: int | None = option(
        None,
        choices=(1,),
        help="TP size of dense (non-MoE) layers; 1 runs them data-parallel, which scatters "
        "attention input across attention-TP ranks (default: the full TP size)",
    )
    enable_dp_lm_head: bool = option(
        False,
        validator=is_bool,
        help="run the LM head within each attention-DP group instead of over the whole TP "
        "group (needs --enable-dp-attention)",
    )
    attn_tp_gather: str = option(
        "auto",
        choices=ATTN_TP_GATHER_MODES,
        aliases={"--disable-attn-tp-gather": "off"},
        help="the attention-TP gather path, needed when attention input is scattered across "
        "attention-TP ranks: auto lets the model's declared capabilities decide; on forces "
        "it wherever the topology scatters attention input; off skips it (refused for a "
        "model that reduce-scatters through the engine)",
        alias_help={
            "--disable-attn-tp-gather": "alias of --attn-tp-gather off: skip the attention-TP "
            "gather path, i.e. padding each step's token count to a multiple of attn_tp_size, "
            "the gathered buffer allocated for it, and the per-step batch-info sync over the "
            "CPU group that only it requires. For models that shard tokens across attention-TP "
            "ranks themselves and consume no gathered buffer (such models can declare this, "
            "and auto then skips it for them); refused for models that need the gather",
        },
    )

    def __attrs_post_init__(self) -> None:
        self._check()

    def _check(self) -> None:
        """Cross-field validation; subclasses extend it and call super()."""
        if self.tp_size % self.dp_size:
            raise ValueError(
                f"'dp_size' must divide 'tp_size' (got tp_size={self.tp_size}, "
                f"dp_size={self.dp_size})"
            )
        if self.enable_dp_attention and self.dp_size < 2:
            raise ValueError(
                f"'enable_dp_attention' needs 'dp_size' > 1 (got dp_size={self.dp_size})"
            )
        if self.enable_dp_lm_head and not self.enable_dp_attention:
            raise ValueError(
                "'enable_dp_lm_head' needs 'enable_dp_attention' (got enable_dp_attention=False)"
            )

    @classmethod
    def coerce(cls, args: Any) -> PlanArgs:
        """`args` as a validated PlanArgs; any object with the plan's fields will do."""
        if isinstance(args, PlanArgs):
            return args
        names = [f.name for f in attrs.fields(PlanArgs)]
        missing = [n for n in names if not hasattr(args, n)]
        if missing:
            raise TypeError(f"plan args lack {', '.join(repr(n) for n in missing)} (got {args!r})")
        return PlanArgs(**{n: getattr(args, n) for n in names})

    @property
    def attn_dp_size(self) -> int:
        return self.dp_size if self.enable_dp_attention else 1

    @property
    def attn_tp_size(self) -> int:
        return self.tp_size // self.attn_dp_size
