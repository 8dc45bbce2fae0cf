"""Qwen3-MoE in one process against transformers 5.23 on tiny random fp32 checkpoints."""

from __future__ import annotations

import pytest
from safetensors import safe_open

from engine.model_api.config import load_config
from engine.runtime.loader import load_checkpoint
from models.qwen3_moe import Qwen3MoeForCausalLM
from tests.support.checkpoints import parcap_greedy
from tests.support.models import build, tiny_random
from tests.support.qwen3_moe import CASES, PROMPTS, STEPS, check_against, checkpoints

__all__ = ["checkpoints"]  # a fixture


@pytest.mark.parametrize("case", list(CASES))
def test_greedy_matches_transformers(checkpoints, case):
    path, reference = checkpoints[case]
    model = build(Qwen3MoeForCausalLM, load_config(path))
    load_checkpoint(model, path)
    # chunks of 4 extend cached prefixes; padding to 4 rows feeds the router padding rows
    tokens, logprobs, _ = parcap_greedy(model, PROMPTS, STEPS, chunk=4, pad_to=4)
    check_against(reference, tokens, logprobs)
    assert len({t for out in tokens for t in out}) > 3


@pytest.mark.parametrize("case", list(CASES))
def test_checkpoint_shapes_match_saved_checkpoint(checkpoints, case):
    path, _ = checkpoints[case]
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        saved = {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}  # noqa: SIM118
    if CASES[case].get("tie_word_embeddings"):
        saved.pop("lm_head.weight", None)
    assert Qwen3MoeForCausalLM.checkpoint_shapes(load_config(path)) == saved


def test_tiny_config_has_dense_and_sparse_layers_and_decodes_varied_tokens():
    model = tiny_random(Qwen3MoeForCausalLM)
    assert [layer.is_moe for layer in model.model.layers] == [True, False, True, True]
    tokens, logprobs, _ = parcap_greedy(model, [list(b"Hello, world")], 24)
    assert len(set(tokens[0])) > 8
    assert all(lp > -5.0 for lp in logprobs[0])  # well above uniform over 384 tokens (-5.95)
