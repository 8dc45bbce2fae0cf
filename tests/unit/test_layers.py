import types

import attrs
import pytest
import torch
import torch.nn.functional as F
from transformers import DeepseekV3Config, LlamaConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from transformers.models.deepseek_v3 import modeling_deepseek_v3 as hf_deepseek
from transformers.models.llama import modeling_llama as hf_llama

from engine.attention.torch_backend import TorchAttentionBackend
from engine.model_api import ForwardMode, RankGroup
from engine.model_api.config import rope_parameters
from engine.model_api.weights import TensorSource
from engine.runtime.kv_cache import KVPool, ReqToTokenPool
from models.layers import embedding as embedding_module
from models.layers.activation import SiluAndMul
from models.layers.attention import Attention
from models.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from models.layers.linear import (
    ColumnParallelLinear,
    MergedColumnParallelLinear,
    QKVParallelLinear,
    ReplicatedLinear,
    RowParallelLinear,
)
from models.layers.norm import RMSNorm
from models.layers.rotary import RotaryEmbedding, rope_inv_freq, yarn_softmax_scale
from tests.support.batches import make_batch

HEAD_DIM = 16
MAX_POS = 256

ROPE_CASES = {
    "default": {"rope_type": "default", "rope_theta": 10000.0},
    "linear": {"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0},
    "dynamic": {"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0},
    "llama3": {
        "rope_type": "llama3",
        "rope_theta": 500000.0,
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 32,
    },
    "yarn": {
        "rope_type": "yarn",
        "rope_theta": 10000.0,
        "factor": 4.0,
        "original_max_position_embeddings": 64,
    },
    "yarn-mscale": {
        "rope_type": "yarn",
        "rope_theta": 10000.0,
        "factor": 40.0,
        "original_max_position_embeddings": 64,
        "mscale": 1.0,
        "mscale_all_dim": 0.707,
        "beta_fast": 16,
        "beta_slow": 2,
    },
    "yarn-no-truncate": {
        "rope_type": "yarn",
        "rope_theta": 10000.0,
        "factor": 4.0,
        "original_max_position_embeddings": 64,
        "truncate": False,
        "attention_factor": 1.5,
    },
}


def hf_llama_config(params: dict) -> LlamaConfig:
    return LlamaConfig(
        hidden_size=64,
        num_attention_heads=4,
        head_dim=HEAD_DIM,
        max_position_embeddings=MAX_POS,
        rope_parameters=dict(params),
    )


@pytest.mark.parametrize("case", ROPE_CASES)
def test_inv_freq_and_attention_factor_match_transformers(case):
    params = ROPE_CASES[case]
    config = hf_llama_config(params)
    if params["rope_type"] == "default":
        expected = hf_llama.LlamaRotaryEmbedding.compute_default_rope_parameters(config)
    else:
        expected = ROPE_INIT_FUNCTIONS[params["rope_type"]](config)
    inv_freq, factor = rope_inv_freq(config.rope_parameters, HEAD_DIM, MAX_POS)
    torch.testing.assert_close(inv_freq, expected[0], rtol=0, atol=0)
    assert factor == pytest.approx(expected[1], rel=1e-12)


def assert_rotary_matches(ours, hf_rope, hf_apply, positions, q, k):
    """`ours` on q/k [rows, heads, dim] against transformers' cos/sin and apply function."""
    cos, sin = hf_rope(q, positions[None])
    hf_q, hf_k = hf_apply(q.transpose(0, 1)[None], k.transpose(0, 1)[None], cos, sin)
    our_q, our_k = ours(positions, q, k)
    torch.testing.assert_close(our_q, hf_q[0].transpose(0, 1), rtol=0, atol=1e-6)
    torch.testing.assert_close(our_k, hf_k[0].transpose(0, 1), rtol=0, atol=1e-6)


@pytest.mark.parametrize("case", ROPE_CASES)
def test_rotary_matches_transformers_apply(case):
    config = hf_llama_config(ROPE_CASES[case])
    hf_rope = hf_llama.LlamaRotaryEmbedding(config)
    ours = RotaryEmbedding(HEAD_DIM, config.rope_parameters, MAX_POS)
    generator = torch.Generator().manual_seed(0)
    positions = torch.tensor([0, 1, 7, 31, 100, 255])
    q = torch.randn(len(positions), 4, HEAD_DIM, generator=generator)
    k = torch.randn(len(positions), 2, HEAD_DIM, generator=generator)
    assert_rotary_matches(ours, hf_rope, hf_llama.apply_rotary_pos_emb, positions, q, k)


def test_dynamic_rope_rescales_past_max_position():
    config = hf_llama_config(ROPE_CASES["dynamic"])
    hf_rope = hf_llama.LlamaRotaryEmbedding(config)
    ours = RotaryEmbedding(HEAD_DIM, config.rope_parameters, MAX_POS)
    positions = torch.arange(300, 320)
    x = torch.zeros(1)
    hf_cos, hf_sin = hf_rope(x, positions[None])
    cos, sin = ours.cos_sin(positions, torch.float32)
    torch.testing.assert_close(cos, hf_cos[0], rtol=0, atol=1e-6)
    torch.testing.assert_close(sin, hf_sin[0], rtol=0, atol=1e-6)
    default_cos, _ = RotaryEmbedding(HEAD_DIM, ROPE_CASES["default"], MAX_POS).cos_sin(
        positions, torch.float32
    )
    assert not torch.allclose(cos, default_cos)


def test_deepseek_interleaved_yarn_matches_transformers():
    params = dict(ROPE_CASES["yarn-mscale"])
    config = DeepseekV3Config(
        hidden_size=64,
        num_attention_heads=4,
        qk_rope_head_dim=8,
        qk_nope_head_dim=16,
        v_head_dim=16,
        kv_lora_rank=32,
        q_lora_rank=None,
        max_position_embeddings=MAX_POS,
        rope_parameters=params,
    )
    hf_rope = hf_deepseek.DeepseekV3RotaryEmbedding(config)
    ours = RotaryEmbedding(8, config.rope_parameters, MAX_POS, interleaved=True)
    assert ours.attention_factor == pytest.approx(hf_rope.attention_scaling)
    assert ours.attention_factor != 1.0
    generator = torch.Generator().manual_seed(1)
    positions = torch.tensor([0, 3, 64, 200])
    q = torch.randn(4, 4, 8, generator=generator)
    k = torch.randn(4, 1, 8, generator=generator)
    apply = hf_deepseek.apply_rotary_pos_emb_interleave
    assert_rotary_matches(ours, hf_rope, apply, positions, q, k)
    scale = 24**-0.5
    assert yarn_softmax_scale(config.rope_parameters, scale) == pytest.approx(
        hf_deepseek.yarn_apply_mscale(config.rope_parameters, scale)
    )
    assert yarn_softmax_scale(config.rope_parameters, scale) != scale


def test_partial_rotary_leaves_the_tail_alone():
    rope = RotaryEmbedding(
        16, {"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.5}, 64
    )
    q = torch.randn(3, 2, 16)
    out, _ = rope(torch.tensor([1, 2, 3]), q, q[:, :1])
    assert rope.rotary_dim == 8
    torch.testing.assert_close(out[..., 8:], q[..., 8:])
    assert not torch.allclose(out[..., :8], q[..., :8])


@pytest.mark.parametrize(
    "legacy",
    [
        {"rope_theta": 500000.0},
        {"rope_theta": 500000.0, "rope_scaling": {"type": "linear", "factor": 2.0}},
        {
            "rope_scaling": {
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
            }
        },
        {"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e6}},
    ],
)
def test_rope_parameters_standardized_like_transformers(legacy):
    values = {"hidden_size": 64, "num_attention_heads": 4, "max_position_embeddings": 128, **legacy}
    assert rope_parameters(types.SimpleNamespace(**values)) == LlamaConfig(**values).rope_parameters


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_matches_transformers_with_fused_residual(dtype):
    generator = torch.Generator().manual_seed(2)
    weight = 1 + 0.1 * torch.randn(32, generator=generator)
    x = torch.randn(5, 32, generator=generator).to(dtype)
    residual = torch.randn(5, 32, generator=generator).to(dtype)
    hf = hf_llama.LlamaRMSNorm(32, eps=1e-5).to(dtype)
    ours = RMSNorm(32, eps=1e-5).to(dtype)
    hf.weight.data.copy_(weight)
    ours.weight.data.copy_(weight)
    torch.testing.assert_close(ours(x), hf(x), rtol=0, atol=0)
    out, new_residual = ours(x, residual)
    torch.testing.assert_close(new_residual, x + residual, rtol=0, atol=0)
    torch.testing.assert_close(out, hf(x + residual), rtol=0, atol=0)


def fake_tp(rank: int, size: int) -> RankGroup:
    """Rank `rank` of a `size`-way group, without a process group (no collective is run)."""
    return RankGroup("tp", rank, size)


def per_rank(size: int, build, run):
    """`run(build(group))` for each rank's group."""
    return [run(build(fake_tp(rank, size))) for rank in range(size)]


def loaded(layer, **named):
    for name, tensor in named.items():
        param = getattr(layer, name)
        param.weight_loader(param, TensorSource(tensor))
    return layer


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_column_and_row_parallel_shards_recompose(tp):
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(3, 8, generator=generator)
    w, b = torch.randn(12, 8, generator=generator), torch.randn(12, generator=generator)
    full = F.linear(x, w, b)
    cols = per_rank(
        tp,
        lambda g: loaded(ColumnParallelLinear(8, 12, g, bias=True), weight=w, bias=b),
        lambda m: m(x),
    )
    torch.testing.assert_close(torch.cat(cols, -1), full)

    w2, b2 = torch.randn(5, 12, generator=generator), torch.randn(5, generator=generator)
    shards = full.chunk(tp, -1)
    rows = per_rank(
        tp,
        lambda g: loaded(
            RowParallelLinear(12, 5, g, bias=True, reduce_results=False), weight=w2, bias=b2
        ),
        lambda m: m(shards[m.tp_rank]),
    )
    torch.testing.assert_close(sum(rows), F.linear(full, w2, b2))


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_merged_gate_up_and_silu_mul_shards_recompose(tp):
    generator = torch.Generator().manual_seed(4)
    x = torch.randn(3, 8, generator=generator)
    gate, up = torch.randn(16, 8, generator=generator), torch.randn(16, 8, generator=generator)
    down = torch.randn(8, 16, generator=generator)

    def build(group):
        gate_up = MergedColumnParallelLinear(8, [16, 16], group)
        gate_up.weight.weight_loader(gate_up.weight, TensorSource(gate), 0)
        gate_up.weight.weight_loader(gate_up.weight, TensorSource(up), 1)
        return gate_up, loaded(RowParallelLinear(16, 8, group, reduce_results=False), weight=down)

    parts = per_rank(tp, build, lambda m: m[1](SiluAndMul()(m[0](x))))
    expected = F.linear(F.silu(F.linear(x, gate)) * F.linear(x, up), down)
    torch.testing.assert_close(sum(parts), expected)


@pytest.mark.parametrize(("heads", "kv_heads", "tp"), [(8, 4, 2), (8, 2, 4), (4, 1, 2), (8, 8, 1)])
def test_qkv_shards_heads_and_replicates_scarce_kv_heads(heads, kv_heads, tp):
    dim, hidden = 4, 16
    generator = torch.Generator().manual_seed(5)
    x = torch.randn(2, hidden, generator=generator)
    wq = torch.randn(heads * dim, hidden, generator=generator)
    wk = torch.randn(kv_heads * dim, hidden, generator=generator)
    wv = torch.randn(kv_heads * dim, hidden, generator=generator)
    q_full = F.linear(x, wq).view(2, heads, dim)
    k_full = F.linear(x, wk).view(2, kv_heads, dim)
    v_full = F.linear(x, wv).view(2, kv_heads, dim)

    def build(group):
        qkv = QKVParallelLinear(hidden, dim, heads, kv_heads, group)
        for shard, w in zip("qkv", (wq, wk, wv)):
            qkv.weight.weight_loader(qkv.weight, TensorSource(w), shard)
        return qkv

    outs = per_rank(tp, build, lambda m: (m.num_heads, m.num_kv_heads, m.split(m(x))))
    for rank, (local_heads, local_kv, (q, k, v)) in enumerate(outs):
        assert local_heads == heads // tp and local_kv == max(1, kv_heads // tp)
        torch.testing.assert_close(q.view(2, local_heads, dim), q_full.chunk(tp, 1)[rank])
        # Query head h uses KV head h // (heads // kv_heads); this rank's queries need these.
        first_kv = rank * local_heads // (heads // kv_heads)
        torch.testing.assert_close(
            k.view(2, local_kv, dim), k_full[:, first_kv : first_kv + local_kv]
        )
        torch.testing.assert_close(
            v.view(2, local_kv, dim), v_full[:, first_kv : first_kv + local_kv]
        )


def test_indivisible_heads_are_refused():
    with pytest.raises(ValueError, match="num_attention_heads"):
        QKVParallelLinear(16, 4, 6, 2, fake_tp(0, 4))
    with pytest.raises(ValueError, match="num_key_value_heads"):
        QKVParallelLinear(16, 4, 12, 3, fake_tp(0, 4))


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_vocab_parallel_embedding_and_lm_head_pad_and_recompose(tp, monkeypatch):
    monkeypatch.setattr(embedding_module, "all_reduce", lambda x, group: x)
    monkeypatch.setattr(embedding_module, "all_gather_last_dim", lambda x, group: x)
    vocab, hidden = 10, 6
    generator = torch.Generator().manual_seed(6)
    table = torch.randn(vocab, hidden, generator=generator)
    ids = torch.tensor([0, 3, 9, 5, 9, 2])
    h = torch.randn(4, hidden, generator=generator)

    partial = per_rank(
        tp,
        lambda g: loaded(VocabParallelEmbedding(vocab, hidden, g), weight=table),
        lambda m: m(ids),
    )
    torch.testing.assert_close(sum(partial), table[ids])
    heads = per_rank(
        tp,
        lambda g: loaded(ParallelLMHead(vocab, hidden, g), weight=table),
        lambda m: (m.padded_size, m(h)),
    )
    assert all(padded == -(-vocab // tp) * tp for padded, _ in heads)
    logits = torch.cat([out for _, out in heads], -1)[:, :vocab]
    torch.testing.assert_close(logits, h @ table.T)


def test_replicated_linear_loads_whole_tensor():
    w = torch.randn(3, 4)
    layer = loaded(ReplicatedLinear(4, 3), weight=w)
    torch.testing.assert_close(layer.weight, w)


def attention_batch(kv_pool, table, backend, extend_lens, seq_lens, slots, pad):
    return make_batch(
        ForwardMode.EXTEND,
        len(slots),
        rows=len(slots) + pad,
        slots=slots,
        req_rows=range(len(extend_lens)),
        seq_lens=seq_lens,
        extend_lens=extend_lens,
        kv_pool=kv_pool,
        req_to_token=table.table,
        backend=backend,
    )


def test_torch_backend_extends_cached_prefixes_and_zeroes_padding():
    heads, kv_heads, dim, scale = 4, 2, 8, 0.3
    attn = Attention(heads, dim, kv_heads, scale, layer_id=0)
    kv_pool = KVPool(32, [attn.kv_cache_shapes()], torch.float32, torch.device("cpu"))
    table = ReqToTokenPool(2, 16, torch.device("cpu"))
    backend = TorchAttentionBackend()
    generator = torch.Generator().manual_seed(7)
    lengths = [6, 3]
    qs = [torch.randn(n, heads, dim, generator=generator) for n in lengths]
    ks = [torch.randn(n, kv_heads, dim, generator=generator) for n in lengths]
    vs = [torch.randn(n, kv_heads, dim, generator=generator) for n in lengths]
    slots = [kv_pool.alloc(n) for n in lengths]
    for row, s in enumerate(slots):
        table.write(row, 0, s)

    # Two steps: tokens [0, 4) and [0, 2), then [4, 6) and [2, 3) over the cached prefixes.
    pieces = [[], []]
    for bounds, pad in (([(0, 4), (0, 2)], 2), ([(4, 6), (2, 3)], 1)):
        extend_lens = [b - a for a, b in bounds]
        step_slots = [slot for s, (a, b) in zip(slots, bounds) for slot in s[a:b]]
        batch = attention_batch(
            kv_pool, table, backend, extend_lens, [b for _, b in bounds], step_slots, pad
        )
        q, k, v = (
            torch.cat(
                [*(x[a:b] for x, (a, b) in zip(xs, bounds)), torch.randn(pad, *xs[0].shape[1:])]
            )
            for xs in (qs, ks, vs)
        )
        backend.plan(batch)
        out = attn(q, k, v, batch)
        assert out.shape == (sum(extend_lens) + pad, heads * dim)
        assert not out[sum(extend_lens) :].any()
        for i, piece in enumerate(out[: sum(extend_lens)].view(-1, heads, dim).split(extend_lens)):
            pieces[i].append(piece)

    for i in range(2):
        expected = F.scaled_dot_product_attention(
            qs[i].transpose(0, 1),
            ks[i].transpose(0, 1),
            vs[i].transpose(0, 1),
            is_causal=True,
            scale=scale,
            enable_gqa=True,
        ).transpose(0, 1)
        torch.testing.assert_close(torch.cat(pieces[i]), expected)


def test_torch_backend_refuses_an_unprepared_batch():
    attn = Attention(2, 4, 2, 1.0, layer_id=0)
    kv_pool = KVPool(4, [attn.kv_cache_shapes()], torch.float32, torch.device("cpu"))
    table = ReqToTokenPool(1, 4, torch.device("cpu"))
    backend = TorchAttentionBackend()
    prepared = attention_batch(kv_pool, table, backend, [1], [1], [1], 0)
    backend.plan(prepared)
    x = torch.zeros(1, 2, 4)
    attn(x, x, x, prepared)
    with pytest.raises(RuntimeError, match="plan"):
        attn(x, x, x, attrs.evolve(prepared))
