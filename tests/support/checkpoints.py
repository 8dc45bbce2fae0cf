"""Shared test helpers: tiny random transformers checkpoints, the transformers reference, and a
minimal step driver that runs a parcap model over the paged KV cache.

transformers is imported inside the functions, so spawned ranks that never touch it stay fast.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from engine.attention.torch_backend import TorchAttentionBackend
from engine.model_api import ForwardMode
from engine.runtime.kv_cache import KVPool, ReqToTokenPool
from tests.support.batches import make_batch

# transformers configs of tiny Llamas: LLAMA_H64 for the reference and engine tests, which add
# their cases to it; LLAMA_H32 (GQA) for the loader and CLI tests
LLAMA_H64 = {
    "model_type": "llama",
    "architectures": ["LlamaForCausalLM"],
    "vocab_size": 384,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "max_position_embeddings": 128,
    "rms_norm_eps": 1e-5,
}
LLAMA_H32 = {
    "model_type": "llama",
    "architectures": ["LlamaForCausalLM"],
    "vocab_size": 300,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 64,
}


def save_tiny_checkpoint(
    tmp_path: Path,
    hf_config: dict[str, Any],
    seed: int = 0,
    model_cls_name: str | None = None,
    max_shard_size: int | str | None = None,
) -> Path:
    """Save a random fp32 transformers model built from `hf_config` (needs "model_type") as
    safetensors under `tmp_path`, sharded when `max_shard_size` is given; returns the dir.

    Weights are re-drawn after transformers' init so that norms and biases are not constants:
    matrices ~ N(0, 1/fan_in), norm weights ~ 1 + N(0, 0.1²), other vectors ~ N(0, 0.05²).
    """
    import transformers

    values = dict(hf_config)
    config = transformers.AutoConfig.for_model(values.pop("model_type"), **values)
    name = model_cls_name or config.architectures[0]
    model = getattr(transformers, name)(config).float().eval()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param_name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            if param.dim() >= 2:
                param.copy_(noise / math.sqrt(param.shape[-1]))
            elif "norm" in param_name:
                param.copy_(1 + 0.1 * noise)
            else:
                param.copy_(0.05 * noise)
    path = Path(tmp_path) / f"{name}-{seed}"
    kwargs = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    model.save_pretrained(path, **kwargs)
    return path


def load_reference(path: Path, model_cls_name: str | None = None) -> torch.nn.Module:
    import transformers

    config = transformers.AutoConfig.from_pretrained(path)
    cls = getattr(transformers, model_cls_name or config.architectures[0])
    return cls.from_pretrained(path, dtype=torch.float32).eval()


@torch.no_grad()
def reference_greedy(
    model: torch.nn.Module, prompt: list[int], steps: int
) -> tuple[list[int], list[float]]:
    """Greedy tokens and their logprobs, recomputing the whole sequence every step."""
    ids, tokens, logprobs = list(prompt), [], []
    for _ in range(steps):
        logits = model(input_ids=torch.tensor([ids])).logits[0, -1].float()
        token = int(logits.argmax())
        tokens.append(token)
        logprobs.append(float(torch.log_softmax(logits, -1)[token]))
        ids.append(token)
    return tokens, logprobs


@torch.inference_mode()
def parcap_greedy(
    model: torch.nn.Module,
    prompts: list[list[int]],
    steps: int,
    chunk: int | None = None,
    pad_to: int = 1,
) -> tuple[list[list[int]], list[list[float]], list[torch.Tensor]]:
    """Greedy decoding of all prompts in shared batches.

    Prompts are fed `chunk` tokens per step (so later chunks extend a cached prefix), then
    every request decodes one token per step. Each step is padded to a multiple of `pad_to`
    rows. Returns per prompt the tokens and logprobs, and every step's logits.
    """
    param = next(model.parameters())
    n = len(prompts)
    max_context = max(map(len, prompts)) + steps
    kv_pool = KVPool(n * max_context, model.kv_cache_shapes(), param.dtype, param.device)
    req_pool = ReqToTokenPool(n, max_context, param.device)
    backend = TorchAttentionBackend()
    req_rows = [req_pool.alloc() for _ in prompts]
    cached = [0] * n
    pending = [list(p) for p in prompts]
    tokens: list[list[int]] = [[] for _ in prompts]
    logprobs: list[list[float]] = [[] for _ in prompts]
    step_logits = []
    while any(pending):
        active = [i for i in range(n) if pending[i]]
        feeds = {i: pending[i][: chunk or None] for i in active}
        decode = all(cached[i] and len(feeds[i]) == 1 for i in active)
        input_ids, positions, slots = [], [], []
        for i in active:
            new = kv_pool.alloc(len(feeds[i]))
            req_pool.write(req_rows[i], cached[i], new)
            input_ids += feeds[i]
            positions += range(cached[i], cached[i] + len(feeds[i]))
            slots += new
        num_tokens = len(input_ids)
        extend_lens = [len(feeds[i]) for i in active]
        batch = make_batch(
            ForwardMode.DECODE if decode else ForwardMode.EXTEND,
            num_tokens,
            rows=num_tokens + -num_tokens % pad_to,
            input_ids=input_ids,
            positions=positions,
            slots=slots,
            req_rows=[req_rows[i] for i in active],
            seq_lens=[cached[i] + len(feeds[i]) for i in active],
            extend_lens=extend_lens,
            kv_pool=kv_pool,
            req_to_token=req_pool.table,
            backend=backend,
            device=param.device,
        )
        backend.plan(batch)
        logits = model(batch)
        step_logits.append(logits.cpu())
        for row, i in enumerate(active):
            cached[i] += len(feeds[i])
            pending[i] = pending[i][len(feeds[i]) :]
            if pending[i]:
                continue
            token = int(logits[row].argmax())
            tokens[i].append(token)
            logprobs[i].append(float(torch.log_softmax(logits[row], -1)[token]))
            if len(tokens[i]) < steps:
                pending[i] = [token]
    return tokens, logprobs, step_logits
