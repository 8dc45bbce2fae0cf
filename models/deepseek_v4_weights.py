"""DeepSeek-V4's checkpoint: the tensors transformers 5.23 saves (parcap's canonical
names), their parcap parameters, DeepSeek's released (hub) names, and `tid2eid`.

transformers saves hybrid names (`conversion_mapping["deepseek_v4"]` reversed):
``head.weight`` beside ``model.embed_tokens.weight``, ``model.hc_head.hc_{fn,base,scale}``,
and per layer ``attn.*``, ``attn_norm``, ``ffn_norm``, ``hc_{attn,ffn}_{fn,base,scale}``,
``ffn.gate.{weight,bias,tid2eid}``, ``ffn.experts.{e}.w{1,2,3}``, ``ffn.shared_experts.w*``.
The hub checkpoints carry the same layer names without the ``model.`` prefix.
"""

from __future__ import annotations

import re
import types
import zlib

import torch
from torch import nn

from engine.model_api.config import tie_word_embeddings
from engine.model_api.weights import CheckpointError, WeightSource
from models.deepseek_v4_config import normalize_config
from models.layers.dsv4_attention import attention_shapes

_LAYER = re.compile(r"^(?:model\.)?layers\.(\d+)\.")
# saved name -> parcap parameter name (the rest are equal)
_TO_PARAM = [
    (re.compile(r"^head\.weight$"), "lm_head.weight"),
    (re.compile(r"\.hc_(attn|ffn)_(fn|base|scale)$"), r".\1_hc.\2"),
    (re.compile(r"\.ffn\.gate\.bias$"), ".ffn.gate.e_score_correction_bias"),
    (re.compile(r"\.experts\.(\d+)\.w1\."), r".experts.\1.gate_proj."),
    (re.compile(r"\.experts\.(\d+)\.w3\."), r".experts.\1.up_proj."),
    (re.compile(r"\.experts\.(\d+)\.w2\."), r".experts.\1.down_proj."),
    (re.compile(r"\.shared_experts\.w1\."), ".shared_experts.gate_proj."),
    (re.compile(r"\.shared_experts\.w3\."), ".shared_experts.up_proj."),
    (re.compile(r"\.shared_experts\.w2\."), ".shared_experts.down_proj."),
]
# hub name -> saved name, for the names outside ``layers.{i}.``
_HUB_TOP = {
    "embed.weight": "model.embed_tokens.weight",
    "head.weight": "head.weight",
    "norm.weight": "model.norm.weight",
    "hc_head_fn": "model.hc_head.hc_fn",
    "hc_head_base": "model.hc_head.hc_base",
    "hc_head_scale": "model.hc_head.hc_scale",
}


def checkpoint_shapes(config: types.SimpleNamespace) -> dict[str, tuple[int, ...]]:
    """Every tensor of a transformers-saved DeepseekV4ForCausalLM checkpoint, full shapes
    (``ffn.gate.tid2eid`` is int64, the rest float)."""
    c = normalize_config(config)
    hidden, n, vocab = c.hidden_size, c.hc_mult, c.vocab_size
    experts, inter = c.n_routed_experts, c.moe_intermediate_size
    mixes = (2 + n) * n
    shapes = {"model.embed_tokens.weight": (vocab, hidden)}
    if not tie_word_embeddings(c):
        shapes["head.weight"] = (vocab, hidden)
    shapes |= {
        "model.norm.weight": (hidden,),
        "model.hc_head.hc_fn": (n, n * hidden),
        "model.hc_head.hc_base": (n,),
        "model.hc_head.hc_scale": (1,),
    }
    for i in range(c.num_hidden_layers):
        p = f"model.layers.{i}."
        shapes |= {p + "attn." + name: shape for name, shape in attention_shapes(c, i).items()}
        shapes[p + "attn_norm.weight"] = (hidden,)
        shapes[p + "ffn_norm.weight"] = (hidden,)
        for block in ("attn", "ffn"):
            shapes[f"{p}hc_{block}_fn"] = (mixes, n * hidden)
            shapes[f"{p}hc_{block}_base"] = (mixes,)
            shapes[f"{p}hc_{block}_scale"] = (3,)
        shapes[p + "ffn.gate.weight"] = (experts, hidden)
        if c.mlp_layer_types[i] == "hash_moe":
            shapes[p + "ffn.gate.tid2eid"] = (vocab, c.num_experts_per_tok)
        else:
            shapes[p + "ffn.gate.bias"] = (experts,)
        # transformers builds one shared expert of width I whatever n_shared_experts says
        for prefix in [f"ffn.experts.{e}." for e in range(experts)] + ["ffn.shared_experts."]:
            shapes[p + prefix + "w1.weight"] = (inter, hidden)
            shapes[p + prefix + "w3.weight"] = (inter, hidden)
            shapes[p + prefix + "w2.weight"] = (hidden, inter)
    return shapes


def param_name(saved: str) -> str:
    """The parcap parameter (or per-expert name `load_with_experts` routes) that a saved
    tensor loads into."""
    for pattern, replacement in _TO_PARAM:
        saved = pattern.sub(replacement, saved)
    return saved


def hub_to_saved(name: str, num_hidden_layers: int) -> str | None:
    """A tensor name of DeepSeek's released checkpoints as transformers saves it; None for
    what the model does not use (``mtp.*``, layers >= `num_hidden_layers`). FP8/FP4 scale
    tensors are refused: parcap has no dequantising loader."""
    if name.endswith(".scale") or name.endswith(".weight_scale_inv"):
        raise CheckpointError(f"{name}: quantised DeepSeek-V4 checkpoints are not supported")
    if name.startswith("mtp."):
        return None
    if name in _HUB_TOP:
        return _HUB_TOP[name]
    layer = _LAYER.match(name)
    if layer is None:
        raise CheckpointError(f"{name}: not a DeepSeek-V4 checkpoint tensor")
    if int(layer.group(1)) >= num_hidden_layers:
        return None
    return name if name.startswith("model.") else "model." + name


def is_unused(name: str, config: types.SimpleNamespace) -> bool:
    """Saved tensors the model skips: multi-token-prediction weights (``mtp.*``, or layers
    past the last decoder layer) and an LM head tied to the embedding."""
    if name.startswith("mtp."):
        return True
    layer = _LAYER.match(name)
    if layer is not None:
        return int(layer.group(1)) >= config.num_hidden_layers
    return name == "head.weight" and tie_word_embeddings(config)


def tid2eid_param(vocab_size: int, top_k: int, num_experts: int) -> nn.Parameter:
    """The hash layers' frozen token -> experts table, int64 whatever the model dtype."""
    table = torch.zeros(vocab_size, top_k, dtype=torch.int64)
    param = nn.Parameter(table, requires_grad=False)

    def load(param: nn.Parameter, source: WeightSource) -> None:
        param.data.copy_(tid2eid_values(source, num_experts).to(param.device))

    param.weight_loader = load
    return param


def tid2eid_values(source: WeightSource, num_experts: int) -> torch.Tensor:
    """A checkpoint's integer table as is (checked to hold expert ids); a float source is
    parcap's seeded random weights (`--model`), which cannot hold ids, so a table of
    distinct valid ids per row is drawn, seeded by that source's values (so by its seed and
    name), the same on every rank."""
    values = source.full()
    vocab, top_k = values.shape
    if not values.is_floating_point():
        if values.numel() and (int(values.min()) < 0 or int(values.max()) >= num_experts):
            raise CheckpointError(f"tid2eid: expert ids outside [0, {num_experts})")
        return values.long()
    if top_k > num_experts:
        raise CheckpointError(f"tid2eid: {top_k} distinct experts per token of {num_experts}")
    seed = zlib.crc32(values.float().cpu().contiguous().numpy().tobytes())
    generator = torch.Generator().manual_seed(seed)
    draws = torch.rand(vocab, num_experts, generator=generator)
    return draws.argsort(dim=1)[:, :top_k].contiguous()
