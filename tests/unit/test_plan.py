"""The plan resolver against a plain transcription of SGLang v0.5.13's predicates."""

import itertools
from types import SimpleNamespace

import attrs
import pytest

from registry import Decision, ParallelCapabilities, PlanArgs, PlanRefused, resolve_plan

DEFAULT = ParallelCapabilities()
SELF_MANAGED = ParallelCapabilities(self_managed_sp=True)


# -- sglang/srt/utils/common.py (v0.5.13), transcribed branch for branch (hence the
# -- noqa); get_moe_a2a_backend().is_none() is `moe_a2a_backend == "none"` ------------


def require_mlp_tp_gather(server_args):
    if server_args.enable_dp_attention:
        assert server_args.dp_size > 1, "dp_size must be greater than 1"
        if server_args.moe_dense_tp_size is None:  # noqa: SIM114
            return True
        elif not server_args.enable_dp_lm_head:  # noqa: SIM114
            return True
        elif server_args.moe_a2a_backend == "none":
            return True
        else:
            return server_args.moe_dense_tp_size > server_args.tp_size // server_args.dp_size
    else:
        return False


def require_attn_tp_gather(server_args):
    assert server_args.moe_dense_tp_size in [1, None]
    if server_args.moe_a2a_backend != "none" or server_args.moe_dense_tp_size == 1:
        if server_args.enable_dp_attention:
            return server_args.dp_size < server_args.tp_size
        else:
            return True
    else:
        return False


def require_gathered_buffer(server_args):
    return require_mlp_tp_gather(server_args) or require_attn_tp_gather(server_args)


def require_mlp_sync(server_args):
    return server_args.enable_dp_attention or require_gathered_buffer(server_args)


# -------------------------------------------------------------------------------------


def combinations():
    for tp in (1, 2, 4, 8):
        for dp in (d for d in (1, 2, 4, 8) if tp % d == 0):
            for dpa, backend, dense, lm_head in itertools.product(
                (False, True), ("none", "all2all"), (None, 1), (False, True)
            ):
                if dpa and dp == 1:
                    continue
                if lm_head and not dpa:
                    continue
                yield SimpleNamespace(
                    tp_size=tp,
                    dp_size=dp,
                    enable_dp_attention=dpa,
                    moe_a2a_backend=backend,
                    moe_dense_tp_size=dense,
                    enable_dp_lm_head=lm_head,
                    attn_tp_gather="auto",
                )


COMBOS = list(combinations())


def _id(s):
    return (
        f"tp{s.tp_size}-dp{s.dp_size}{'-dpa' if s.enable_dp_attention else ''}-{s.moe_a2a_backend}"
        f"-dense{s.moe_dense_tp_size}{'-lmhead' if s.enable_dp_lm_head else ''}"
    )


def with_mode(s, mode):
    return SimpleNamespace(**{**vars(s), "attn_tp_gather": mode})


def test_enumeration_covers_every_branch():
    # guards against a vacuous comparison: every predicate takes both values
    assert len(COMBOS) == 88
    for pred in (require_mlp_tp_gather, require_attn_tp_gather, require_mlp_sync):
        assert {pred(s) for s in COMBOS} == {True, False}
    assert any(require_gathered_buffer(s) and not require_attn_tp_gather(s) for s in COMBOS)


@pytest.mark.parametrize("s", COMBOS, ids=_id)
def test_default_model_auto_equals_sglang(s):
    plan = resolve_plan(DEFAULT, s)
    assert plan.mlp_tp_gather.value is require_mlp_tp_gather(s)
    assert plan.attn_tp_gather.value is require_attn_tp_gather(s)
    assert plan.gathered_buffer.value is require_gathered_buffer(s)
    assert plan.mlp_sync.value is require_mlp_sync(s)
    # adjust_num_token_non_padded_for_attn_tp runs exactly where the gather does
    assert plan.shard_local_token_count.value is require_attn_tp_gather(s)
    attn_tp = s.tp_size // (s.dp_size if s.enable_dp_attention else 1)
    assert plan.attn_tp_size == attn_tp
    assert plan.token_alignment == (attn_tp if require_attn_tp_gather(s) else 1)
    decisions = (plan.attn_tp_gather, plan.shard_local_token_count, plan.mlp_tp_gather)
    for d in (*decisions, plan.gathered_buffer, plan.mlp_sync):
        assert d.source == "server_args"
        assert d.reason and "\n" not in d.reason


def expected(s, caps):
    """DESIGN.md's plan, written out independently of the resolver."""
    topo = require_attn_tp_gather(s)
    if s.attn_tp_gather == "off":
        if topo and not caps.self_managed_sp:
            return None
        attn, source = False, "cli"
    elif s.attn_tp_gather == "on":
        if not topo:
            return None
        attn, source = topo, "cli"
    elif caps.self_managed_sp and topo:
        attn, source = False, "model"
    else:
        attn, source = topo, "server_args"
    mlp = require_mlp_tp_gather(s)
    attn_tp = s.tp_size // (s.dp_size if s.enable_dp_attention else 1)
    return {
        "attn_tp_gather": (attn, source),
        "shard_local_token_count": attn and not caps.self_managed_sp,
        "mlp_tp_gather": mlp,
        "gathered_buffer": mlp or attn,
        "mlp_sync": s.enable_dp_attention or mlp or attn,
        "token_alignment": attn_tp if attn else 1,
    }


@pytest.mark.parametrize("caps", [DEFAULT, SELF_MANAGED], ids=["default", "self_managed"])
@pytest.mark.parametrize("mode", ["auto", "on", "off"])
def test_every_mode_and_capability(mode, caps):
    refused = resolved = 0
    for s in (with_mode(s, mode) for s in COMBOS):
        want = expected(s, caps)
        if want is None:
            with pytest.raises(PlanRefused):
                resolve_plan(caps, s)
            refused += 1
            continue
        plan = resolve_plan(caps, s)
        resolved += 1
        got = {
            "attn_tp_gather": (plan.attn_tp_gather.value, plan.attn_tp_gather.source),
            "shard_local_token_count": plan.shard_local_token_count.value,
            "mlp_tp_gather": plan.mlp_tp_gather.value,
            "gathered_buffer": plan.gathered_buffer.value,
            "mlp_sync": plan.mlp_sync.value,
            "token_alignment": plan.token_alignment,
        }
        assert got == want, _id(s)
        assert plan.capabilities == caps
    assert resolved
    if (mode, caps) in (("on", DEFAULT), ("on", SELF_MANAGED), ("off", DEFAULT)):
        assert refused
    else:
        assert not refused


def args(**kw):
    return PlanArgs(**kw)


def test_self_managed_skips_gather_buffer_and_sync():
    plan = resolve_plan(SELF_MANAGED, args(tp_size=4, moe_a2a_backend="all2all"))
    assert plan.attn_tp_gather == Decision(False, "model", plan.attn_tp_gather.reason)
    assert "self_managed_sp=True" in plan.attn_tp_gather.reason
    for d in (plan.gathered_buffer, plan.mlp_sync):
        assert (d.value, d.source) == (False, "model")
    assert plan.token_alignment == 1


def test_default_model_needs_gather_buffer_and_sync():
    plan = resolve_plan(DEFAULT, args(tp_size=4, moe_a2a_backend="all2all"))
    for d in (plan.attn_tp_gather, plan.gathered_buffer, plan.mlp_sync):
        assert (d.value, d.source) == (True, "server_args")
    assert plan.token_alignment == 4
    assert "attn_tp_size=4" in plan.attn_tp_gather.reason
    assert "all2all" in plan.attn_tp_gather.reason


def test_dp_attention_keeps_sync_from_server_args_for_self_managed_model():
    s = args(
        tp_size=4,
        dp_size=2,
        enable_dp_attention=True,
        moe_a2a_backend="all2all",
        moe_dense_tp_size=1,
        enable_dp_lm_head=True,
    )
    plan = resolve_plan(SELF_MANAGED, s)
    assert (plan.attn_tp_gather.value, plan.attn_tp_gather.source) == (False, "model")
    assert not plan.mlp_tp_gather.value
    assert (plan.gathered_buffer.value, plan.gathered_buffer.source) == (False, "model")
    assert (plan.mlp_sync.value, plan.mlp_sync.source) == (True, "server_args")
    assert (plan.attn_dp_size, plan.attn_tp_size) == (2, 2)


def test_mlp_tp_gather_keeps_buffer_from_server_args():
    s = args(tp_size=4, dp_size=2, enable_dp_attention=True, moe_a2a_backend="all2all")
    plan = resolve_plan(SELF_MANAGED, s)
    assert plan.mlp_tp_gather.value and not plan.attn_tp_gather.value
    assert (plan.gathered_buffer.value, plan.gathered_buffer.source) == (True, "server_args")


def test_cli_on_overrides_self_managed_model():
    plan = resolve_plan(SELF_MANAGED, args(tp_size=2, moe_dense_tp_size=1, attn_tp_gather="on"))
    assert (plan.attn_tp_gather.value, plan.attn_tp_gather.source) == (True, "cli")
    assert "overrides" in plan.attn_tp_gather.reason
    assert (plan.gathered_buffer.value, plan.gathered_buffer.source) == (True, "cli")
    assert (plan.mlp_sync.value, plan.mlp_sync.source) == (True, "cli")
    assert plan.token_alignment == 2


def test_cli_off_on_self_managed_model_and_where_nothing_to_gather():
    plan = resolve_plan(
        SELF_MANAGED, args(tp_size=4, moe_a2a_backend="all2all", attn_tp_gather="off")
    )
    assert (plan.attn_tp_gather.value, plan.attn_tp_gather.source) == (False, "cli")
    plan = resolve_plan(DEFAULT, args(tp_size=4, attn_tp_gather="off"))
    assert (plan.attn_tp_gather.value, plan.attn_tp_gather.source) == (False, "cli")
    assert "nothing to gather" in plan.attn_tp_gather.reason


def test_refusal_off_for_model_that_needs_the_gather():
    s = args(
        tp_size=8,
        dp_size=2,
        enable_dp_attention=True,
        moe_a2a_backend="all2all",
        attn_tp_gather="off",
    )
    with pytest.raises(PlanRefused) as e:
        resolve_plan(DEFAULT, s, model="LlamaForCausalLM")
    msg = str(e.value)
    assert "\n" not in msg
    for words in (
        "--attn-tp-gather off",
        "--disable-attn-tp-gather",
        "LlamaForCausalLM",
        "reduce-scatter",
        "attn_tp_size=4",
        "drop the flag",
    ):
        assert words in msg


def test_refusal_on_where_there_is_nothing_to_gather():
    with pytest.raises(PlanRefused) as e:
        resolve_plan(SELF_MANAGED, args(tp_size=4, attn_tp_gather="on"))
    msg = str(e.value)
    assert "\n" not in msg
    assert "nothing to gather" in msg and "--attn-tp-gather auto" in msg
    # DP attention using every TP rank leaves attn_tp_size 1: nothing to gather either
    s = args(
        tp_size=4,
        dp_size=4,
        enable_dp_attention=True,
        moe_a2a_backend="all2all",
        attn_tp_gather="on",
    )
    with pytest.raises(PlanRefused, match="attn_tp_size=1"):
        resolve_plan(DEFAULT, s)


def test_refusal_is_not_a_value_error():
    # callers tell a refused plan from malformed args
    assert not issubclass(PlanRefused, ValueError)


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"tp_size": 4, "dp_size": 3}, "'dp_size' must divide 'tp_size'"),
        ({"tp_size": 2, "enable_dp_attention": True}, "'enable_dp_attention' needs 'dp_size' > 1"),
        ({"enable_dp_lm_head": True}, "'enable_dp_lm_head' needs 'enable_dp_attention'"),
        ({"moe_dense_tp_size": 2}, "'moe_dense_tp_size' must be one of 1, None"),
        ({"moe_a2a_backend": "deepep"}, "'moe_a2a_backend' must be one of"),
        ({"attn_tp_gather": "maybe"}, "'attn_tp_gather' must be one of"),
        ({"tp_size": 0}, "'tp_size' must be an int >= 1"),
    ],
)
def test_invalid_args_are_rejected_not_resolved(kw, match):
    base = vars(COMBOS[0]) | kw
    with pytest.raises(ValueError, match=match):
        resolve_plan(DEFAULT, SimpleNamespace(**base))


def test_args_missing_a_field_and_wrong_capabilities():
    s = vars(COMBOS[0]).copy()
    del s["attn_tp_gather"]
    with pytest.raises(TypeError, match="'attn_tp_gather'"):
        resolve_plan(DEFAULT, SimpleNamespace(**s))
    with pytest.raises(TypeError, match="ParallelCapabilities"):
        resolve_plan({"self_managed_sp": True}, COMBOS[0])


def test_to_json_shape():
    plan = resolve_plan(DEFAULT, args(tp_size=2, moe_a2a_backend="all2all"))
    doc = plan.to_json()
    assert list(doc) == [
        "attn_tp_gather",
        "shard_local_token_count",
        "mlp_tp_gather",
        "gathered_buffer",
        "mlp_sync",
        "token_alignment",
    ]
    decisions = ("attn_tp_gather", "shard_local_token_count", "mlp_tp_gather", "gathered_buffer")
    for name in (*decisions, "mlp_sync"):
        assert set(doc[name]) == {"value", "source", "reason"}
        assert isinstance(doc[name]["value"], bool)
    assert doc["token_alignment"]["value"] == 2
    assert "attn_tp_size=2" in doc["token_alignment"]["reason"]


def test_token_count_is_the_groups_for_a_model_that_splits_tokens_itself():
    """The SGLang #38606 class of bug, visible in the plan: a self-managed model keeps the
    group's count whatever turns the gather on; a communicator user gets its shard's."""
    a2a = dict(tp_size=4, moe_a2a_backend="all2all")

    def count(caps, **kw):
        d = resolve_plan(caps, args(**a2a, **kw)).shard_local_token_count
        return d.value, d.source

    assert count(SELF_MANAGED) == (False, "model")
    assert count(SELF_MANAGED, attn_tp_gather="on") == (False, "model")
    assert "#38606" in resolve_plan(SELF_MANAGED, args(**a2a)).shard_local_token_count.reason
    assert count(DEFAULT) == (True, "server_args")
    assert count(DEFAULT, attn_tp_gather="on") == (True, "cli")
    assert count(SELF_MANAGED, attn_tp_gather="off") == (False, "cli")
    plain = resolve_plan(DEFAULT, args(tp_size=4)).shard_local_token_count
    assert (plain.value, plain.source) == (False, "server_args")


def test_decision_and_plan_are_validated_values():
    with pytest.raises(ValueError, match="'source' must be one of"):
        Decision(True, "operator", "why")
    with pytest.raises(ValueError, match="'reason'"):
        Decision(True, "cli", "two\nlines")
    d = Decision(False, "model", "why")
    assert not d
    plan = resolve_plan(DEFAULT, args())
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        plan.token_alignment = 2
