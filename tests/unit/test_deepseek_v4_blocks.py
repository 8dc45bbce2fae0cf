"""DeepSeek-V4's building blocks against their transformers 5.23 counterparts (weights
copied, random inputs, float32), its config normaliser, and its checkpoint plumbing."""

from __future__ import annotations

import os
import types

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open

from engine.model_api import ModelContext
from engine.model_api.config import config_from_dict, load_config
from engine.runtime.loader import load_checkpoint, load_random
from models import deepseek_v4_weights as ckpt
from models.deepseek_v4 import DeepseekV4DecoderLayer, DeepseekV4ForCausalLM, DeepseekV4MoE
from models.deepseek_v4_config import DEFAULTS, normalize_config
from models.layers import fused_moe as fm
from models.layers.hyper_connection import HyperHead
from models.layers.mlp import GatedMLP
from models.layers.norm import Fp32RMSNorm, rms_norm_unweighted
from models.layers.router import hash_route, sqrtsoftplus_topk
from tests.support.deepseek_v4 import (
    BASE,
    CASES,
    LEGACY,
    checkpoint,
    distinct_ids,
    hf_config,
    max_diff,
    parcap_model,
    randomize,
)

__all__ = ["checkpoint"]  # a fixture

tf = pytest.importorskip("transformers.models.deepseek_v4.modeling_deepseek_v4")
INTERPRET = fm.HAS_TRITON and os.environ.get("TRITON_INTERPRET") == "1"
T = 23  # rows


@pytest.mark.parametrize(
    "values",
    [BASE, hf_config().to_dict(), LEGACY, {}, {**BASE, "rope_parameters": None}],
    ids=["tiny", "saved-nested", "legacy-hub", "defaults", "no-rope-parameters"],
)
def test_config_normaliser_matches_transformers(values):
    values = {k: v for k, v in values.items() if k not in ("model_type", "transformers_version")}
    ref = hf_config(values)
    ours = normalize_config(types.SimpleNamespace(**values))
    keys = ["layer_types", "mlp_layer_types", "compress_rates", "partial_rotary_factor"]
    keys += ["qk_rope_head_dim", "rope_parameters", "intermediate_size", *DEFAULTS]
    assert {k: getattr(ours, k) for k in keys} == {k: getattr(ref, k) for k in keys}
    assert (ours.rope_main, ours.rope_compress) == (
        ref.rope_parameters["main"],
        ref.rope_parameters["compress"],
    )
    assert vars(normalize_config(ours)) == vars(ours)


def test_config_normaliser_refuses_what_transformers_refuses():
    with pytest.raises(ValueError, match="compress_ratios: 8"):
        normalize_config(types.SimpleNamespace(num_hidden_layers=2, compress_ratios=[0, 8]))
    with pytest.raises(ValueError, match="len\\(mlp_layer_types\\)"):
        normalize_config(types.SimpleNamespace(num_hidden_layers=2, mlp_layer_types=["moe"]))


def test_decoder_layer_mixing_matches_transformers():
    """Both hyper-connections, both norms and the stream update of a decoder layer, with
    the attention and the MoE replaced by the same stand-ins on both sides."""
    config = hf_config()
    theirs = tf.DeepseekV4DecoderLayer(config, 2).eval()
    randomize(theirs)
    ours = DeepseekV4DecoderLayer(
        normalize_config(config_from_dict(BASE)), 2, ModelContext.single()
    )
    for name in ("attn_hc", "ffn_hc"):
        getattr(ours, name).load_state_dict(getattr(theirs, name).state_dict())
    ours.attn_norm.weight.copy_(theirs.input_layernorm.weight)
    ours.ffn_norm.weight.copy_(theirs.post_attention_layernorm.weight)
    attn, mlp = torch.nn.Linear(64, 64, bias=False), torch.nn.Linear(64, 64, bias=False)
    del theirs.self_attn, theirs.mlp, ours.attn, ours.ffn
    theirs.self_attn = lambda h, **kwargs: (torch.tanh(attn(h)), None)
    theirs.mlp = lambda h, input_ids=None: torch.tanh(mlp(h))
    ours.attn = lambda positions, h, batch: torch.tanh(attn(h))
    ours.ffn = lambda h, input_ids, num_valid=None, max_rows=None: torch.tanh(mlp(h))

    x = torch.randn(1, T, 4, 64, generator=torch.Generator().manual_seed(1))
    batch = types.SimpleNamespace(
        input_ids=torch.zeros(T, dtype=torch.long), num_token_non_padded=T
    )
    with torch.no_grad():
        expected = theirs(x)
        got = ours(None, x[0], batch)
        post, comb, collapsed = theirs.attn_hc(x)
        ours_post, ours_comb, ours_collapsed = ours.attn_hc(x[0])
    assert max_diff(got, expected[0]) <= 1e-6
    for a, b in [(ours_post, post[0]), (ours_comb, comb[0]), (ours_collapsed, collapsed[0])]:
        assert max_diff(a, b) <= 1e-6
    assert torch.allclose(ours_comb.sum(-1), torch.ones(T, 4), atol=1e-3)  # doubly stochastic


def test_hyper_head_matches_transformers():
    theirs = tf.DeepseekV4HyperHead(hf_config()).eval()
    randomize(theirs)
    ours = HyperHead(64, 4, 1e-6, 1e-6)
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(1, T, 4, 64)
    with torch.no_grad():
        assert max_diff(ours(x[0]), theirs(x)[0]) <= 1e-6


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_norms_match_transformers(dtype):
    theirs = tf.DeepseekV4RMSNorm(64, eps=1e-6)
    randomize(theirs)
    ours = Fp32RMSNorm(64, 1e-6)
    ours.weight.copy_(theirs.weight)
    x = (3 * torch.randn(T, 64)).to(dtype)
    with torch.no_grad():
        assert torch.equal(ours(x), theirs(x))  # same rounding order in bf16 too
        assert torch.equal(rms_norm_unweighted(x, 1e-6), tf.DeepseekV4UnweightedRMSNorm(1e-6)(x))


@torch.no_grad()
def test_routers_match_transformers():
    config = hf_config()
    g = torch.Generator().manual_seed(2)
    h = torch.randn(T, 64, generator=g)
    top = tf.DeepseekV4TopKRouter(config)
    randomize(top)
    top.e_score_correction_bias.copy_(0.1 * torch.randn(8, generator=g))
    _, weights, ids = top(h)
    logits = F.linear(h, top.weight)
    ours_w, ours_ids = sqrtsoftplus_topk(logits, 2, top.e_score_correction_bias, 1.5)
    assert torch.equal(ours_ids, ids) and max_diff(ours_w, weights) <= 1e-7

    hashed = tf.DeepseekV4HashRouter(config)
    hashed.weight.copy_(top.weight)
    hashed.tid2eid.copy_(distinct_ids(384, 8, 2, g))
    input_ids = torch.randint(0, 384, (T,), generator=g)
    _, weights, ids = hashed(h, input_ids)
    ours_w, ours_ids = hash_route(logits, hashed.tid2eid, input_ids, 1.5, num_valid=T - 3)
    assert (
        torch.equal(ours_ids[: T - 3], ids[: T - 3])
        and max_diff(ours_w[: T - 3], weights[: T - 3]) <= 1e-7
    )
    assert (ours_ids[T - 3 :] == -1).all() and (ours_w[T - 3 :] == 0).all()  # padding


def clamped_experts(seed: int = 3):
    """transformers' routed experts with weights big enough that the clamp (limit 1.0)
    fires on > 10% of gate values, and a routing of distinct experts per row."""
    theirs = tf.DeepseekV4Experts(hf_config())
    randomize(theirs, seed)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, 64, generator=g)
    ids = distinct_ids(T, 8, 2, g)
    weights = torch.rand(T, 2, generator=g)
    with torch.no_grad():
        theirs.gate_up_proj.mul_(4.0)
        gate = torch.einsum("td,tkid->tki", x, theirs.gate_up_proj[ids][:, :, :32])
        assert (gate > 1.0).float().mean() > 0.1
        return theirs(x, ids, weights), theirs, x, ids, weights


def test_clamped_experts_match_transformers():
    expected, theirs, x, ids, weights = clamped_experts()
    got = fm.fused_experts(x, theirs.gate_up_proj, theirs.down_proj, weights, ids, 1.0)
    assert max_diff(got, expected) <= 1e-5
    unclamped = fm.fused_experts(x, theirs.gate_up_proj, theirs.down_proj, weights, ids)
    assert max_diff(unclamped, expected) > 1e-2  # default: no clamp (other models)


@pytest.mark.skipif(not INTERPRET, reason="needs triton with TRITON_INTERPRET=1")
def test_triton_clamp_epilogue_matches_transformers():
    expected, theirs, x, ids, weights = clamped_experts()
    w13, w2 = theirs.gate_up_proj.detach(), theirs.down_proj.detach()
    got = fm.fused_experts_triton(x, w13, w2, weights, ids.int(), swiglu_limit=1.0)
    assert max_diff(got, expected) <= 1e-5


def test_shared_expert_matches_transformers():
    theirs = tf.DeepseekV4MLP(hf_config())
    randomize(theirs)
    ours = GatedMLP(64, 32, ModelContext.single().parallel.tp, replicated=True, swiglu_limit=1.0)
    with torch.no_grad():
        theirs.gate_proj.weight.mul_(4.0)
        x = torch.randn(T, 64)
        assert (theirs.gate_proj(x) > 1.0).float().mean() > 0.1  # the clamp fires
        ours.gate_up_proj.weight.copy_(torch.cat([theirs.gate_proj.weight, theirs.up_proj.weight]))
        ours.down_proj.weight.copy_(theirs.down_proj.weight)
        assert max_diff(ours(x), theirs(x)) <= 1e-6


@pytest.mark.parametrize("layer", [0, 2], ids=["hash_moe", "moe"])
def test_moe_block_matches_transformers(layer):
    config = hf_config()
    theirs = tf.DeepseekV4SparseMoeBlock(config, layer).eval()
    randomize(theirs)
    g = torch.Generator().manual_seed(4)
    ours = DeepseekV4MoE(
        normalize_config(config_from_dict(BASE)), layer, ModelContext.single(), True
    )
    with torch.no_grad():
        theirs.experts.gate_up_proj.mul_(4.0)
        if layer == 0:
            theirs.gate.tid2eid.copy_(distinct_ids(384, 8, 2, g))
            ours.gate.tid2eid.copy_(theirs.gate.tid2eid)
        else:
            theirs.gate.e_score_correction_bias.copy_(0.1 * torch.randn(8, generator=g))
            ours.gate.e_score_correction_bias.copy_(theirs.gate.e_score_correction_bias)
        ours.gate.weight.copy_(theirs.gate.weight)
        ours.experts.w13.copy_(theirs.experts.gate_up_proj)
        ours.experts.w2.copy_(theirs.experts.down_proj)
        shared = theirs.shared_experts
        ours.shared_experts.gate_up_proj.weight.copy_(
            torch.cat([shared.gate_proj.weight, shared.up_proj.weight])
        )
        ours.shared_experts.down_proj.weight.copy_(shared.down_proj.weight)
        x, input_ids = (
            torch.randn(1, T, 64, generator=g),
            torch.randint(0, 384, (1, T), generator=g),
        )
        expected = theirs(x, input_ids)[0]
        got = ours(x[0], input_ids[0], num_valid=T - 2)
    assert max_diff(got[: T - 2], expected[: T - 2]) <= 1e-5
    # padding rows route nowhere: only the shared expert
    assert max_diff(got[T - 2 :], ours.shared_experts(x[0, T - 2 :])) <= 1e-6


def saved_shapes(path) -> dict[str, tuple[int, ...]]:
    handle = safe_open(str(path / "model.safetensors"), framework="pt")
    return {name: tuple(handle.get_slice(name).get_shape()) for name in handle.keys()}  # noqa: SIM118


@pytest.mark.parametrize("case", CASES)
def test_checkpoint_shapes_and_loading(case, checkpoint):
    path = checkpoint(case)
    config = load_config(path)
    shapes = DeepseekV4ForCausalLM.checkpoint_shapes(config)
    assert shapes == saved_shapes(path)
    if case == "tiny":
        assert len(shapes) == 210
    model = parcap_model(config)
    load_checkpoint(model, path)  # raises on a missing or unexpected tensor
    handle = safe_open(str(path / "model.safetensors"), framework="pt")
    saved = handle.get_tensor("model.layers.0.ffn.gate.tid2eid")
    assert saved.dtype == torch.int64
    assert torch.equal(model.model.layers[0].ffn.gate.tid2eid, saved)
    layer = 2 if case == "tiny" else 1
    bias = handle.get_tensor(f"model.layers.{layer}.ffn.gate.bias")
    assert torch.equal(model.model.layers[layer].ffn.gate.e_score_correction_bias, bias)
    assert torch.equal(
        model.model.layers[1].attn_hc.fn, handle.get_tensor("model.layers.1.hc_attn_fn")
    )


def test_random_weights_draw_distinct_valid_expert_ids():
    tiny = config_from_dict(DeepseekV4ForCausalLM.tiny_config())
    tables = []
    for seed in (0, 0, 1):
        model = parcap_model(tiny)
        load_random(model, seed)
        tables.append(model.model.layers[1].ffn.gate.tid2eid.clone())
    table = tables[0]
    assert not torch.equal(table, model.model.layers[0].ffn.gate.tid2eid)  # per layer
    assert table.dtype == torch.int64 and table.shape == (384, 2)
    assert ((table >= 0) & (table < 8)).all() and (table[:, 0] != table[:, 1]).all()
    assert len({tuple(row) for row in table.tolist()}) > 20
    assert torch.equal(tables[0], tables[1]) and not torch.equal(tables[0], tables[2])


def test_hub_names_and_unused_tensors():
    assert ckpt.hub_to_saved("embed.weight", 4) == "model.embed_tokens.weight"
    assert ckpt.hub_to_saved("head.weight", 4) == "head.weight"
    assert ckpt.hub_to_saved("hc_head_fn", 4) == "model.hc_head.hc_fn"
    assert ckpt.hub_to_saved("norm.weight", 4) == "model.norm.weight"
    assert ckpt.hub_to_saved("layers.4.attn.wq_a.weight", 4) is None
    assert ckpt.hub_to_saved("mtp.0.e_proj.weight", 4) is None
    tiny = normalize_config(config_from_dict(DeepseekV4ForCausalLM.tiny_config()))
    saved = set(DeepseekV4ForCausalLM.checkpoint_shapes(tiny))
    hub = {n.removeprefix("model.").replace("embed_tokens", "embed") for n in saved}
    hub = {n.replace("hc_head.hc_", "hc_head_") for n in hub}
    assert {ckpt.hub_to_saved(n, 4) for n in hub} == saved
    assert ckpt.is_unused("mtp.0.norm.weight", tiny)
    assert ckpt.is_unused("model.layers.4.attn_norm.weight", tiny)
    assert not ckpt.is_unused("model.layers.3.attn_norm.weight", tiny)
