"""DeepSeek-V3 test material shared by the unit, multi-rank and engine tests: transformers
checkpoint cases with a non-zero correction bias, and in-process parcap models."""

from __future__ import annotations

import functools
import types
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from engine.model_api import ModelContext
from models.deepseek_v3 import DeepseekV3ForCausalLM
from tests.support.checkpoints import save_tiny_checkpoint
from tests.support.models import build, tiny_random

ARCH = "DeepseekV3ForCausalLM"
BASE = {
    **{k: v for k, v in DeepseekV3ForCausalLM.tiny_config().items() if k != "torch_dtype"},
    "max_position_embeddings": 128,  # factor x original, as transformers' yarn expects
    # cos/sin scaled (mscale != mscale_all_dim) as well as the softmax
    "rope_parameters": {
        "rope_type": "yarn",
        "rope_theta": 10000.0,
        "factor": 4.0,
        "original_max_position_embeddings": 32,
        "beta_fast": 32,
        "beta_slow": 1,
        "mscale": 0.707,
        "mscale_all_dim": 1.0,
    },
}
CASES = {
    "yarn-q-lora": {},
    "no-q-lora-plain-rope-bias-tied": {
        "q_lora_rank": None,
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
        "rope_interleave": False,
        "attention_bias": True,
        "tie_word_embeddings": True,
        "first_k_dense_replace": 2,
        "n_shared_experts": 2,
        "norm_topk_prob": False,
    },
}
PROMPTS = [[1, 2, 3, 4, 5], [17, 99, 3, 250, 8, 8, 41, 300, 2, 77, 5], [200, 201, 202]]
STEPS = 8


def save_checkpoint(root: Path, case: str) -> Path:
    """A random transformers checkpoint, with a non-zero e_score_correction_bias (a buffer
    transformers initialises to zero, so the random re-draw leaves it out)."""
    from safetensors.torch import load_file, save_file

    path = save_tiny_checkpoint(root / case, {**BASE, **CASES[case]}, seed=1)
    file = path / "model.safetensors"
    tensors = load_file(file)
    generator = torch.Generator().manual_seed(7)
    for name, tensor in tensors.items():
        if name.endswith("e_score_correction_bias"):
            tensor.copy_(0.1 * torch.randn(tensor.shape, generator=generator))
    save_file(tensors, file, metadata={"format": "pt"})
    return path


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Callable[[str], Path]:
    """`checkpoint(case)`: the case's checkpoint, saved on first use."""
    return functools.cache(
        functools.partial(save_checkpoint, tmp_path_factory.mktemp("deepseek_v3"))
    )


def parcap_model(
    config: types.SimpleNamespace, ctx: ModelContext | None = None
) -> DeepseekV3ForCausalLM:
    """Backend none and TP-sharded dense layers unless `ctx` says otherwise."""
    return build(DeepseekV3ForCausalLM, config, ctx)


def tiny_random_model(ctx: ModelContext | None = None) -> DeepseekV3ForCausalLM:
    return tiny_random(DeepseekV3ForCausalLM, ctx)
