"""DeepseekV4ForCausalLM across ranks (real gloo ranks) against transformers 5.23: attention
head-parallel over attention-TP on all rows, the MoE on the model's own uneven token shard
(all2all) or TP-sharded (none), DP attention with an idle group; the plan opts out of the
engine's gather (`self_managed_sp=True`), and forcing it on changes the counters, not the
tokens."""

from __future__ import annotations

import pytest

from engine.messages import SamplingParams
from tests.support.checkpoints import load_reference, reference_greedy
from tests.support.deepseek_v4 import PROMPTS, STEPS, checkpoint
from tests.support.engine import assert_close, generate

__all__ = ["checkpoint"]  # a fixture

pytestmark = pytest.mark.slow

GREEDY = SamplingParams(max_new_tokens=STEPS, ignore_eos=True)
A2A = ("--moe-a2a-backend", "all2all")
DP = ("--dp-size", "2", "--enable-dp-attention")


@pytest.fixture(scope="module")
def expected(checkpoint):
    """transformers' greedy tokens and logprobs per prompt (one prompt at a time)."""
    reference = load_reference(checkpoint("tiny"))
    return [reference_greedy(reference, p, STEPS) for p in PROMPTS]


def run(checkpoint, *argv: str, prompts=PROMPTS) -> tuple[list, dict]:
    argv = ("--model-path", str(checkpoint("tiny")), "--max-prefill-tokens", "40", *argv)
    return generate(argv, prompts, [GREEDY] * len(prompts))


def assert_matches(results: list, expected: list) -> None:
    for result, (tokens, logprobs) in zip(results, expected, strict=True):
        assert result.output_ids == tokens
        assert_close(result.output_logprobs, logprobs, 1e-4)


@pytest.mark.parametrize(
    "argv",
    [("--tp-size", "2", *A2A), ("--tp-size", "2"), ("--tp-size", "4", *DP, *A2A)],
    ids=["tp2-all2all", "tp2-none", "tp4-dp2-all2all"],
)
def test_topology_matches_transformers(checkpoint, expected, argv):
    results, report = run(checkpoint, *argv)
    assert_matches(results, expected)
    gather = report["plan"]["plan"]["attn_tp_gather"]
    assert not gather["value"] and report["counters"]["attn_tp_padding_tokens"] == 0


def test_tp4_all2all_opts_out_and_the_forced_gather_gives_the_same_tokens(checkpoint, expected):
    auto, auto_report = run(checkpoint, "--tp-size", "4", *A2A)
    on, on_report = run(checkpoint, "--tp-size", "4", *A2A, "--attn-tp-gather", "on")
    assert_matches(auto, expected)
    assert_matches(on, expected)
    gather = auto_report["plan"]["plan"]["attn_tp_gather"]
    assert (gather["value"], gather["source"]) == (False, "model")
    c = auto_report["counters"]
    assert (c["gathered_buffer_bytes"], c["mlp_sync_calls"], c["attn_tp_padding_tokens"]) == (
        0,
        0,
        0,
    )
    c = on_report["counters"]
    assert c["gathered_buffer_bytes"] > 0 and c["mlp_sync_calls"] == c["steps"] > 0
    assert c["attn_tp_padding_tokens"] > 0  # the padded rows the model's own split ignores


def test_dp_attention_with_an_idle_group(checkpoint, expected):
    """One request for two attention-DP groups: group 1 runs every step on zero rows and
    joins every collective (its attention's all-reduce, the MoE's exchange)."""
    results, report = run(checkpoint, "--tp-size", "4", *DP, *A2A, prompts=PROMPTS[:1])
    assert_matches(results, expected[:1])
    assert report["counters"]["mlp_sync_calls"] == report["counters"]["steps"] > 0
