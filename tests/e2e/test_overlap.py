"""The overlap scheduler (the default) against `--disable-overlap-schedule`: the same tokens,
logprobs and finish reasons, request for request, under EOS, max_new_tokens, seeded
sampling, requests admitted while others decode, DP attention with idle groups and the
all-to-all MoE; and at most one wasted step per request that stops early."""

from __future__ import annotations

import json
import shutil

import pytest

from engine.messages import SamplingParams
from tests.support.checkpoints import LLAMA_H64, save_tiny_checkpoint
from tests.support.engine import generate

pytestmark = pytest.mark.slow

OFF = ("--disable-overlap-schedule",)
# 6 prompts under a small prefill budget: admitted over several steps, so prefill and
# decode steps interleave and the batch changes size
PROMPTS = [list(b"Hello"), list(b"overlap"), [256, 7, 9], list(b"abcdefghijkl"), [300] * 9]
PROMPTS += [list(b"The quick brown fox")]
PARAMS = [SamplingParams(max_new_tokens=n, ignore_eos=True) for n in (1, 2, 7, 12, 5)] + [
    SamplingParams(max_new_tokens=9, temperature=0.8, top_k=20, seed=5)
]


def outputs(results: list) -> list[tuple]:
    return [(r.output_ids, r.output_logprobs, r.finish_reason, r.error) for r in results]


@pytest.mark.parametrize(
    "argv",
    [
        ("--model", "LlamaForCausalLM"),
        ("--model", "Qwen3MoeForCausalLM", "--tp-size", "2", "--moe-a2a-backend", "all2all"),
        ("--model", "DeepseekV3ForCausalLM", "--tp-size", "2", "--dp-size", "2",
         "--enable-dp-attention"),
    ],
    ids=["llama", "qwen3-tp2-a2a", "deepseek-v3-dp2"],
)  # fmt: skip
def test_overlap_gives_the_same_outputs(argv):
    common = (*argv, "--max-prefill-tokens", "24")
    overlapped, report = generate(common, PROMPTS, PARAMS)
    synchronous, sync_report = generate((*common, *OFF), PROMPTS, PARAMS)
    assert outputs(overlapped) == outputs(synchronous)
    assert [len(r.output_ids) for r in overlapped] == [1, 2, 7, 12, 5, 9]
    # stopping by length is known ahead: no step is wasted on it
    assert report["counters"]["steps"] == sync_report["counters"]["steps"]


def test_an_early_eos_costs_at_most_one_step(tmp_path):
    """EOS is the one stop the host learns late: the step already launched for that request
    is computed and its token dropped, never sent."""
    path = save_tiny_checkpoint(tmp_path, {**LLAMA_H64, "num_key_value_heads": 2}, seed=3)
    prompt = [[17, 99, 3, 250, 8, 8, 41, 300, 2, 77, 5]]
    greedy = [SamplingParams(max_new_tokens=12)]
    (free,), _ = generate(("--model-path", str(path), *OFF), prompt, greedy)
    cut = next(i for i in range(2, 12) if free.output_ids[i] not in free.output_ids[:i])
    copy = shutil.copytree(path, tmp_path / "eos")
    for name in ("config.json", "generation_config.json"):
        file = copy / name
        if file.exists():
            eos = free.output_ids[cut]
            file.write_text(json.dumps({**json.loads(file.read_text()), "eos_token_id": eos}))
    runs = {}
    for name, flags in (("overlap", ()), ("sync", OFF)):
        (result,), report = generate(("--model-path", str(copy), *flags), prompt, greedy)
        runs[name] = (result, report["counters"]["steps"])
    (ours, steps), (theirs, sync_steps) = runs["overlap"], runs["sync"]
    assert ours.output_ids == theirs.output_ids == free.output_ids[: cut + 1]
    assert ours.finish_reason == theirs.finish_reason == "stop"
    assert sync_steps == cut + 1 and steps == sync_steps + 1


def test_dummy_load_format_draws_the_embedded_models_weights(tmp_path):
    """`--load-format dummy` runs a config.json alone on the seeded random weights: on the
    CPU the very weights `--model ARCH` draws for the same config."""
    from models.llama import LlamaForCausalLM

    (tmp_path / "config.json").write_text(json.dumps(LlamaForCausalLM.tiny_config()))
    prompt, greedy = [list(b"dummy weights")], [SamplingParams(max_new_tokens=6)]
    (dummy,), _ = generate(
        ("--model-path", str(tmp_path), "--load-format", "dummy"), prompt, greedy
    )
    (embedded,), _ = generate(("--model", "LlamaForCausalLM"), prompt, greedy)
    assert dummy.output_ids == embedded.output_ids
    assert dummy.output_logprobs == embedded.output_logprobs
