"""Edge configurations through the real engine (`LLMEngine`, gloo ranks) against
transformers' fp32 greedy decoding of the same checkpoint: the same tokens, logprobs within
1e-4.

- tp 4 with one KV head (replicated on every rank) and a vocabulary of 383 rows, padded to
  384 and split 96 a rank: the last rank holds one padding row, and the prompts use the
  last real token ids;
- DP attention at tp 4, dp 2 for Llama, Qwen3-MoE (all-to-all experts) and DeepSeek-V3,
  each first with one request, so attention-DP group 1 runs idle batches throughout, then
  with requests for both groups;
- odd sizes at tp 3: Llama with 6 query / 3 KV heads, MLP 96 and a vocabulary of 301;
  Qwen3-MoE with 6 experts (2 a rank under all2all, steps padded to multiples of 3) and
  expert width 24.
"""

from __future__ import annotations

import pytest

from engine.frontend.llm_engine import LLMEngine
from engine.messages import SamplingParams
from tests.support import deepseek_v3, qwen3_moe
from tests.support.checkpoints import (
    LLAMA_H64,
    load_reference,
    reference_greedy,
    save_tiny_checkpoint,
)
from tests.support.engine import assert_close, gone, server_args

pytestmark = pytest.mark.slow

STEPS = 6
GREEDY = SamplingParams(max_new_tokens=STEPS, ignore_eos=True)
DP = ("--tp-size", "4", "--dp-size", "2", "--enable-dp-attention")
CONFIGS = {
    "llama-kv1-vocab383": {**LLAMA_H64, "num_key_value_heads": 1, "vocab_size": 383},
    "llama-odd": {
        **LLAMA_H64,
        "hidden_size": 48,
        "intermediate_size": 96,
        "num_attention_heads": 6,
        "num_key_value_heads": 3,
        "vocab_size": 301,
    },
    "qwen3-moe-odd": {
        **qwen3_moe.CASES["tiny"],
        "hidden_size": 48,
        "num_attention_heads": 6,
        "num_key_value_heads": 3,
        "num_experts": 6,
        "num_experts_per_tok": 3,
        "moe_intermediate_size": 24,
        "intermediate_size": 96,
        "vocab_size": 301,
    },
    "llama": {**LLAMA_H64, "num_key_value_heads": 2},
    "qwen3-moe": qwen3_moe.CASES["tiny"],
}


def prompts_for(vocab: int) -> list[list[int]]:
    """Three prompts of odd lengths; one ends with the vocabulary's last ids."""
    return [[1, 2, 3, 4, 5], [17, 99, 3, 250, 8, 8, 41, 2, 77, vocab - 2, vocab - 1], [200, 7, 1]]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    root, saved = tmp_path_factory.mktemp("edge"), {}

    def path(name: str):
        if name not in saved:
            if name == "deepseek-v3":
                saved[name] = deepseek_v3.save_checkpoint(root, "yarn-q-lora")
            else:
                saved[name] = save_tiny_checkpoint(root / name, CONFIGS[name], seed=5)
        return saved[name]

    return path


def check(path, prompts: list[list[int]], results: list) -> None:
    reference = load_reference(path)
    for prompt, result in zip(prompts, results, strict=True):
        tokens, logprobs = reference_greedy(reference, prompt, STEPS)
        assert result.error is None, result.error
        assert result.output_ids == tokens, prompt
        assert_close(result.output_logprobs, logprobs, 1e-4)


def run(path, *argv: str, batches: list[list[list[int]]]) -> tuple[list[list], dict]:
    """One launch that serves `batches` one after another; per batch its results."""
    with LLMEngine(server_args("--model-path", str(path), *argv)) as engine:
        results = [engine.generate(b, [GREEDY] * len(b)) for b in batches]
        report = engine.report()
    assert all(gone(pid) for pid in engine.pids)
    return results, report


@pytest.mark.parametrize(
    ("name", "argv"),
    [
        ("llama-kv1-vocab383", ("--tp-size", "4")),
        ("llama-odd", ("--tp-size", "3")),
        ("qwen3-moe-odd", ("--tp-size", "3", "--moe-a2a-backend", "all2all")),
    ],
)
def test_tp_edge_matches_transformers(checkpoint, name, argv):
    prompts = prompts_for(CONFIGS[name]["vocab_size"])
    (results,), report = run(checkpoint(name), *argv, batches=[prompts])
    check(checkpoint(name), prompts, results)
    if "all2all" in argv:  # token counts padded to 3: the padding rows must not leak
        assert report["plan"]["plan"]["token_alignment"]["value"] == 3
        assert report["counters"]["attn_tp_padding_tokens"] > 0


@pytest.mark.parametrize(
    ("name", "extra"),
    [("llama", ()), ("qwen3-moe", ("--moe-a2a-backend", "all2all")), ("deepseek-v3", ())],
)
def test_dp_attention_tp4_dp2_matches_transformers(checkpoint, name, extra):
    """One request alone (group 1 runs idle batches for every step), then three, split
    round-robin between the groups."""
    vocab = 384 if name == "deepseek-v3" else CONFIGS[name]["vocab_size"]
    prompts = prompts_for(vocab)
    (alone, together), report = run(checkpoint(name), *DP, *extra, batches=[prompts[1:2], prompts])
    check(checkpoint(name), prompts[1:2], alone)
    check(checkpoint(name), prompts, together)
    counters = report["counters"]
    assert counters["mlp_sync_calls"] == counters["steps"] > 0
