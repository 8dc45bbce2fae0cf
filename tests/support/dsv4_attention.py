"""DeepSeek-V4 attention test material: tiny configs, a stand-in for the config normaliser,
transformers' attention driven through its own cache, and parcap's over the paged pool.

Both sides get the same per-request hidden rows; a request is fed in prefill chunks, then
one row per decode step. parcap runs all requests in shared, padded batches.
"""

from __future__ import annotations

import types
from pathlib import Path
from typing import Any

import torch

from engine.model_api import ForwardMode, ModelContext, load_params
from engine.model_api.weights import TensorSource
from engine.runtime.kv_cache import KVPool, ReqToTokenPool
from models.deepseek_v4 import DeepseekV4ForCausalLM
from models.layers.dsv4_attention import DeepseekV4Attention
from tests.support.batches import make_batch

SLIDING, CSA, HCA = (
    "sliding_attention",
    "compressed_sparse_attention",
    "heavily_compressed_attention",
)
# brief §5: every layer type, yarn compress rope, W=8, CSA m=4 with top-3, HCA m=8
TINY = {
    k: v
    for k, v in DeepseekV4ForCausalLM.tiny_config().items()
    if k not in ("torch_dtype", "dtype", "hidden_act")
}
# other sizes: default compress rope, W=4, CSA m=8 with top-2, HCA m=4, half the rope dim
OTHER = {
    **{k: v for k, v in TINY.items() if k != "rope_parameters"},
    "num_hidden_layers": 3,
    "layer_types": [HCA, CSA, SLIDING],
    "mlp_layer_types": ["hash_moe", "moe", "moe"],
    "compress_rates": {CSA: 8, HCA: 4},
    "sliding_window": 4,
    "num_attention_heads": 4,
    "head_dim": 16,
    "partial_rotary_factor": 0.5,
    "q_lora_rank": 24,
    "o_groups": 2,
    "o_lora_rank": 8,
    "index_n_heads": 6,
    "index_head_dim": 8,
    "index_topk": 2,
    "rms_norm_eps": 1e-5,
    "compress_rope_theta": 40000.0,
}
CONFIGS = {"tiny": TINY, "other": OTHER}
ROPE_TABLES = ("main", "compress")
NORMALIZED_KEYS = (
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "head_dim",
    "qk_rope_head_dim",
    "q_lora_rank",
    "o_groups",
    "o_lora_rank",
    "sliding_window",
    "index_n_heads",
    "index_head_dim",
    "index_topk",
    "rms_norm_eps",
    "max_position_embeddings",
)


def normalized(hf_config: Any) -> types.SimpleNamespace:
    """What `models.deepseek_v4_config.normalize_config` guarantees, read off a transformers
    `DeepseekV4Config` (a stand-in until that module exists)."""
    values = {key: getattr(hf_config, key) for key in NORMALIZED_KEYS}
    return types.SimpleNamespace(
        **values,
        layer_types=list(hf_config.layer_types),
        compress_rates=dict(hf_config.compress_rates),
        rope_main=dict(hf_config.rope_parameters["main"]),
        rope_compress=dict(hf_config.rope_parameters["compress"]),
    )


def layer_tensors(checkpoint: Path, layer_id: int) -> dict[str, torch.Tensor]:
    """The saved tensors below ``model.layers.{layer_id}.attn.``, named relative to it."""
    from safetensors.torch import load_file

    prefix = f"model.layers.{layer_id}.attn."
    tensors = load_file(checkpoint / "model.safetensors")
    return {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}


def parcap_attention(
    checkpoint: Path, config: types.SimpleNamespace, layer_id: int, ctx: ModelContext | None = None
) -> DeepseekV4Attention:
    """parcap's attention of `layer_id`, loaded by name from the transformers checkpoint
    (this rank's shard when `ctx` is a multi-rank context)."""
    attn = DeepseekV4Attention(config, layer_id, ctx or ModelContext.single()).eval()
    tensors = layer_tensors(checkpoint, layer_id)
    loaded = load_params(attn, [(k, TensorSource(v)) for k, v in tensors.items()])
    assert loaded == {name for name, _ in attn.named_parameters()}
    return attn


def feeds(length: int, prompt: int, chunk: int | None) -> list[int]:
    """Rows fed per step: the prompt in chunks (whole when `chunk` is None), then 1 each."""
    step = chunk or prompt
    return [min(step, prompt - s) for s in range(0, prompt, step)] + [1] * (length - prompt)


@torch.no_grad()
def reference_outputs(model: Any, layer_id: int, hidden: torch.Tensor, steps: list[int]):
    """transformers' attention of `layer_id` over one request, step by step through its own
    cache, called as `DeepseekV4DecoderLayer` calls it. Returns the output rows [T, D] and
    every (query position, visible entries, index scores) the indexer saw."""
    from transformers import DynamicCache
    from transformers.masking_utils import create_sliding_window_causal_mask

    config, attn = model.config, model.model.layers[layer_id].self_attn
    cache = DynamicCache(config=config)
    scored: list[tuple[torch.Tensor, torch.Tensor]] = []
    hook = None
    if attn.compressor is not None and hasattr(attn.compressor, "indexer"):
        hook = attn.compressor.indexer.scorer.register_forward_hook(
            lambda _m, _a, out: scored.append(out[0].clone())
        )
    outs, start = [], 0
    for n in steps:
        x = hidden[None, start : start + n]
        position_ids = torch.arange(start, start + n)[None]
        mask = create_sliding_window_causal_mask(
            config=config,
            inputs_embeds=x,
            attention_mask=None,
            past_key_values=cache,
            position_ids=position_ids,
            layer_idx=layer_id,
        )
        rope = {t: model.model.rotary_emb(x, position_ids, layer_type=t) for t in ROPE_TABLES}
        out, _ = attn(
            x,
            position_embeddings=rope,
            position_ids=position_ids,
            attention_mask=mask,
            past_key_values=cache,
        )
        outs.append(out[0])
        start += n
    if hook is not None:
        hook.remove()
    return torch.cat(outs), scored


def index_score_gap(scored: list[torch.Tensor], rate: int, topk: int, start_positions: list[int]):
    """The smallest gap between the k-th and (k+1)-th visible index score over the queries
    where the top-k binds (None when it never binds), and how many queries it bound on.

    Exact ties count (two 0.0 scores, every head's ReLU zero, are common with few index
    heads): torch.topk breaks them differently for score vectors of different lengths, so
    transformers itself picks differently under another chunking."""
    gaps = []
    for scores, first in zip(scored, start_positions):
        for row, t in enumerate(range(first, first + scores.shape[0])):
            visible = scores[row, : (t + 1) // rate]
            if visible.numel() > topk:
                top = visible.topk(topk + 1).values
                gaps.append(float(top[topk - 1] - top[topk]))
    return (min(gaps) if gaps else None), len(gaps)


@torch.no_grad()
def parcap_outputs(
    attn: DeepseekV4Attention, hiddens: list[torch.Tensor], plans: list[list[int]], pad_to: int
) -> list[torch.Tensor]:
    """Run every request together: step s feeds request i its s-th chunk (requests whose
    plan is over drop out), padded to a multiple of `pad_to` rows. Returns each request's
    output rows, and checks that padding rows come out as zeros."""
    n, dim = len(hiddens), hiddens[0].shape[-1]
    max_context = max(h.shape[0] for h in hiddens)
    shapes = [[]] * attn.layer_id + [attn.kv_cache_shapes()]  # only this layer has buffers
    pool = KVPool(n * max_context, shapes, torch.float32, "cpu")
    req_pool = ReqToTokenPool(n, max_context, "cpu")
    req_rows = [req_pool.alloc() for _ in hiddens]
    done = [0] * n
    outs: list[list[torch.Tensor]] = [[] for _ in hiddens]
    for step in range(max(map(len, plans))):
        active = [i for i in range(n) if step < len(plans[i])]
        rows, positions, slots, seq_lens, news = [], [], [], [], []
        for i in active:
            new = plans[i][step]
            got = pool.alloc(new)
            req_pool.write(req_rows[i], done[i], got)
            rows.append(hiddens[i][done[i] : done[i] + new])
            positions += range(done[i], done[i] + new)
            slots += got
            seq_lens.append(done[i] + new)
            news.append(new)
            done[i] += new
        num = len(positions)
        padded = num + -num % pad_to
        hidden = torch.cat(rows + [torch.randn(padded - num, dim)])
        decode = all(x == 1 for x in news) and step > 0
        batch = make_batch(
            ForwardMode.DECODE if decode else ForwardMode.EXTEND,
            num,
            rows=padded,
            positions=positions,
            slots=slots,
            req_rows=[req_rows[i] for i in active],
            seq_lens=seq_lens,
            extend_lens=news,
            kv_pool=pool,
            req_to_token=req_pool.table,
        )
        out = attn(batch.positions, hidden, batch)
        assert out.shape == (padded, dim)
        assert torch.count_nonzero(out[num:]) == 0, "padding rows must come out as zeros"
        start = 0
        for i, new in zip(active, news):
            outs[i].append(out[start : start + new])
            start += new
    return [torch.cat(o) for o in outs]
