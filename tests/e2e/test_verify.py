"""`parcap verify`: the built-in models verify as consistent, out-of-tree plugins with a wrong
declaration are contradicted (the self-sharding one with the declaration to make), bad
arguments exit 2 before any rank starts, and no process is left behind after any outcome.

Multi-rank runs are at tp 2 with 3 new tokens, plus one tp 4 and one DP-attention case;
the verdict's branches that no real model reaches are checked on made-up runs.
"""

from __future__ import annotations

import json
import time
import uuid

import pytest

from engine.entrypoints.verify import main
from engine.frontend.launcher import prepare
from engine.frontend.verdict import CONSISTENT, CONTRADICTED, Output, Run, compare, judge
from engine.frontend.verify import DECLARED, EXPERIMENT, REFERENCE, run_specs
from engine.messages import Counters
from engine.server_args import ServerArgs
from registry import ParallelCapabilities
from tests.support.engine import pids_with_env, run_cli
from tests.support.plugins import CLAIMS_SELF_MANAGED, FORGETS_SELF_MANAGED, install

FAST = ("--max-new-tokens", "3")
RUN_KEYS = {
    "role",
    "topology",
    "attn_tp_gather",
    "tokens_equal",
    "first_difference",
    "max_logprob_diff",
    "counters",
    "error",
}
TP4 = ("--tp-size", "4")
DP_ATTENTION = ("--tp-size", "4", "--enable-dp-attention", "--dp-size", "2")


@pytest.fixture(scope="module")
def plugin_env(tmp_path_factory):
    return install(tmp_path_factory.mktemp("plugins"))


def verify(*argv: str, env: dict | None = None, json_out: bool = True):
    """`parcap verify ARGV` as a subprocess: (process, JSON document or None, seconds)."""
    key, value = "PARCAP_VERIFY_TEST", uuid.uuid4().hex
    start = time.monotonic()
    proc = run_cli(
        "verify",
        *argv,
        *FAST,
        *(("--json",) if json_out else ()),
        env={**(env or {}), key: value},
        timeout=240,
    )
    seconds = time.monotonic() - start
    # the ranks of every run, crashed and hung ones included, are gone
    assert pids_with_env(f"{key}={value}") == []
    doc = json.loads(proc.stdout) if json_out and proc.returncode in (0, 1) else None
    return proc, doc, seconds


def runs_by_role(doc: dict) -> dict[str, dict]:
    assert set(doc) >= {"architecture", "capabilities", "runs", "verdict", "suggestion"}
    assert all(set(r) == RUN_KEYS for r in doc["runs"])
    return {r["role"]: r for r in doc["runs"]}


def costs(run: dict) -> tuple[int, int]:
    c = run["counters"]
    return c["attn_tp_padding_tokens"], c["mlp_sync_calls"]


def test_deepseek_v3_is_consistent_and_the_gather_on_costs_more():
    proc, doc, _ = verify("DeepseekV3ForCausalLM")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    runs = runs_by_role(doc)
    assert doc["verdict"] == CONSISTENT and doc["suggestion"] is None
    assert doc["capabilities"] == {"self_managed_sp": True}
    assert runs[REFERENCE]["topology"] == "--tp-size 1"
    assert runs[DECLARED]["topology"] == "--tp-size 2 --moe-a2a-backend all2all"
    declared, experiment = runs[DECLARED], runs[EXPERIMENT]
    assert (declared["attn_tp_gather"], experiment["attn_tp_gather"]) == (False, True)
    assert declared["tokens_equal"] and experiment["tokens_equal"]
    assert declared["max_logprob_diff"] < 1e-3
    assert costs(declared) == (0, 0)
    assert all(e > d for e, d in zip(costs(experiment), costs(declared), strict=True))


def test_qwen3_moe_is_consistent_and_the_gather_off_crashes():
    proc, doc, _ = verify("Qwen3MoeForCausalLM")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    runs = runs_by_role(doc)
    assert doc["verdict"] == CONSISTENT and doc["suggestion"] is None
    assert runs[DECLARED]["attn_tp_gather"] and runs[DECLARED]["tokens_equal"]
    experiment = runs[EXPERIMENT]
    assert experiment["attn_tp_gather"] is False and experiment["counters"] is None
    assert "needs the plan's attn_tp_gather" in experiment["error"]
    assert experiment["tokens_equal"] is None


def test_llama_is_consistent_with_a_cheaper_declaration_suggested():
    proc, doc, _ = verify("LlamaForCausalLM")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    runs = runs_by_role(doc)
    assert doc["verdict"] == CONSISTENT
    assert runs[EXPERIMENT]["tokens_equal"] and costs(runs[EXPERIMENT]) == (0, 0)
    padding, syncs = costs(runs[DECLARED])
    assert padding > 0 and syncs > 0
    assert f"declaring `self_managed_sp=True` drops {padding} padding tokens" in doc["suggestion"]


def test_a_self_sharding_plugin_that_declares_nothing_is_contradicted(plugin_env):
    proc, doc, seconds = verify(FORGETS_SELF_MANAGED, env=plugin_env)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    runs = runs_by_role(doc)
    assert doc["verdict"] == CONTRADICTED
    assert doc["declared_by"] == f"parcap_wrong_declarations.{FORGETS_SELF_MANAGED}"
    declared = runs[DECLARED]
    # shard-local token counts: the ranks disagree on their shards and wait on each other
    # until the collective timeout (or break their collectives: a crash is as good)
    assert declared["attn_tp_gather"]
    assert declared["error"] is not None or declared["tokens_equal"] is False
    assert runs[EXPERIMENT]["tokens_equal"] and runs[EXPERIMENT]["attn_tp_gather"] is False
    assert "ParallelCapabilities(self_managed_sp=True)" in doc["suggestion"]
    assert "SGLang #38606" in doc["reason"]
    assert seconds < 90  # the hang ends at the short collective timeout


def test_a_communicator_plugin_claiming_self_managed_sp_is_contradicted_under_dp_attention(
    plugin_env,
):
    proc, doc, _ = verify(CLAIMS_SELF_MANAGED, *DP_ATTENTION, env=plugin_env)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    runs = runs_by_role(doc)
    assert doc["verdict"] == CONTRADICTED and doc["suggestion"] is None
    assert "drop self_managed_sp=True" in doc["reason"]
    assert "needs the plan's attn_tp_gather" in runs[DECLARED]["error"]
    assert runs[EXPERIMENT]["tokens_equal"] and runs[EXPERIMENT]["attn_tp_gather"]
    assert runs[DECLARED]["topology"] == (
        "--tp-size 4 --dp-size 2 --enable-dp-attention --moe-a2a-backend all2all"
    )


def test_text_report_at_tp4():
    proc, _, seconds = verify("DeepseekV3ForCausalLM", *TP4, json_out=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    assert "VERDICT     consistent" in lines and "suggestion  none" in lines
    rows = {line.split()[0]: line.split() for line in lines if line.split()}
    assert rows["declared"][1:5] == ["--tp-size", "4", "--moe-a2a-backend", "all2all"]
    assert rows["declared"][5:7] == ["off", "equal"]
    assert rows["experiment"][5:7] == ["on", "equal"]
    assert [line.split(":")[0] for line in proc.stderr.splitlines()] == ["verify"] * 3
    assert seconds < 120


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["NoSuchForCausalLM"], "unknown architecture"),
        (["LlamaForCausalLM", "--tp-size", "1"], "give --tp-size 2 or more"),
        (["LlamaForCausalLM", "--nnodes", "2", "--dist-init-addr", "h:1"], "drop --nnodes"),
        (["LlamaForCausalLM", "--attn-tp-gather", "on"], "drop --attn-tp-gather"),
        (["LlamaForCausalLM", "--disable-attn-tp-gather"], "drop --attn-tp-gather"),
        (["LlamaForCausalLM", "--model", "LlamaForCausalLM"], "not --model"),
        (["LlamaForCausalLM", "--model-path", "/nonexistent"], "no config.json"),
        (["LlamaForCausalLM", "--dp-size", "2"], "--enable-dp-attention"),
        (["LlamaForCausalLM", "--max-new-tokens", "0"], "--max-new-tokens"),
        (["LlamaForCausalLM", "--max-new-tokens", "100000"], "context length"),
        ([], "ARCH"),
    ],
)
def test_bad_arguments_exit_2_with_one_line(capsys, argv, message):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    out, err = capsys.readouterr()
    assert exit_info.value.code == 2 and out == ""
    assert len(err.splitlines()) == 1 and err.startswith("parcap: error: ")
    assert message in err


# -- what no built-in model reaches, on specs and made-up runs ---------------------


def test_no_experiment_where_nothing_is_scattered():
    setup = prepare(ServerArgs.from_cli(["--model", "LlamaForCausalLM", "--tp-size", "2"]))
    assert [s.role for s in run_specs(setup)] == [REFERENCE, DECLARED]
    setup = prepare(
        ServerArgs.from_cli(
            ["--model", "DeepseekV3ForCausalLM", "--tp-size", "2", "--moe-a2a-backend", "all2all"]
        )
    )
    specs = run_specs(setup)
    assert [s.plan.attn_tp_gather.value for s in specs] == [False, False, True]
    assert specs[2].plan.shard_local_token_count.value is False


def made_up(role: str, ids=((1, 2), (3, 4)), error=None, gather=False, padding=0) -> Run:
    outputs = tuple(Output(tuple(i), (-1.0,) * len(i)) for i in ids)
    counters = None if error else Counters(attn_tp_padding_tokens=padding)
    return Run(role, "--tp-size 2", gather, outputs, counters, error, 1.0)


def test_compare_names_the_first_difference():
    ref = made_up(REFERENCE)
    run = compare(made_up(DECLARED, ids=((1, 2), (3, 5))), ref)
    assert (run.tokens_equal, run.first_difference, run.max_logprob_diff) == (False, (1, 1), 0.0)
    assert compare(made_up(DECLARED), ref).exact(1e-3)


def test_verdicts_without_a_working_way():
    ref, caps = made_up(REFERENCE), ParallelCapabilities()
    differs = compare(made_up(DECLARED, ids=((9, 2), (3, 4)), gather=True, padding=2), ref)
    v = judge(caps, [ref, differs], 1e-3)
    assert v.verdict == CONTRADICTED and "no declaration changes the plan" in v.reason
    assert "tokens differ from tp 1 (request 0, step 0)" in v.reason
    crashed = made_up(EXPERIMENT, error="rank 1: RuntimeError: boom")
    v = judge(caps, [ref, differs, crashed], 1e-3)
    assert v.verdict == CONTRADICTED and v.suggestion is None
    assert "neither way reproduces tp 1" in v.reason
    v = judge(caps, [ref, compare(made_up(DECLARED, gather=True), ref)], 1e-3)
    assert v.verdict == CONSISTENT and v.exit_code == 0
