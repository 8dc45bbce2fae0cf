"""DeepSeek-V4 test material shared by the unit and engine tests: transformers checkpoints
with their routing buffers filled, in-process parcap models, and a probe of what a
reference run exercised (window eviction, compressed entries, the indexer's top-k and its
closest tie, the SwiGLU clamp)."""

from __future__ import annotations

import contextlib
import functools
import types
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from engine.model_api import ModelContext
from models.deepseek_v4 import DeepseekV4ForCausalLM
from tests.support.checkpoints import save_tiny_checkpoint
from tests.support.models import build, tiny_random

ARCH = "DeepseekV4ForCausalLM"
BASE = {k: v for k, v in DeepseekV4ForCausalLM.tiny_config().items() if k != "torch_dtype"}
CSA, HCA = "compressed_sparse_attention", "heavily_compressed_attention"
CASES = {
    "tiny": {},
    # every size differs from the tiny config; compress RoPE without yarn; tied LM head
    "every-size": {
        "vocab_size": 320,
        "hidden_size": 48,
        "num_hidden_layers": 5,
        "layer_types": [HCA, CSA, "sliding_attention", CSA, HCA],
        "mlp_layer_types": ["hash_moe", "moe", "hash_moe", "moe", "moe"],
        "compress_rates": {CSA: 2, HCA: 4},
        "sliding_window": 4,
        "num_attention_heads": 4,
        "head_dim": 24,
        "partial_rotary_factor": 0.5,
        "q_lora_rank": 24,
        "o_groups": 2,
        "o_lora_rank": 12,
        "index_n_heads": 6,
        "index_head_dim": 20,
        "index_topk": 2,
        "n_routed_experts": 6,
        "num_experts_per_tok": 3,
        "moe_intermediate_size": 20,
        "routed_scaling_factor": 2.0,
        "swiglu_limit": 0.8,
        "hc_mult": 2,
        "hc_sinkhorn_iters": 7,
        "hc_eps": 1e-5,
        "rms_norm_eps": 1e-5,
        "max_position_embeddings": 96,
        "rope_theta": 5000.0,
        "compress_rope_theta": 80000.0,
        "rope_parameters": {"rope_type": "default"},
        "tie_word_embeddings": True,
    },
}
# 30 tokens: past the window (8), HCA entries (rate 8) and the indexer's top-k (3 of rate-4
# entries binds from position 15)
# weight seeds whose reference runs over PROMPTS have no indexer tie at the top-k boundary
# (with few index heads, both scores can be exactly 0 after the ReLU)
SEEDS = {"tiny": 2, "every-size": 1}
PROMPTS = [
    [1, 2, 3, 4, 5],
    list(b"DeepSeek-V4"),
    [200, 201, 202],
    list(b"mHC streams x4, sinks, HCA+CSA."),
]
STEPS = 8
MIN_INDEX_GAP = 1e-5


def save_checkpoint(root: Path, case: str, seed: int | None = None) -> Path:
    """A random transformers checkpoint whose routing buffers (zero after transformers'
    init, so the random re-draw leaves them out) hold something: every row of
    ``ffn.gate.tid2eid`` k distinct expert ids, ``ffn.gate.bias`` ~ 0.1 N(0, 1)."""
    from safetensors.torch import load_file, save_file

    seed = SEEDS.get(case, 1) if seed is None else seed
    path = save_tiny_checkpoint(root / case, {**BASE, **CASES[case]}, seed=seed)
    file = path / "model.safetensors"
    tensors = load_file(file)
    generator = torch.Generator().manual_seed(7)
    for name, tensor in tensors.items():
        if name.endswith("ffn.gate.bias"):
            tensor.copy_(0.1 * torch.randn(tensor.shape, generator=generator))
        elif name.endswith("ffn.gate.tid2eid"):
            experts = tensors[name.replace("tid2eid", "weight")].shape[0]
            tensor.copy_(distinct_ids(tensor.shape[0], experts, tensor.shape[1], generator))
    save_file(tensors, file, metadata={"format": "pt"})
    return path


def distinct_ids(rows: int, experts: int, k: int, generator: torch.Generator) -> torch.Tensor:
    """[rows, k] int64: k distinct expert ids per row (a `tid2eid` table, a top-k routing)."""
    return torch.stack([torch.randperm(experts, generator=generator)[:k] for _ in range(rows)])


def hf_config(base: dict = BASE, **overrides):
    """transformers' DeepseekV4Config of `base` (the tiny config) with `overrides`."""
    import transformers

    values = {k: v for k, v in {**base, **overrides}.items() if k != "model_type"}
    return transformers.AutoConfig.for_model("deepseek_v4", **values)


def randomize(module: torch.nn.Module, seed: int = 0) -> None:
    """Random parameters like save_tiny_checkpoint's, but `scale`s near 1 and `base` wide,
    so that every term of the mHC weights matters (block tests)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if p.dim() >= 2:
                p.copy_(noise / p.shape[-1] ** 0.5)
            elif "norm" in name or name.endswith("scale"):
                p.copy_(1 + 0.3 * noise)
            else:
                p.copy_(0.5 * noise)


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """Max abs difference, in float64."""
    return float((a.detach().double() - b.detach().double()).abs().max())


LEGACY = {  # as DeepSeek's released config.json spells it
    "num_hidden_layers": 5,
    "compress_ratios": [0, 4, 128, 4, 0, 128],
    "compress_rate_hca": 64,
    "num_hash_layers": 2,
    "qk_rope_head_dim": 64,
    "rope_theta": 10000,
    "compress_rope_theta": 160000,
    "rope_scaling": {"type": "yarn", "factor": 16, "original_max_position_embeddings": 65536},
}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Callable[[str], Path]:
    """`checkpoint(case)`: the case's checkpoint, saved on first use."""
    return functools.cache(
        functools.partial(save_checkpoint, tmp_path_factory.mktemp("deepseek_v4"))
    )


def parcap_model(
    config: types.SimpleNamespace, ctx: ModelContext | None = None
) -> DeepseekV4ForCausalLM:
    return build(DeepseekV4ForCausalLM, config, ctx)


def tiny_random_model(ctx: ModelContext | None = None) -> DeepseekV4ForCausalLM:
    return tiny_random(DeepseekV4ForCausalLM, ctx)


def index_gaps(scores: torch.Tensor, rate: int, top_k: int) -> list[float]:
    """For every query (row t of `scores` [S, T], entries scored by the indexer, query t at
    position t) whose visible entries (w < (t+1) // rate) outnumber `top_k`: the gap
    between its k-th and (k+1)-th best score. A small gap is a near-tie: fp32 reordering
    noise could swap a whole entry in or out. An exact tie counts too, zeros included
    (every head's ReLU zero on both entries): torch's top-k breaks it differently for
    different lengths of the scored row, so even transformers' own recompute and cache
    disagree there."""
    gaps = []
    for t, row in enumerate(scores):
        visible = (t + 1) // rate
        if visible > top_k:
            best = row[:visible].double().sort(descending=True).values
            gaps.append(float(best[top_k - 1] - best[top_k]))
    return gaps


@contextlib.contextmanager
def probe(reference: torch.nn.Module):
    """Records, over the reference's forwards (one prompt each, positions from 0): the
    indexer gaps where the top-k binds (`index_gaps`), the longest context, and the share
    of routed-expert gate values the clamp changes."""
    config = reference.config
    stats = types.SimpleNamespace(gaps=[], longest=0, gates=0, clamped=0)
    handles = []

    def on_scores(module, args, scores):
        rate = config.compress_rates[CSA]
        stats.gaps += index_gaps(scores[0], rate, config.index_topk)
        stats.longest = max(stats.longest, scores.shape[1])

    for module in reference.modules():
        if type(module).__name__ == "DeepseekV4IndexerScorer":
            handles.append(module.register_forward_hook(on_scores))
        if type(module).__name__ == "DeepseekV4Experts":
            module._apply_gate = _counting_gate(module, stats)
    try:
        yield stats
    finally:
        for handle in handles:
            handle.remove()


def _counting_gate(module: torch.nn.Module, stats: types.SimpleNamespace):
    apply_gate = type(module)._apply_gate

    def counted(gate_up: torch.Tensor) -> torch.Tensor:
        gate = gate_up.chunk(2, dim=-1)[0]
        stats.gates += gate.numel()
        stats.clamped += int((gate > module.limit).sum())
        return apply_gate(module, gate_up)

    return counted


def assert_no_near_tie(gaps: list[float]) -> None:
    """Fails with "near-tie" (not a parity failure) when the reference's indexer had two
    entries within MIN_INDEX_GAP at the top-k boundary."""
    smallest = min(gaps, default=float("inf"))
    assert smallest >= MIN_INDEX_GAP, (
        f"near-tie in the reference indexer: k-th and (k+1)-th scores {smallest:.3g} apart "
        f"(< {MIN_INDEX_GAP}); a token mismatch here is not a parity failure"
    )
