"""Qwen3-MoE through the engine at TP 2 with the all-to-all expert backend, against
transformers 5.23."""

from __future__ import annotations

import pytest

from engine.messages import SamplingParams
from tests.support.engine import generate
from tests.support.qwen3_moe import PROMPTS, STEPS, check_against, checkpoints

__all__ = ["checkpoints"]  # a fixture


@pytest.mark.slow
def test_engine_tp2_all2all_matches_transformers(checkpoints):
    path, reference = checkpoints["tiny"]
    argv = ("--model-path", str(path), "--tp-size", "2", "--moe-a2a-backend", "all2all")
    greedy = SamplingParams(max_new_tokens=STEPS, ignore_eos=True)
    results, report = generate(argv, PROMPTS, [greedy] * len(PROMPTS))
    check_against(reference, [r.output_ids for r in results], [r.output_logprobs for r in results])
    plan = report["plan"]["plan"]
    gather = plan["attn_tp_gather"]
    assert (gather["value"], gather["source"]) == (True, "server_args")
    assert report["counters"]["gathered_buffer_bytes"] > 0
    assert report["counters"]["mlp_sync_calls"] == report["counters"]["steps"] > 0
