"""What the causal LMs share around their decoder stacks: the LM head on top of `model`,
the checkpoint names of ``model.embed_tokens``, ``model.layers.{i}``, ``model.norm`` and
``lm_head``, and what their embedded tiny configs have in common."""

from __future__ import annotations

import types
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from engine.model_api import Divides, ForwardBatch, ModelBase, ModelContext, MoeSettings
from engine.model_api.config import num_kv_heads, tie_word_embeddings
from models.layers.embedding import ParallelLMHead
from models.layers.logits import LogitsProcessor

# Every embedded tiny config speaks the front end's byte tokenizer (ids 0-255 are bytes,
# then BOS and EOS, which the config names) and has float32 weights.
TINY_COMMON: dict[str, Any] = {
    "vocab_size": 384,
    "bos_token_id": 256,
    "eos_token_id": 257,
    "pad_token_id": None,
    "tie_word_embeddings": False,
    "dtype": "float32",
    "torch_dtype": "float32",
}


class CausalLM(ModelBase):
    """`model` (with `embed_tokens`) under a vocab-parallel LM head over attention-TP (under
    DP attention each group samples its own rows), tied to the embedding when the config
    says so."""

    def __init__(self, config: types.SimpleNamespace, ctx: ModelContext, model: nn.Module) -> None:
        super().__init__(config, ctx)
        self.config = config
        self.model = model
        self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size, ctx.parallel.attn_tp)
        if tie_word_embeddings(config):
            self.lm_head.tie(self.model.embed_tokens)
        self.logits_processor = LogitsProcessor()

    def forward(self, batch: ForwardBatch) -> torch.Tensor:
        """Logits [batch.batch_size, vocab] (float32) at `batch.sample_rows`, same on every
        rank of the attention-TP group."""
        return self.logits_processor(self.model(batch), self.lm_head, batch)


def head_constraints(config: types.SimpleNamespace) -> list[Divides]:
    """Attention heads split over attention-TP; KV heads too, or replicated when fewer."""
    return [
        Divides("num_attention_heads", config.num_attention_heads, "attn_tp"),
        Divides("num_key_value_heads", num_kv_heads(config), "attn_tp", either_way=True),
    ]


def mlp_constraints(
    moe: MoeSettings, dense: int | None, experts: int | None = None, expert_size: int = 0
) -> list[Divides]:
    """A dense MLP's intermediate size splits over "tp" (unless ``--moe-dense-tp-size 1``
    replicates it); routed experts split over "tp" whole (all2all) or by their
    intermediate size (none)."""
    out = []
    if dense is not None and moe.dense_tp_size != 1:
        out.append(Divides("intermediate_size", dense, "tp"))
    if experts:
        if moe.a2a_backend != "none":
            out.append(Divides("the number of routed experts", experts, "tp"))
        else:
            out.append(Divides("moe_intermediate_size", expert_size, "tp"))
    return out


def causal_lm_shapes(
    config: types.SimpleNamespace, layer_shapes: Callable[[int], dict[str, tuple[int, ...]]]
) -> dict[str, tuple[int, ...]]:
    """Every checkpoint tensor of the model: `layer_shapes(i)` gives decoder layer i's
    attention and MLP tensors, named within the layer ("self_attn.…", "mlp.…"); its two
    norms, the embedding, the final norm and the untied LM head are added here."""
    hidden = config.hidden_size
    shapes = {"model.embed_tokens.weight": (config.vocab_size, hidden)}
    for i in range(config.num_hidden_layers):
        p = f"model.layers.{i}."
        shapes |= {p + name: shape for name, shape in layer_shapes(i).items()}
        shapes[p + "input_layernorm.weight"] = (hidden,)
        shapes[p + "post_attention_layernorm.weight"] = (hidden,)
    shapes["model.norm.weight"] = (hidden,)
    if not tie_word_embeddings(config):
        shapes["lm_head.weight"] = (config.vocab_size, hidden)
    return shapes
