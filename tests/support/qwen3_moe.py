"""Qwen3-MoE test material shared by the unit and engine tests: transformers checkpoint
cases and their reference outputs."""

from __future__ import annotations

import pytest

from models.qwen3_moe import Qwen3MoeForCausalLM
from tests.support.checkpoints import load_reference, reference_greedy, save_tiny_checkpoint
from tests.support.engine import assert_close

TINY = {k: v for k, v in Qwen3MoeForCausalLM.tiny_config().items() if k != "torch_dtype"}
CASES = {
    # dense layer 1, renormalised top-2
    "tiny": {**TINY, "max_position_embeddings": 128},
    # every other layer sparse, raw softmax weights, tied embeddings, attention biases
    "sparse-step-tied": {
        **TINY,
        "max_position_embeddings": 128,
        "num_hidden_layers": 3,
        "decoder_sparse_step": 2,
        "mlp_only_layers": [],
        "norm_topk_prob": False,
        "num_experts_per_tok": 3,
        "tie_word_embeddings": True,
        "attention_bias": True,
        "num_key_value_heads": 2,
        "rope_parameters": {"rope_type": "default", "rope_theta": 1e6},
    },
}
PROMPTS = [[1, 2, 3, 4, 5], [17, 99, 3, 250, 8, 8, 41, 300, 2, 77, 5], [200, 201, 202]]
STEPS = 8


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """Per case: the checkpoint and transformers' greedy tokens and logprobs per prompt."""
    root, out = tmp_path_factory.mktemp("qwen3-moe"), {}
    for name, config in CASES.items():
        path = save_tiny_checkpoint(root / name, config, seed=2)
        reference = load_reference(path)
        out[name] = (path, [reference_greedy(reference, p, STEPS) for p in PROMPTS])
    return out


def check_against(reference, tokens, logprobs) -> None:
    for (ref_tokens, ref_logprobs), ours, our_logprobs in zip(
        reference, tokens, logprobs, strict=True
    ):
        assert ours == ref_tokens
        assert_close(our_logprobs, ref_logprobs, 1e-4)
