"""Llama and Qwen3-MoE through the real engine (gloo ranks) across topologies and
``--attn-tp-gather`` overrides: the same tokens as TP 1, and counters that prove the plan
was followed.

Qwen3-MoE coverage is pairwise over tp {1, 2, 4} x DP attention {off, on with dp 2} x
expert backend {none, all2all} x --attn-tp-gather {auto, on, off}: every pair of values
that the plan allows appears in some launch (`off` with a gathering topology and `on`
without one are refusals, tested at the end), plus --moe-dense-tp-size 1 at TP 2 and 4
(with and without DP attention). Llama runs the launches that take its dense layers
through each distinct communicator path: all-reduce, gather + reduce-scatter, DP gather
with and without attention-TP shards, and replicated dense layers on scattered rows.
The requests are split round-robin over DP groups and one of them stops early, so under
DP attention a group runs idle batches while the other still decodes.
"""

from __future__ import annotations

import json

import pytest

import engine.frontend.launcher
from engine.entrypoints.generate import main
from engine.messages import SamplingParams
from tests.support.engine import assert_close, cached_generate, run_cli

pytestmark = pytest.mark.slow

PROMPTS = ((1, 2, 3, 4, 5), (17, 99, 3, 250, 8, 8, 41, 300, 2, 77, 5), (200, 201, 202))
# 19 prompt tokens and 3 decoding requests: with attention-TP 2 or 4 some step always
# needs padding, so attn_tp_padding_tokens > 0 exactly when token_alignment > 1.
PARAMS = (
    SamplingParams(max_new_tokens=6, ignore_eos=True),
    SamplingParams(max_new_tokens=2, ignore_eos=True),
    SamplingParams(max_new_tokens=6, ignore_eos=True),
)
DP2 = ("--dp-size", "2", "--enable-dp-attention")
A2A = ("--moe-a2a-backend", "all2all")
DENSE1 = ("--moe-dense-tp-size", "1")
LAUNCHES = {
    "tp1-off": ("--tp-size", "1", "--attn-tp-gather", "off"),
    "tp1-a2a-on": ("--tp-size", "1", *A2A, "--attn-tp-gather", "on"),
    "tp2-off": ("--tp-size", "2", "--attn-tp-gather", "off"),
    "tp2-a2a-on": ("--tp-size", "2", *A2A, "--attn-tp-gather", "on"),
    "tp2-dp2": ("--tp-size", "2", *DP2),
    "tp2-dp2-a2a": ("--tp-size", "2", *DP2, *A2A),  # attention-TP 1: nothing to gather
    "tp2-dense1": ("--tp-size", "2", *DENSE1),
    "tp4-a2a": ("--tp-size", "4", *A2A),
    "tp4-dp2-off": ("--tp-size", "4", *DP2, "--attn-tp-gather", "off"),
    "tp4-dp2-a2a-on": ("--tp-size", "4", *DP2, *A2A, "--attn-tp-gather", "on"),
    "tp4-dense1-on": ("--tp-size", "4", *DENSE1, "--attn-tp-gather", "on"),
    "tp4-dp2-dense1": ("--tp-size", "4", *DP2, *DENSE1),
}
RUNS = {
    "Qwen3MoeForCausalLM": [name for name in LAUNCHES if name != "tp2-dp2"],
    "LlamaForCausalLM": [
        "tp2-off",
        "tp2-a2a-on",
        "tp2-dp2",
        "tp4-dp2-off",
        "tp4-dp2-a2a-on",
        "tp4-dense1-on",
    ],
}
CASES = [(model, name) for model, names in RUNS.items() for name in names]


def launch(model: str, argv: tuple[str, ...]):
    return cached_generate(("--model", model, *argv), PROMPTS, PARAMS)


@pytest.mark.parametrize(("model", "name"), CASES)
def test_same_tokens_and_counters_follow_the_plan(model, name):
    baseline, _ = launch(model, ("--tp-size", "1"))
    results, report = launch(model, LAUNCHES[name])
    assert [r.output_ids for r in baseline] != [[]] * len(PROMPTS)
    for ours, ref in zip(results, baseline, strict=True):
        assert ours.error is None and ours.output_ids == ref.output_ids
        assert_close(ours.output_logprobs, ref.output_logprobs, 1e-4)

    plan, c = report["plan"]["plan"], report["counters"]
    assert c["steps"] > 0
    assert (c["gathered_buffer_bytes"] > 0) == plan["gathered_buffer"]["value"]
    assert c["mlp_sync_calls"] == (c["steps"] if plan["mlp_sync"]["value"] else 0)
    assert (c["attn_tp_padding_tokens"] > 0) == (plan["token_alignment"]["value"] > 1)
    if "--attn-tp-gather" in LAUNCHES[name]:
        assert plan["attn_tp_gather"]["source"] == "cli"


def test_dp_attention_with_attention_tp_gathers_and_syncs():
    """The launch the DESIGN calls out: a2a under DP attention with attention-TP 2 turns
    every switch on, and pads to 2."""
    _, report = launch("Qwen3MoeForCausalLM", LAUNCHES["tp4-dp2-a2a-on"])
    plan = report["plan"]["plan"]
    assert all(plan[k]["value"] for k in ("attn_tp_gather", "mlp_tp_gather", "mlp_sync"))
    assert plan["token_alignment"]["value"] == 2
    assert all(size % 2 == 0 for size in report["counters"]["capture_sizes"])


@pytest.fixture
def no_ranks(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a rank started")

    monkeypatch.setattr(engine.frontend.launcher.Ranks, "__init__", refuse)


REFUSED = [
    # the topology gathers and the model reduce-scatters through the engine
    ("Qwen3MoeForCausalLM", "--tp-size", "2", *A2A, "--attn-tp-gather", "off"),
    ("LlamaForCausalLM", "--tp-size", "4", *DENSE1, "--disable-attn-tp-gather"),
    # nothing to gather: no all-to-all, dense layers at full TP / attention-TP 1
    ("Qwen3MoeForCausalLM", "--tp-size", "2", "--attn-tp-gather", "on"),
    ("LlamaForCausalLM", "--tp-size", "2", *DP2, *A2A, "--attn-tp-gather", "on"),
]


@pytest.mark.parametrize("argv", REFUSED, ids=lambda a: " ".join(a[1:]))
def test_refused_plan_exits_2_before_any_rank_starts(argv, no_ranks, capsys, tmp_path):
    report = tmp_path / "r.json"
    with pytest.raises(SystemExit) as exit:
        main(["--model", *argv, "--prompt", "hi", "--report-json", str(report)])
    assert exit.value.code == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith("parcap: error: ") and "refused" in line
    assert not report.exists()


def test_refused_plan_exits_2_from_the_command_line(tmp_path):
    report = tmp_path / "r.json"
    done = run_cli(
        "generate", "--model", "Qwen3MoeForCausalLM", "--tp-size", "4", *A2A,
        "--attn-tp-gather", "off", "--prompt", "hi", "--report-json", str(report),
    )  # fmt: skip
    assert done.returncode == 2, done.stderr
    (line,) = done.stderr.splitlines()
    assert "--attn-tp-gather off" in line and "Qwen3MoeForCausalLM" in line
    assert done.stdout == "" and not report.exists()
    explain = run_cli(
        "registry", "explain", "Qwen3MoeForCausalLM", "--tp-size", "4", *A2A, "--json"
    )
    assert json.loads(explain.stdout)["plan"]["attn_tp_gather"]["source"] == "server_args"
