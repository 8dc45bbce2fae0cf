"""Model configs the benchmarks run, and launches of the engine on them.

The embedded tiny configs are sized for CPU tests; on a GPU every figure runs shapes of
the real models' kind (head dim 128, MLA's 512 + 64 latent, tens of experts) with fewer
layers, so random weights load in seconds. Each entry overrides the class's
`tiny_config()`; the weights are the engine's seeded random ones.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from engine.frontend.launcher import Setup, init_method
from engine.frontend.tokenizer import eos_ids
from engine.messages import Launch, ModelSource
from engine.server_args import ServerArgs
from registry import ModelLoadError, UnknownArchitecture, get_model_info, resolve_plan

MODELS = ("LlamaForCausalLM", "Qwen3MoeForCausalLM", "DeepseekV3ForCausalLM")

GPU_CONFIGS: dict[str, dict[str, Any]] = {
    "LlamaForCausalLM": dict(
        hidden_size=2048, intermediate_size=5632, num_hidden_layers=4,
        num_attention_heads=16, num_key_value_heads=4, head_dim=128, vocab_size=32000,
        max_position_embeddings=4096,
    ),
    # Qwen3-30B-A3B's layer (hidden 2048, 32 x 128 query heads, 4 KV heads, top-8 of
    # experts of width 768), 4 layers of 64 experts instead of 48 of 128
    "Qwen3MoeForCausalLM": dict(
        hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768,
        num_hidden_layers=4, num_attention_heads=32, num_key_value_heads=4, head_dim=128,
        num_experts=64, num_experts_per_tok=8, norm_topk_prob=True, decoder_sparse_step=1,
        mlp_only_layers=[], vocab_size=32000, max_position_embeddings=4096,
    ),
    # DeepSeek-V3's attention (q_lora 1536 -> 768 here, kv_lora 512, rope 64, nope 128,
    # v 128) and routing (8 groups, top-4 groups, top-8, one shared expert), narrowed
    "DeepseekV3ForCausalLM": dict(
        hidden_size=2048, intermediate_size=5632, moe_intermediate_size=768,
        num_hidden_layers=4, first_k_dense_replace=1, num_attention_heads=16,
        q_lora_rank=768, kv_lora_rank=512, qk_rope_head_dim=64, qk_nope_head_dim=128,
        v_head_dim=128, n_routed_experts=64, num_experts_per_tok=8, n_group=8, topk_group=4,
        n_shared_experts=1, routed_scaling_factor=2.5, norm_topk_prob=True,
        vocab_size=32000, max_position_embeddings=4096,
    ),
}  # fmt: skip

# Figure (b): a Llama-3-8B layer (hidden 4096, 32 query / 8 KV heads of 128, MLP 14336,
# vocabulary 128256) with 8 of its 32 layers.
ROOFLINE_LLAMA: dict[str, Any] = dict(
    hidden_size=4096, intermediate_size=14336, num_hidden_layers=8, num_attention_heads=32,
    num_key_value_heads=8, head_dim=128, vocab_size=128256, max_position_embeddings=8192,
    rope_parameters={"rope_type": "default", "rope_theta": 500000.0},
)  # fmt: skip


def available(arch: str) -> str | None:
    """None if `arch` can be built here, else why not (its module has not landed, say)."""
    try:
        get_model_info(arch)
    except (UnknownArchitecture, ModelLoadError) as e:
        return " ".join(str(e).split())
    return None


def model_config(arch: str, overrides: dict[str, Any] | None) -> dict[str, Any]:
    from registry import get_model_class

    config = dict(get_model_class(arch).tiny_config())
    config.update(overrides or {})
    return config


def setup(arch: str, config: dict[str, Any], argv: list[str]) -> Setup:
    """What `engine.frontend.launcher.prepare` makes, for `config` with seeded random weights.

    Raises PlanRefused when the server arguments do not fit the model.
    """
    args = ServerArgs.from_cli(["--model", arch, *argv])
    info = get_model_info(arch)
    plan = resolve_plan(info.capabilities, args, model=arch)
    source = ModelSource(arch, config, None)
    launch = Launch(args, plan, source, init_method(args), eos_ids(source.namespace))
    return Setup(launch, info, None)


def publish(result: dict[str, Any], text: str, out: str, markdown: str | None) -> None:
    """A figure's numbers as JSON at `out`, its tables at `markdown` (if given) and on stdout."""
    Path(out).write_text(json.dumps(result, indent=2) + "\n")
    if markdown:
        Path(markdown).write_text(text + "\n")
    print(text)
