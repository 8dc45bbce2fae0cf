"""DeepSeek-V4's config.json as its layers read it: `DeepseekV4Config.__post_init__`
(transformers 5.23) replayed on a namespace, for the nested form transformers saves and the
legacy form of DeepSeek's released configs.

parcap reads config.json itself, so the generic `engine.model_api.config.rope_parameters`
would flatten V4's {"main", "compress"} RoPE dict; everything V4-specific is resolved here
once, and the layers read only the attributes this returns.
"""

from __future__ import annotations

import copy
import types
from typing import Any

from engine.model_api import Divides, MoeSettings

LAYER_TYPES = ("sliding_attention", "compressed_sparse_attention", "heavily_compressed_attention")
MLP_LAYER_TYPES = ("hash_moe", "moe")
# legacy per-layer `compress_ratios` -> layer type (transformers accepts only these three)
RATIO_TO_LAYER_TYPE = {0: LAYER_TYPES[0], 4: LAYER_TYPES[1], 128: LAYER_TYPES[2]}
DEFAULT_COMPRESS_RATES = {LAYER_TYPES[1]: 4, LAYER_TYPES[2]: 128}
DEFAULT_NUM_HASH_LAYERS = 3
DEFAULT_PARTIAL_ROTARY_FACTOR = 64 / 512
_SCALED_ROPE_TYPES = ("llama3", "yarn", "longrope")

# `DeepseekV4Config`'s field defaults (V4-Flash)
DEFAULTS: dict[str, Any] = {
    "vocab_size": 129280,
    "hidden_size": 4096,
    "moe_intermediate_size": 2048,
    "num_hidden_layers": 43,
    "num_attention_heads": 64,
    "num_key_value_heads": 1,
    "head_dim": 512,
    "q_lora_rank": 1024,
    "num_experts_per_tok": 6,
    "n_routed_experts": 256,
    "n_shared_experts": 1,
    "scoring_func": "sqrtsoftplus",
    "norm_topk_prob": True,
    "routed_scaling_factor": 1.5,
    "max_position_embeddings": 1048576,
    "rope_theta": 10000.0,
    "compress_rope_theta": 160000.0,
    "hc_mult": 4,
    "hc_sinkhorn_iters": 20,
    "hc_eps": 1.0e-6,
    "swiglu_limit": 10.0,
    "sliding_window": 128,
    "o_groups": 8,
    "o_lora_rank": 1024,
    "index_n_heads": 64,
    "index_head_dim": 128,
    "index_topk": 512,
    "num_nextn_predict_layers": 1,
    "hidden_act": "silu",
    "rms_norm_eps": 1.0e-6,
    "pad_token_id": None,
    "bos_token_id": 0,
    "eos_token_id": 1,
    "tie_word_embeddings": False,
    "attention_bias": False,
    "mlp_bias": False,
}


def normalize_config(config: types.SimpleNamespace) -> types.SimpleNamespace:
    """A new namespace: the config's own keys, transformers' defaults for the missing ones,
    and the resolved `layer_types`, `mlp_layer_types`, `compress_rates`,
    `partial_rotary_factor`, `qk_rope_head_dim`, nested `rope_parameters` and its two
    halves `rope_main` / `rope_compress`. Idempotent; the input is not modified."""
    v = copy.deepcopy(vars(config))
    legacy = {key: v.pop(key, None) for key in _LEGACY_KEYS}
    for key, value in DEFAULTS.items():
        v.setdefault(key, value)
    n = v["num_hidden_layers"]

    rates = dict(v.get("compress_rates") or DEFAULT_COMPRESS_RATES)
    if legacy["compress_rate_csa"] is not None:
        rates[LAYER_TYPES[1]] = legacy["compress_rate_csa"]
    if legacy["compress_rate_hca"] is not None:
        rates[LAYER_TYPES[2]] = legacy["compress_rate_hca"]
    v["compress_rates"] = rates

    layer_types = v.get("layer_types")
    if layer_types is None and legacy["compress_ratios"] is not None:
        layer_types = [_layer_type(r) for r in legacy["compress_ratios"]]
    if layer_types is None:  # V4-Pro's schedule: 2x HCA, then HCA/CSA alternating
        alternating = [LAYER_TYPES[1] if i % 2 else LAYER_TYPES[2] for i in range(max(n - 2, 0))]
        layer_types = [LAYER_TYPES[2]] * min(n, 2) + alternating
    v["layer_types"] = _checked("layer_types", list(layer_types)[:n], n, LAYER_TYPES)

    mlp_types = v.get("mlp_layer_types")
    if mlp_types is None:
        n_hash = legacy["num_hash_layers"]
        n_hash = DEFAULT_NUM_HASH_LAYERS if n_hash is None else n_hash
        mlp_types = ["hash_moe"] * min(n, n_hash) + ["moe"] * max(0, n - n_hash)
    v["mlp_layer_types"] = _checked("mlp_layer_types", list(mlp_types)[:n], n, MLP_LAYER_TYPES)

    if v.get("partial_rotary_factor") is None:
        qk_rope = legacy["qk_rope_head_dim"]
        v["partial_rotary_factor"] = (
            qk_rope / v["head_dim"] if qk_rope is not None else DEFAULT_PARTIAL_ROTARY_FACTOR
        )
    v["qk_rope_head_dim"] = int(v["head_dim"] * v["partial_rotary_factor"])

    main, compress = _rope(v, legacy["rope_scaling"])
    v["rope_parameters"] = {"main": main, "compress": compress}
    v["rope_main"], v["rope_compress"] = main, compress
    # transformers' attribute_map: the shared expert reads `intermediate_size`
    v["intermediate_size"] = v["moe_intermediate_size"]
    v["num_local_experts"] = v["n_routed_experts"]
    return types.SimpleNamespace(**v)


_LEGACY_KEYS = (
    "compress_ratios",
    "compress_rate_csa",
    "compress_rate_hca",
    "num_hash_layers",
    "qk_rope_head_dim",
    "rope_scaling",
)


def _layer_type(ratio: int) -> str:
    try:
        return RATIO_TO_LAYER_TYPE[ratio]
    except KeyError:
        raise ValueError(
            f"compress_ratios: {ratio} is not one of {sorted(RATIO_TO_LAYER_TYPE)}"
        ) from None


def _checked(name: str, types_: list[str], n: int, allowed: tuple[str, ...]) -> list[str]:
    if len(types_) != n:
        raise ValueError(f"num_hidden_layers ({n}) must equal len({name}) ({len(types_)})")
    bad = [t for t in types_ if t not in allowed]
    if bad:
        raise ValueError(f"{name} entries must be one of {allowed} for DeepSeek-V4; got {bad}")
    return types_


def _rope(v: dict[str, Any], rope_scaling: dict | None) -> tuple[dict, dict]:
    """(main, compress) as `convert_rope_params_to_dict`, `standardize_rope_params` and
    V4's `__post_init__` leave them: legacy `rope_scaling` wins over `rope_parameters`; a
    flat dict (yarn keys) becomes the compress RoPE at `compress_rope_theta`, the main
    RoPE is plain at `rope_theta`; yarn's attention factor is forced to 1.0 (V4 does not
    scale cos/sin by the yarn mscale)."""
    rp = copy.deepcopy(rope_scaling or v.get("rope_parameters") or {})
    partial = v["partial_rotary_factor"]
    if isinstance(rp.get("main"), dict) and isinstance(rp.get("compress"), dict):
        for params in (rp["main"], rp["compress"]):
            params.setdefault("rope_type", params.get("type", "default"))
            params.setdefault("rope_theta", v["rope_theta"])
            params.setdefault("partial_rotary_factor", partial)
            if params["rope_type"] in _SCALED_ROPE_TYPES:
                params.setdefault("original_max_position_embeddings", v["max_position_embeddings"])
        return rp["main"], rp["compress"]
    flat = {k: val for k, val in rp.items() if k not in ("main", "compress")}
    flat.setdefault("rope_type", flat.get("type", "default"))
    if flat["rope_type"] in _SCALED_ROPE_TYPES:
        original = v.get("original_max_position_embeddings")
        if original is not None:
            flat["original_max_position_embeddings"] = original
        else:
            flat.setdefault("original_max_position_embeddings", v["max_position_embeddings"])
    main = {"rope_type": "default", "rope_theta": v["rope_theta"], "partial_rotary_factor": partial}
    compress = {**flat, "rope_theta": v["compress_rope_theta"], "partial_rotary_factor": partial}
    if compress["rope_type"] == "yarn":
        compress.setdefault("attention_factor", 1.0)
    return main, compress


def parallel_constraints(config: types.SimpleNamespace, moe: MoeSettings) -> list[Divides]:
    """Heads and output groups split over attention-TP (the single KV head, compressors and
    indexer are replicated); routed experts over "tp", whole (all2all) or by their
    intermediate size (none, with the shared expert's)."""
    config = normalize_config(config)
    out = [
        Divides("num_attention_heads", config.num_attention_heads, "attn_tp"),
        Divides("o_groups", config.o_groups, "attn_tp"),
    ]
    if moe.a2a_backend != "none":
        out.append(Divides("the number of routed experts", config.n_routed_experts, "tp"))
    else:
        out.append(Divides("moe_intermediate_size", config.moe_intermediate_size, "tp"))
    return out
