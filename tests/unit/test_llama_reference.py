import types
from pathlib import Path

import pytest
import torch

from engine.attention.torch_backend import TorchAttentionBackend
from engine.model_api import ForwardMode, ModelContext
from engine.model_api.config import config_from_dict, load_config
from engine.runtime.kv_cache import KVPool, ReqToTokenPool
from engine.runtime.loader import load_checkpoint, load_random
from models.llama import LlamaForCausalLM
from tests.support.batches import make_batch
from tests.support.checkpoints import (
    LLAMA_H64,
    load_reference,
    parcap_greedy,
    reference_greedy,
    save_tiny_checkpoint,
)
from tests.support.models import build, tiny_random

CASES = {
    "gqa-untied": {"num_key_value_heads": 2},
    "tied-bias-headdim": {
        "num_key_value_heads": 4,
        "head_dim": 8,
        "tie_word_embeddings": True,
        "attention_bias": True,
        "mlp_bias": True,
        "rope_parameters": {"rope_type": "default", "rope_theta": 1e6},
    },
    "llama3-rope": {
        "num_key_value_heads": 1,
        "rope_parameters": {
            "rope_type": "llama3",
            "rope_theta": 500000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 16,
        },
    },
    "yarn-rope": {
        "num_key_value_heads": 2,
        "rope_parameters": {
            "rope_type": "yarn",
            "rope_theta": 10000.0,
            "factor": 4.0,
            "original_max_position_embeddings": 32,
        },
    },
}
PROMPTS = [[1, 2, 3, 4, 5], [17, 99, 3, 250, 8, 8, 41, 300, 2, 77, 5], [200, 201, 202]]
STEPS = 8


@pytest.fixture(scope="module")
def checkpoint_dir(tmp_path_factory):
    root, saved = tmp_path_factory.mktemp("llama"), {}

    def path(case: str, **extra) -> Path:
        key = (case, *sorted(extra.items()))
        if key not in saved:
            config = {**LLAMA_H64, **CASES[case], **extra}
            saved[key] = save_tiny_checkpoint(root / str(len(saved)), config, seed=1)
        return saved[key]

    return path


def parcap_model(
    config: types.SimpleNamespace, ctx: ModelContext | None = None
) -> LlamaForCausalLM:
    return build(LlamaForCausalLM, config, ctx)


def run_parcap(path: Path, ctx: ModelContext | None = None):
    model = parcap_model(load_config(path), ctx)
    load_checkpoint(model, path)
    return parcap_greedy(model, PROMPTS, STEPS, chunk=4, pad_to=4)


@pytest.mark.parametrize("case", CASES)
def test_greedy_matches_transformers(case, checkpoint_dir):
    path = checkpoint_dir(case)
    tokens, logprobs, _ = run_parcap(path)
    reference = load_reference(path)
    for prompt, ours, our_logprobs in zip(PROMPTS, tokens, logprobs):
        ref_tokens, ref_logprobs = reference_greedy(reference, prompt, STEPS)
        assert ours == ref_tokens
        assert our_logprobs == pytest.approx(ref_logprobs, abs=1e-4)
    assert len({t for out in tokens for t in out}) > 3


@pytest.mark.parametrize("case", ["gqa-untied", "tied-bias-headdim"])
def test_checkpoint_shapes_match_transformers_state_dict(case, checkpoint_dir):
    path = checkpoint_dir(case)
    reference = load_reference(path)
    expected = {name: tuple(t.shape) for name, t in reference.state_dict().items()}
    if reference.config.tie_word_embeddings:
        expected.pop("lm_head.weight")
    assert LlamaForCausalLM.checkpoint_shapes(load_config(path)) == expected


def test_tiny_config_builds_a_transformers_llama_and_decodes_varied_tokens():
    import transformers

    values = LlamaForCausalLM.tiny_config()
    hf_values = {k: v for k, v in values.items() if k not in ("model_type", "torch_dtype")}
    reference = transformers.LlamaForCausalLM(transformers.LlamaConfig(**hf_values))
    expected = {name: tuple(t.shape) for name, t in reference.state_dict().items()}
    config = config_from_dict(values)
    assert LlamaForCausalLM.checkpoint_shapes(config) == expected

    model = parcap_model(config)
    load_random(model, seed=0)
    tokens, logprobs, _ = parcap_greedy(model, [list(b"Hello, world")], 24)
    assert len(set(tokens[0])) > 8
    assert all(lp > -5.0 for lp in logprobs[0])  # well above uniform over 384 tokens (-5.95)


def test_idle_batch_of_padding_rows_gives_no_logits():
    model = tiny_random(LlamaForCausalLM)
    kv_pool = KVPool(8, model.kv_cache_shapes(), torch.float32, torch.device("cpu"))
    backend = TorchAttentionBackend()
    batch = make_batch(
        ForwardMode.IDLE,
        0,
        rows=3,
        kv_pool=kv_pool,
        req_to_token=ReqToTokenPool(1, 8, torch.device("cpu")).table,
        backend=backend,
    )
    backend.plan(batch)
    with torch.inference_mode():
        logits = model(batch)
    assert logits.shape == (0, 384) and logits.dtype == torch.float32
