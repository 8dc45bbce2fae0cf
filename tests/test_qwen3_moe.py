"""Qwen3-MoE against transformers 5.23 on tiny random fp32 checkpoints: the model driven
directly in one process, and the whole engine at TP 2 with the all-to-all expert backend."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open

from engine.loader import build_model, load_checkpoint, load_random
from engine.model_config import config_from_dict, load_config
from engine.sequence import SamplingParams
from models.qwen3_moe import Qwen3MoeForCausalLM
from tests.checkpoints import load_reference, parcap_greedy, reference_greedy, save_tiny_checkpoint
from tests.engine_helpers import assert_close, generate

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


@pytest.mark.parametrize("case", list(CASES))
def test_greedy_matches_transformers(checkpoints, case):
    path, reference = checkpoints[case]
    model = build_model(Qwen3MoeForCausalLM, load_config(path), torch.float32, torch.device("cpu"))
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
    config = config_from_dict(Qwen3MoeForCausalLM.tiny_config())
    model = build_model(Qwen3MoeForCausalLM, config, torch.float32, torch.device("cpu"))
    assert [layer.is_moe for layer in model.model.layers] == [True, False, True, True]
    load_random(model, seed=0)
    tokens, logprobs, _ = parcap_greedy(model, [list(b"Hello, world")], 24)
    assert len(set(tokens[0])) > 8
    assert all(lp > -5.0 for lp in logprobs[0])  # well above uniform over 384 tokens (-5.95)


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
