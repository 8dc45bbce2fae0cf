"""DeepSeek-V4 attention against transformers 5.23, fp32 on CPU: the V4 RoPE, checkpoint
names and shapes, the KV layout, and per layer type (sliding, CSA, HCA) the outputs of
prefill (whole or chunked) and decode over the paged pool, several requests per padded step.
"""

from __future__ import annotations

import itertools
import types

import pytest
import torch

from engine.model_api import ForwardMode, ModelContext, ParallelState, RankGroup
from engine.runtime.kv_cache import KVPool
from models.layers.dsv4_attention import DeepseekV4Attention, attention_shapes
from models.layers.dsv4_rotary import DeepseekV4Rotary, apply_dsv4_rotary
from tests.support.batches import make_batch
from tests.support.checkpoints import load_reference, save_tiny_checkpoint
from tests.support.dsv4_attention import (
    CONFIGS,
    CSA,
    HCA,
    SLIDING,
    feeds,
    index_score_gap,
    layer_tensors,
    normalized,
    parcap_attention,
    parcap_outputs,
    reference_outputs,
)

PROMPTS = [30, 5, 11]  # the first evicts, closes HCA entries and makes the CSA top-k bind
DECODE_STEPS = 3
TOL = 1e-5
NEAR_TIE = 1e-5


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny ops: a second OpenMP thread only spins, and on a loaded 2-core machine that
    makes this file ~20x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def case(request, tmp_path_factory):
    """(name, checkpoint dir, transformers model, normalised config) of one config."""
    name = request.param
    path = save_tiny_checkpoint(tmp_path_factory.mktemp(name), CONFIGS[name], seed=3)
    model = load_reference(path)
    return name, path, model, normalized(model.config)


def layer_of(config, layer_type: str) -> int:
    return config.layer_types.index(layer_type)


def hiddens(dim: int, seed: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(p + DECODE_STEPS, dim, generator=generator) for p in PROMPTS]


@pytest.mark.parametrize("table", ["main", "compress"])
def test_rope_matches_transformers_forward_and_inverse(case, table):
    from transformers.models.deepseek_v4.modeling_deepseek_v4 import apply_rotary_pos_emb

    _, _, model, config = case
    params = config.rope_main if table == "main" else config.rope_compress
    rotary = DeepseekV4Rotary(params, config.qk_rope_head_dim, config.max_position_embeddings)
    positions = torch.tensor([0, 1, 7, 8, 31, 33, 100, 127])
    x = torch.randn(len(positions), 3, config.head_dim)
    cos, sin = rotary.cos_sin(positions, torch.float32)
    ref_cos, ref_sin = model.model.rotary_emb(x, positions[None], layer_type=table)
    assert torch.equal(cos, ref_cos[0]) and torch.equal(sin, ref_sin[0])
    for inverse in (False, True):
        ours = apply_dsv4_rotary(x, cos, sin, inverse=inverse)
        # transformers rotates [batch, heads, seq, dim]; its inverse is called with -sin
        ref_sin_used = -ref_sin if inverse else ref_sin
        theirs = apply_rotary_pos_emb(x.transpose(0, 1)[None], ref_cos, ref_sin_used)
        assert (ours - theirs[0].transpose(0, 1)).abs().max() <= 1e-6
    # only the trailing rotary_dim channels move, and the inverse undoes the rotation
    rope = config.qk_rope_head_dim
    assert torch.equal(apply_dsv4_rotary(x, cos, sin)[..., :-rope], x[..., :-rope])
    back = apply_dsv4_rotary(apply_dsv4_rotary(x, cos, sin), cos, sin, inverse=True)
    assert (back - x).abs().max() <= 1e-5


def test_attention_shapes_are_the_saved_checkpoint_names_of_each_layer_type(case):
    from safetensors import safe_open

    _, path, _, config = case
    with safe_open(path / "model.safetensors", "pt") as f:
        saved = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118 (safe_open is no dict)
    for layer_id in range(config.num_hidden_layers):
        prefix = f"model.layers.{layer_id}.attn."
        expected = {k[len(prefix) :]: v for k, v in saved.items() if k.startswith(prefix)}
        assert attention_shapes(config, layer_id) == expected
        attn = DeepseekV4Attention(config, layer_id, ModelContext.single())
        assert {n: tuple(p.shape) for n, p in attn.named_parameters()} == expected


def test_the_model_normaliser_gives_what_the_stand_in_reads(case):
    """The attention reads only the attributes the stand-in sets; the model's normaliser of
    the saved config.json must agree on each of them."""
    from engine.model_api.config import load_config

    normalizer = pytest.importorskip("models.deepseek_v4_config")
    _, path, _, config = case
    model_side = normalizer.normalize_config(load_config(path))
    for key, value in vars(config).items():
        assert getattr(model_side, key) == value, key


def test_kv_cache_shapes_one_slot_per_token_with_float32_state(case):
    _, _, _, c = case
    d, d_i, f32 = c.head_dim, c.index_head_dim, torch.float32
    expected = {
        SLIDING: [(1, d)],
        HCA: [(1, d), ((1, 2 * d), f32), (1, d)],
        CSA: [(1, d), ((1, 4 * d), f32), (1, d), ((1, 4 * d_i), f32), (1, d_i)],
    }
    for layer_id, layer_type in enumerate(c.layer_types):
        shapes = DeepseekV4Attention(c, layer_id, ModelContext.single()).kv_cache_shapes()
        assert shapes == expected[layer_type]


def window_closed_later(plan: list[int], rate: int) -> bool:
    """Some window of `rate` tokens is opened by one step and closed by a later one."""
    step_of = list(itertools.chain.from_iterable([s] * n for s, n in enumerate(plan)))
    closes = range(rate - 1, len(step_of), rate)
    return any(step_of[t] != step_of[t - rate + 1] for t in closes)


@pytest.mark.parametrize("chunk", [None, 3, 4])
@pytest.mark.parametrize("layer_type", [SLIDING, HCA, CSA])
def test_prefill_and_decode_match_transformers(case, layer_type, chunk):
    name, path, model, config = case
    layer_id = layer_of(config, layer_type)
    attn = parcap_attention(path, config, layer_id)
    rows = hiddens(config.hidden_size, seed=11)
    plans = [feeds(h.shape[0], p, chunk) for h, p in zip(rows, PROMPTS)]
    ours = parcap_outputs(attn, rows, plans, pad_to=4)

    assert rows[0].shape[0] > config.sliding_window  # the window evicts
    for i, (h, plan) in enumerate(zip(rows, plans)):
        theirs, scored = reference_outputs(model, layer_id, h, plan)
        if layer_type == CSA:
            rate = config.compress_rates[CSA]
            starts = list(itertools.accumulate([0, *plan[:-1]]))
            gap, bound = index_score_gap(scored, rate, config.index_topk, starts)
            assert i != 0 or bound > 0, "the CSA top-k never binds on the long prompt"
            assert gap is None or gap >= NEAR_TIE, (
                f"near-tie, not a mismatch: request {i}'s reference index scores have a "
                f"k-th/(k+1)-th gap of {gap:.2e} < {NEAR_TIE:g}; pick other inputs"
            )
        diff = (ours[i] - theirs).abs().max().item()
        assert diff <= TOL, f"{name} {layer_type} chunk={chunk} request {i}: max diff {diff:.2e}"
    if layer_type != SLIDING:
        rate = config.compress_rates[layer_type]
        assert len(rows[0]) // rate >= 2  # entries close
        assert any(window_closed_later(plan, rate) for plan in plans)


def test_outputs_do_not_depend_on_neighbours_or_padding(case):
    _, path, _, config = case
    attn = parcap_attention(path, config, layer_of(config, CSA))
    rows = hiddens(config.hidden_size, seed=5)
    plans = [feeds(h.shape[0], p, 4) for h, p in zip(rows, PROMPTS)]
    together = parcap_outputs(attn, rows, plans, pad_to=8)
    alone = parcap_outputs(attn, rows[1:2], plans[1:2], pad_to=1)
    assert (together[1] - alone[0]).abs().max() <= 1e-6


@pytest.mark.parametrize("layer_type", [SLIDING, HCA, CSA])
def test_idle_step_returns_zeros(case, layer_type):
    _, _, _, config = case
    attn = DeepseekV4Attention(config, layer_of(config, layer_type), ModelContext.single())
    for param in attn.parameters():
        param.data.normal_()  # torch.empty may hold NaNs, and 0 * NaN is not 0
    pool = KVPool(4, [[]] * attn.layer_id + [attn.kv_cache_shapes()], torch.float32, "cpu")
    for rows in (0, 4):
        batch = make_batch(ForwardMode.IDLE, 0, rows=rows, kv_pool=pool)
        out = attn(batch.positions, torch.randn(rows, config.hidden_size), batch)
        assert out.shape == (rows, config.hidden_size) and torch.count_nonzero(out) == 0


def tp_context(rank: int, size: int) -> ModelContext:
    group = RankGroup("attn_tp", rank, size)
    return ModelContext(ParallelState(rank, RankGroup("tp", rank, size), group, 0, 1, "cpu"))


def test_heads_and_groups_must_divide_by_attention_tp(case):
    _, _, _, config = case
    with pytest.raises(ValueError, match="divisible by the attention-TP size"):
        DeepseekV4Attention(config, 0, tp_context(0, 3))


def test_an_index_head_narrower_than_the_rope_is_refused(case):
    _, _, _, config = case
    narrow = types.SimpleNamespace(**vars(config))
    narrow.index_head_dim = config.qk_rope_head_dim - 2
    with pytest.raises(ValueError, match="index_head_dim"):
        DeepseekV4Attention(narrow, layer_of(config, CSA), ModelContext.single())


def test_head_sharded_ranks_sum_to_the_single_rank_output(case):
    """Each attention-TP rank of 2 holds half the heads (and sinks) and half the `wo_a`
    groups; the sum of their `wo_b` partial outputs (what the all-reduce adds) is tp1's."""
    _, path, _, config = case
    layer_id = layer_of(config, CSA)
    single = parcap_attention(path, config, layer_id)
    tensors = layer_tensors(path, layer_id)
    rows = hiddens(config.hidden_size, seed=2)
    plans = [feeds(h.shape[0], p, 3) for h, p in zip(rows, PROMPTS)]
    total = None
    for rank in range(2):
        attn = parcap_attention(path, config, layer_id, tp_context(rank, 2))
        heads = config.num_attention_heads // 2
        assert torch.equal(attn.attn_sink, tensors["attn_sink"][rank * heads : (rank + 1) * heads])
        attn.wo_b.reduce_results = False  # no process group here: add the partials by hand
        outs = parcap_outputs(attn, rows, plans, pad_to=4)
        total = outs if total is None else [a + b for a, b in zip(total, outs)]
    for got, want in zip(total, parcap_outputs(single, rows, plans, pad_to=4)):
        assert (got - want).abs().max() <= 1e-5
