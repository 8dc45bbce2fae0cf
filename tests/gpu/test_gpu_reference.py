"""The bf16 engine on the GPU (FlashInfer attention, Triton MoE, CUDA graphs, NCCL) against
an independent fp32 reference: transformers on the CPU, on the same seeded checkpoint, for
every built-in model at tp 1 and 2.

The engine decodes greedily; the reference is re-fed the engine's tokens (teacher forcing),
so every step is checked, also after the two first differ. At each step, with z the
reference's logprobs:

- the engine's token is one the reference ranks within TIE of its best (before the first
  reference near-tie, top two within TIE, that is the reference's own greedy token);
- the engine's logprob of it is within TOL of the reference's.

Tolerances from bf16 (unit roundoff u = 2^-8): the hidden state crosses about 20 bf16
roundings in 2 layers, each adding about u / sqrt(3) relative error at random, so it ends
sqrt(20) u / sqrt(3), about 1%, off; logits of magnitude up to 4 then move by 0.04, and
rounding the bf16 logit adds up to half an ulp, 2^-7 for |z| < 4: Z_TOL = 0.05 per logit.
A logprob z - logsumexp moves by at most twice that: TOL = 2 Z_TOL. Ranking two tokens
compares two logits, whose errors may have opposite signs: TIE = 2 Z_TOL. (Measured on two
H200s: worst logprob error 0.033 to 0.049 over the six launches.)

MoE routing is discontinuous: where the reference's top-k boundary (DeepSeek-V3: also its
group choice) is closer than bf16 moves a router logit, the engine may route a token to
another expert and legitimately differ by much more. Such steps (router margin under
ROUTE_TOL) are counted and left out; there must be few of them, and most steps must be
decided (reference top two further apart than TIE) for the test to have power.
"""

from __future__ import annotations

import functools
import math
from pathlib import Path

import pytest
import torch

from engine.frontend.llm_engine import LLMEngine
from engine.messages import SamplingParams
from engine.server_args import ServerArgs
from tests.support.checkpoints import load_reference, save_tiny_checkpoint

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]

Z_TOL = 0.05
TOL = 2 * Z_TOL
TIE = 2 * Z_TOL
# router logits (about unit scale here) move by about 1% too: a top-k margin under 0.03
# may flip (flips were seen at margins up to 0.014); see `route_margins` for DeepSeek-V3
ROUTE_TOL = 0.03
MAX_EXCUSED = 0.2  # of the steps, for routing near-ties
MIN_DECIDED = 0.3  # of the steps, with the reference's top two further apart than TIE

COMMON = dict(
    vocab_size=1024, max_position_embeddings=512, hidden_size=256, intermediate_size=512,
    num_hidden_layers=2, rms_norm_eps=1e-5, tie_word_embeddings=False,
)  # fmt: skip
# shapes FlashInfer builds kernels for: head dim 128; MLA's 512 + 64 latent
CONFIGS = {
    "LlamaForCausalLM": dict(
        COMMON, model_type="llama", num_attention_heads=4, num_key_value_heads=2, head_dim=128
    ),
    "Qwen3MoeForCausalLM": dict(
        COMMON, model_type="qwen3_moe", num_attention_heads=4, num_key_value_heads=2,
        head_dim=128, num_experts=8, num_experts_per_tok=2, moe_intermediate_size=128,
        norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[0],  # dense, then MoE
    ),
    "DeepseekV3ForCausalLM": dict(
        COMMON, model_type="deepseek_v3", num_attention_heads=16, num_key_value_heads=16,
        q_lora_rank=128, kv_lora_rank=512, qk_rope_head_dim=64, qk_nope_head_dim=128,
        v_head_dim=128, n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2,
        n_group=2, topk_group=1, norm_topk_prob=True, routed_scaling_factor=2.5,
        first_k_dense_replace=1, rope_interleave=True,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
    ),
}  # fmt: skip
PROMPT_LENS = (5, 17, 40, 3, 11)
# requests finish one after another: decode steps of 5, 4, 3, 2 and 1 rows, replayed in the
# graphs of 8, 4, 4, 2 and 1 rows (padding rows included)
NEW_TOKENS = (16, 14, 12, 10, 8)


def needs_gpus(n: int) -> pytest.MarkDecorator:
    return pytest.mark.skipif(torch.cuda.device_count() < n, reason=f"needs {n} GPUs")


def prompts() -> list[list[int]]:
    gen = torch.Generator().manual_seed(0)
    return [
        torch.randint(0, COMMON["vocab_size"], (n,), generator=gen).tolist() for n in PROMPT_LENS
    ]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    root = tmp_path_factory.mktemp("gpu-reference")

    @functools.cache
    def path(arch: str) -> Path:
        return save_tiny_checkpoint(root / arch, {**CONFIGS[arch], "architectures": [arch]})

    return path


@functools.cache
def reference_model(path: Path) -> torch.nn.Module:
    return load_reference(path)


def engine_greedy(path: Path, tp: int) -> list:
    argv = ["--model-path", str(path), "--device", "cuda", "--dtype", "bfloat16"]
    argv += ["--tp-size", str(tp), "--cuda-graph-max-bs", "8"]
    params = [SamplingParams(max_new_tokens=n, ignore_eos=True) for n in NEW_TOKENS]
    with LLMEngine(ServerArgs.from_cli(argv)) as engine:
        results = engine.generate(prompts(), params)
    assert engine.error is None, engine.error
    return results


def route_margins(gate: torch.nn.Module, logits: torch.Tensor, config: dict) -> torch.Tensor:
    """Per position, how far the reference's routing is from choosing otherwise, in router
    logit units: the gap across the top-k boundary (DeepSeek-V3: the smaller of the group
    choice's and the expert choice's gaps in sigmoid scores, times 4, sigmoid's largest
    slope being 1/4)."""
    logits = logits.double().reshape(-1, logits.shape[-1])
    k = config["num_experts_per_tok"]
    if config["model_type"] == "qwen3_moe":
        s = logits.sort(-1, descending=True).values
        return s[:, k - 1] - s[:, k]
    g, tg = config["n_group"], config["topk_group"]
    scores = logits.sigmoid() + gate.e_score_correction_bias.double()
    per_group = scores.view(len(scores), g, -1)
    group_scores = per_group.topk(2, dim=-1).values.sum(-1)
    ranked = group_scores.sort(-1, descending=True).values
    group_gap = ranked[:, tg - 1] - ranked[:, tg] if tg < g else torch.full_like(ranked[:, 0], 1)
    chosen = (group_scores >= ranked[:, tg - 1 : tg]).unsqueeze(-1).expand_as(per_group)
    s = per_group.masked_fill(~chosen, -math.inf).flatten(1).sort(-1, descending=True).values
    return 4 * torch.minimum(group_gap, s[:, k - 1] - s[:, k])


@torch.no_grad()
def teacher_forced(path: Path, prompt: list[int], tokens: list[int]):
    """The reference's logprobs at each step of the engine's continuation, and per step the
    smallest routing margin over the MoE layers (inf for a dense model)."""
    model = reference_model(path)
    config = CONFIGS[model.config.architectures[0]]
    captured = []

    def keep(module, inputs, output):
        logits = output[0] if isinstance(output, tuple) else output
        captured.append(route_margins(module, logits, config))

    gates = [m for name, m in model.named_modules() if name.endswith("mlp.gate")]
    hooks = [gate.register_forward_hook(keep) for gate in gates]
    try:
        logits = model(input_ids=torch.tensor([prompt + tokens[:-1]])).logits[0].double()
    finally:
        for hook in hooks:
            hook.remove()
    steps = slice(len(prompt) - 1, None)
    logprobs = torch.log_softmax(logits[steps], dim=-1)
    if not captured:
        return logprobs, torch.full((len(tokens),), math.inf)
    return logprobs, torch.stack(captured).min(0).values[steps]


def check_against_reference(path: Path, results: list) -> None:
    steps = excused = decided = 0
    worst = 0.0
    for prompt, result in zip(prompts(), results, strict=True):
        assert result.error is None, result.error
        tokens, logprobs = result.output_ids, result.output_logprobs
        ref, margins = teacher_forced(path, prompt, tokens)
        agreed = True
        for i, (token, logprob) in enumerate(zip(tokens, logprobs, strict=True)):
            steps += 1
            top2 = ref[i].topk(2).values
            if margins[i] < ROUTE_TOL:
                excused += 1
                agreed = False  # the engine may have routed otherwise: no longer comparable
                continue
            near_tie = top2[0] - top2[1] <= TIE
            decided += not near_tie
            if agreed and not near_tie:
                assert token == int(ref[i].argmax()), f"{prompt}: step {i} {tokens}"
            agreed = agreed and not near_tie
            where = f"prompt {prompt}, step {i}: engine {tokens}, {logprobs}"
            gap = float(top2[0] - ref[i, token])
            assert gap <= TIE, (
                f"{where}: the reference ranks token {token} {gap:.3f} below its best"
            )
            diff = abs(logprob - float(ref[i, token]))
            worst = max(worst, diff)
            assert diff <= TOL, f"{where}: logprob off by {diff:.3f}"
    print(f"{steps} steps: worst logprob error {worst:.4f}, {excused} routing near-ties, "
          f"{decided} decided")  # fmt: skip
    assert excused <= MAX_EXCUSED * steps, f"{excused} of {steps} steps are routing near-ties"
    assert decided >= MIN_DECIDED * steps, f"only {decided} of {steps} steps are decided"


@pytest.mark.parametrize("tp", [1, pytest.param(2, marks=needs_gpus(2))])
@pytest.mark.parametrize("arch", list(CONFIGS))
def test_bf16_engine_matches_fp32_transformers(checkpoint, arch, tp, capfd):
    results = engine_greedy(checkpoint(arch), tp)
    err = capfd.readouterr().err
    assert "cuda graphs: captured" in err, err
    check_against_reference(checkpoint(arch), results)
