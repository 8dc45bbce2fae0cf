"""DeepseekV3ForCausalLM in one process: parity with transformers 5.23 and its checkpoint."""

from __future__ import annotations

from pathlib import Path

import pytest

from engine.model_api.config import config_from_dict, load_config
from engine.model_api.weights import CheckpointError
from engine.runtime.loader import load_checkpoint, load_model, random_weights
from models.deepseek_v3 import DeepseekV3ForCausalLM
from tests.support.checkpoints import (
    load_reference,
    parcap_greedy,
    reference_greedy,
    save_tiny_checkpoint,
)
from tests.support.deepseek_v3 import (
    CASES,
    PROMPTS,
    STEPS,
    checkpoint,
    parcap_model,
    tiny_random_model,
)

__all__ = ["checkpoint"]  # a fixture


@pytest.mark.parametrize("case", CASES)
def test_greedy_matches_transformers(case, checkpoint):
    """Prefill in chunks of 4 (later chunks attend to cached latents), then decode, in
    shared batches padded to 4 rows."""
    path = checkpoint(case)
    model = parcap_model(load_config(path))
    load_checkpoint(model, path)
    tokens, logprobs, _ = parcap_greedy(model, PROMPTS, STEPS, chunk=4, pad_to=4)
    reference = load_reference(path)
    for prompt, ours, our_logprobs in zip(PROMPTS, tokens, logprobs, strict=True):
        ref_tokens, ref_logprobs = reference_greedy(reference, prompt, STEPS)
        assert ours == ref_tokens
        assert our_logprobs == pytest.approx(ref_logprobs, abs=1e-4)
    assert len({t for out in tokens for t in out}) > 3
    assert DeepseekV3ForCausalLM.checkpoint_shapes(load_config(path)) == saved_shapes(path)


def saved_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Tensor shapes as transformers saves them (per-expert, unlike its fused state dict)."""
    from safetensors import safe_open

    handle = safe_open(str(path / "model.safetensors"), framework="pt")
    return {name: tuple(handle.get_slice(name).get_shape()) for name in handle.keys()}  # noqa: SIM118


def test_tiny_config_is_a_transformers_deepseek_v3_and_decodes_varied_tokens(tmp_path):
    values = DeepseekV3ForCausalLM.tiny_config()
    path = save_tiny_checkpoint(tmp_path, {k: v for k, v in values.items() if k != "torch_dtype"})
    assert DeepseekV3ForCausalLM.checkpoint_shapes(config_from_dict(values)) == saved_shapes(path)
    assert DeepseekV3ForCausalLM.parallel_capabilities.self_managed_sp is True

    tokens, logprobs, _ = parcap_greedy(tiny_random_model(), [list(b"Hello, world")], 24)
    assert len(set(tokens[0])) > 8
    assert all(lp > -5.0 for lp in logprobs[0])  # well above uniform over 384 tokens (-5.95)


def test_kv_cache_holds_one_latent_row_per_token():
    model = tiny_random_model()
    config = model.config
    width = config.kv_lora_rank + config.qk_rope_head_dim
    assert model.kv_cache_shapes() == [[(1, width)]] * config.num_hidden_layers


def test_multi_token_prediction_layers_are_skipped_and_nothing_else():
    """Released DeepSeek-V3 checkpoints carry an MTP layer after the last decoder layer."""
    model = tiny_random_model()
    config = model.config
    shapes = DeepseekV3ForCausalLM.checkpoint_shapes(config)
    mtp = f"model.layers.{config.num_hidden_layers}.eh_proj.weight"
    extra = {mtp: (config.hidden_size, 2 * config.hidden_size)}
    load_model(model, random_weights(shapes | extra, seed=0))
    stray = {"model.layers.0.eh_proj.weight": (config.hidden_size, 2 * config.hidden_size)}
    with pytest.raises(CheckpointError, match="model.layers.0.eh_proj.weight: unexpected"):
        load_model(model, random_weights(shapes | stray, seed=0))
