"""The parallel plan: the server arguments and the model's capabilities, resolved once."""

from __future__ import annotations

from typing import Any

import attrs
from attrs import field, frozen

from registry.args import PlanArgs, at_least, one_of
from registry.capabilities import ParallelCapabilities, is_bool

SOURCES = ("server_args", "model", "cli")


class PlanRefused(Exception):
    """The requested --attn-tp-gather cannot work for this model and topology.

    Every command reports it as one line and exits 2.
    """


def _one_line(inst: Any, attr: attrs.Attribute, value: Any) -> None:
    if not isinstance(value, str) or not value or "\n" in value:
        raise ValueError(f"'{attr.name}' must be a non-empty single-line str (got {value!r})")


@frozen
class Decision:
    """One switch of the plan: its value, who decided it, and why (one line)."""

    value: bool = field(validator=is_bool)
    source: str = field(validator=one_of(SOURCES))
    reason: str = field(validator=_one_line)

    def __bool__(self) -> bool:
        return self.value

    def to_json(self) -> dict[str, Any]:
        return {"value": self.value, "source": self.source, "reason": self.reason}


@frozen
class ParallelPlan:
    """What the engine does for one launch; consumers read it, never server args.

    attn_tp_gather: models using the engine's communicator reduce-scatter after
        attention and all-gather into the gathered buffer; each step's token count
        is padded to `token_alignment`.
    shard_local_token_count: `num_token_non_padded`, the real rows a rank's model input
        holds, counts this rank's shard of its group's rows (a communicator user under
        attn_tp_gather) rather than the whole attention-TP group's (every other case, and
        always a model that splits the group's tokens itself: SGLang issue #38606).
    mlp_tp_gather: MLP input is all-gathered across the attention-DP groups of a
        TP group instead of all-reduced.
    gathered_buffer: the graph runner allocates the gathered buffer once.
    mlp_sync: the scheduler all-gathers per-step batch info over the CPU group;
        idle DP ranks run an idle batch. Off: no collective call for it.
    """

    attn_tp_gather: Decision
    shard_local_token_count: Decision
    mlp_tp_gather: Decision
    gathered_buffer: Decision
    mlp_sync: Decision
    token_alignment: int = field(validator=at_least(1))
    attn_tp_size: int = field(validator=at_least(1))
    attn_dp_size: int = field(validator=at_least(1))
    capabilities: ParallelCapabilities = field(
        validator=attrs.validators.instance_of(ParallelCapabilities)
    )

    @property
    def token_alignment_reason(self) -> str:
        if self.attn_tp_gather.value:
            return (
                f"attn_tp_gather pads each step's token count to a multiple of "
                f"attn_tp_size={self.attn_tp_size}"
            )
        return "attn_tp_gather is off: token counts are not padded"

    def to_json(self) -> dict[str, Any]:
        return {
            "attn_tp_gather": self.attn_tp_gather.to_json(),
            "shard_local_token_count": self.shard_local_token_count.to_json(),
            "mlp_tp_gather": self.mlp_tp_gather.to_json(),
            "gathered_buffer": self.gathered_buffer.to_json(),
            "mlp_sync": self.mlp_sync.to_json(),
            "token_alignment": {
                "value": self.token_alignment,
                "reason": self.token_alignment_reason,
            },
        }


def resolve_plan(
    capabilities: ParallelCapabilities, args: Any, *, model: str | None = None
) -> ParallelPlan:
    """Resolve the plan for a model with `capabilities` under server `args`.

    `args` is any object with tp_size, dp_size, enable_dp_attention, moe_a2a_backend,
    moe_dense_tp_size, enable_dp_lm_head and attn_tp_gather; an invalid combination
    raises ValueError. `model` only names the model in a refusal. Raises `PlanRefused`
    for ``--attn-tp-gather off`` on a model that needs the gather and for
    ``--attn-tp-gather on`` where there is nothing to gather.
    """
    if not isinstance(capabilities, ParallelCapabilities):
        raise TypeError(f"'capabilities' must be a ParallelCapabilities (got {capabilities!r})")
    s = PlanArgs.coerce(args)
    attn_tp = _attn_tp_gather(s, capabilities, model)
    mlp_tp = _mlp_tp_gather(s)

    if mlp_tp.value:
        need = "mlp_tp_gather and attn_tp_gather" if attn_tp.value else "mlp_tp_gather"
        buffer = Decision(True, "server_args", f"{need} gather into it")
    elif attn_tp.value:
        buffer = Decision(True, attn_tp.source, "attn_tp_gather gathers into it")
    else:
        # attn_tp_gather decided the value: whoever switched it off switched this off
        buffer = Decision(False, attn_tp.source, "neither mlp_tp_gather nor attn_tp_gather is on")

    if s.enable_dp_attention:
        sync = Decision(
            True,
            "server_args",
            f"DP attention: the {s.dp_size} attention-DP groups exchange per-step batch info "
            "and ranks without work run an idle batch",
        )
    elif buffer.value:
        sync = Decision(
            True,
            buffer.source,
            "the gathered buffer needs every rank's token count each step",
        )
    else:
        sync = Decision(False, buffer.source, "no DP attention and no gathered buffer")

    return ParallelPlan(
        attn_tp_gather=attn_tp,
        shard_local_token_count=_token_count(attn_tp, capabilities),
        mlp_tp_gather=mlp_tp,
        gathered_buffer=buffer,
        mlp_sync=sync,
        token_alignment=s.attn_tp_size if attn_tp.value else 1,
        attn_tp_size=s.attn_tp_size,
        attn_dp_size=s.attn_dp_size,
        capabilities=capabilities,
    )


def _topology(s: PlanArgs) -> tuple[bool, str]:
    """SGLang's require_attn_tp_gather: is attention input scattered across attn-TP ranks?"""
    causes = []
    if s.moe_a2a_backend != "none":
        causes.append(f"moe_a2a_backend={s.moe_a2a_backend}")
    if s.moe_dense_tp_size == 1:
        causes.append("moe_dense_tp_size=1")
    if not causes:
        return False, (
            "attention input is not scattered (moe_a2a_backend=none, dense layers at full TP)"
        )
    if s.enable_dp_attention and s.dp_size >= s.tp_size:
        return False, (
            f"attention input is not scattered: DP attention with dp_size={s.dp_size} "
            f"leaves attn_tp_size=1"
        )
    return True, (
        f"attention input is scattered across attn_tp_size={s.attn_tp_size} ranks "
        f"({', '.join(causes)})"
    )


def _attn_tp_gather(s: PlanArgs, caps: ParallelCapabilities, model: str | None) -> Decision:
    needed, why = _topology(s)
    who = model or "this model"
    if s.attn_tp_gather == "off":
        if not needed:
            return Decision(False, "cli", f"--attn-tp-gather off; nothing to gather anyway: {why}")
        if caps.self_managed_sp:
            return Decision(
                False,
                "cli",
                "--attn-tp-gather off; the model shards tokens itself (self_managed_sp=True)",
            )
        raise PlanRefused(
            f"--attn-tp-gather off (--disable-attn-tp-gather) is refused for {who}: {why}, and "
            f"the model reduce-scatters through the engine, which needs token counts padded to "
            f"a multiple of attn_tp_size={s.attn_tp_size}; drop the flag (auto decides per model)"
        )
    if s.attn_tp_gather == "on":
        if not needed:
            raise PlanRefused(
                f"--attn-tp-gather on is refused for {who}: there is nothing to gather, {why}; "
                f"drop the flag or use --attn-tp-gather auto"
            )
        override = " (overrides the model's self_managed_sp=True)" if caps.self_managed_sp else ""
        return Decision(True, "cli", f"--attn-tp-gather on: {why}{override}")
    if needed and caps.self_managed_sp:
        return Decision(
            False,
            "model",
            f"the model shards tokens across attention-TP ranks itself (self_managed_sp=True) "
            f"and consumes no gathered buffer, although {why}",
        )
    return Decision(needed, "server_args", why)


def _token_count(attn_tp: Decision, caps: ParallelCapabilities) -> Decision:
    """Whether `num_token_non_padded` is shard-local (SGLang's
    adjust_num_token_non_padded_for_attn_tp) or counts the attention-TP group's rows."""
    if caps.self_managed_sp and (attn_tp.value or attn_tp.source == "model"):
        return Decision(
            False,
            "model",
            "the model splits its group's tokens across attention-TP ranks itself "
            "(self_managed_sp=True) and needs the group's count; a shard-local one would "
            "drop the other ranks' tokens (SGLang #38606)",
        )
    if not attn_tp.value:
        return Decision(
            False,
            attn_tp.source,
            "attn_tp_gather is off: every attention-TP rank holds all of its group's rows, "
            "so num_token_non_padded counts the group's",
        )
    return Decision(
        True,
        attn_tp.source,
        "attn_tp_gather scatters the rows over attention-TP: num_token_non_padded counts "
        "the real rows of this rank's shard",
    )


def _mlp_tp_gather(s: PlanArgs) -> Decision:
    """SGLang's require_mlp_tp_gather, branch by branch."""
    if not s.enable_dp_attention:
        return Decision(False, "server_args", "no DP attention: MLP input is all-reduced")
    groups = f"the {s.dp_size} attention-DP groups"
    if s.moe_dense_tp_size is None:
        why = f"DP attention, dense layers at full TP: MLP input is all-gathered across {groups}"
        return Decision(True, "server_args", why)
    if not s.enable_dp_lm_head:
        why = f"DP attention without --enable-dp-lm-head: the LM head all-gathers across {groups}"
        return Decision(True, "server_args", why)
    if s.moe_a2a_backend == "none":
        why = f"DP attention with moe_a2a_backend=none: MoE input is all-gathered across {groups}"
        return Decision(True, "server_args", why)
    value = s.moe_dense_tp_size > s.tp_size // s.dp_size
    rel = ">" if value else "<="
    why = (
        f"moe_dense_tp_size={s.moe_dense_tp_size} {rel} attn_tp_size={s.attn_tp_size} "
        f"with DP LM head and moe_a2a_backend={s.moe_a2a_backend}"
    )
    return Decision(value, "server_args", why)
