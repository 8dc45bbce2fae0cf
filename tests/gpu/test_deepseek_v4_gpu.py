"""DeepSeek-V4 on the GPU in bf16 (state that bf16 would lose kept in float32): the tokens of
tp 2 (all2all, the model's own token split; and MoE TP-sharded) equal tp 1's for 16 steps,
unless the two runs part at a near-tie (tp 2 sums its partial outputs in another order: a
bf16 ulp of difference picks the other of two equally likely tokens), which is reported.

Seeded random weights give near-uniform distributions over the 384 tokens (logprobs near
-5.95), where near-ties are frequent; TIE_LOGPROB is 4 bf16 ulps at |logprob| in [4, 8)."""

from __future__ import annotations

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs"),
]

ARCH = "DeepseekV4ForCausalLM"
STEPS = 16
TIE_LOGPROB = 0.125


def launch(*flags: str) -> list:
    from bench.configs import model_config, setup
    from engine.frontend.llm_engine import LLMEngine
    from engine.messages import SamplingParams

    argv = ["--device", "cuda", "--dtype", "bfloat16", "--max-prefill-tokens", "64", *flags]
    s = setup(ARCH, model_config(ARCH, None), argv)
    prompts = [list(b"DeepSeek-V4 on a GPU"), [256, 7, 9], list(b"hyper-connections " * 2)]
    params = SamplingParams(max_new_tokens=STEPS, ignore_eos=True)
    with LLMEngine(s.launch.args, setup=s) as engine:
        results = engine.generate(prompts, params)
    assert engine.error is None, engine.error
    assert all(r.error is None and len(r.output_ids) == STEPS for r in results)
    return results


@pytest.mark.parametrize("backend", ["all2all", "none"])
def test_bf16_tp2_tokens_equal_tp1(backend, capsys):
    tp1 = launch()
    tp2 = launch("--tp-size", "2", "--moe-a2a-backend", backend)
    for a, b in zip(tp1, tp2, strict=True):
        part = next((i for i in range(STEPS) if a.output_ids[i] != b.output_ids[i]), STEPS)
        with capsys.disabled():
            print(f"\n{backend}: tp 2 equals tp 1 for {part} of {STEPS} steps")
        for i in range(min(part + 1, STEPS)):  # the same token is as likely; at a parting,
            gap = abs(a.output_logprobs[i] - b.output_logprobs[i])  # both near the top
            assert gap < TIE_LOGPROB, (i, a, b)
