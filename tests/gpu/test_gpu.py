"""The engine on GPU: CUDA-graph replays against eager steps of the same rows, NCCL tensor
parallelism against one GPU, all-to-all MoE decode inside graphs. Skipped without CUDA.

Graph against eager: every decode step of these launches has a row count that is a capture
size (or above the largest), so the replayed graph and the eager step run the same kernels
on the same shapes, and must agree bitwise: tokens and logprobs equal. (Where a step would
be padded to a larger bucket, rounding may differ; `test_gpu_reference.py` checks those
launches against transformers.)

TP 2 against TP 1: the all-reduce sums in another order, so each request must give the
same tokens up to a near-tie (both runs' chosen tokens within TIE_LOGPROB), with logprobs
within TIE_LOGPROB before it. Kernels are checked row by row in `test_kernels_per_row.py`.
"""

from __future__ import annotations

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]

# TP 1 and TP 2 sum in another order: their bf16 logits differ by a few ulps (2^-6 for a
# logit in [2, 4)); 0.05 is about 3 of them. test_gpu_reference.py checks both against
# transformers with the tolerances derived there.
TIE_LOGPROB = 0.05
# Llama shapes FlashInfer builds kernels for (head dim 128), small enough to load in a second.
LLAMA = dict(
    hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, head_dim=128, vocab_size=1024,
)  # fmt: skip


def needs_gpus(n: int) -> pytest.MarkDecorator:
    return pytest.mark.skipif(torch.cuda.device_count() < n, reason=f"needs {n} GPUs")


def launch(
    tp: int, prompts: list[list[int]], params: list, *flags: str, arch: str = "LlamaForCausalLM"
) -> list:
    from bench.configs import GPU_CONFIGS, model_config, setup
    from engine.frontend.llm_engine import LLMEngine

    small = LLAMA if arch == "LlamaForCausalLM" else {
        **GPU_CONFIGS[arch], "num_hidden_layers": 2, "vocab_size": LLAMA["vocab_size"]
    }  # fmt: skip
    argv = ["--device", "cuda", "--dtype", "bfloat16", "--tp-size", str(tp)]
    s = setup(arch, model_config(arch, small), [*argv, "--cuda-graph-max-bs", "8", *flags])
    with LLMEngine(s.launch.args, setup=s) as engine:
        results = engine.generate(prompts, params)
    assert engine.error is None, engine.error  # e.g. ranks that hang on the way out
    return results


def assert_bitwise_equal(a: list, b: list) -> None:
    """The same tokens and the very same logprobs, request by request."""
    for i, (ra, rb) in enumerate(zip(a, b, strict=True)):
        assert ra.output_ids == rb.output_ids, f"request {i}: {ra} {rb}"
        assert ra.output_logprobs == rb.output_logprobs, f"request {i}: {ra} {rb}"


def assert_same_up_to_a_near_tie(a: list, b: list, tol: float = TIE_LOGPROB) -> None:
    """Per request: the same tokens with logprobs within `tol`, until a step where both
    runs' chosen tokens are within `tol` of each other (a near-tie), after which the
    continuations are no longer comparable."""
    for ra, rb in zip(a, b, strict=True):
        assert len(ra.output_ids) == len(rb.output_ids)
        for i, (x, y) in enumerate(zip(ra.output_ids, rb.output_ids, strict=True)):
            gap = abs(ra.output_logprobs[i] - rb.output_logprobs[i])
            if x != y:
                assert gap < tol, f"token {i} differs and is no near-tie: {ra} {rb}"
                break
            assert gap < tol, (i, ra, rb)


def prompts_and_params(new_tokens: list[int]) -> tuple[list[list[int]], list]:
    from engine.messages import SamplingParams

    gen = torch.Generator().manual_seed(0)
    prompts = [
        torch.randint(0, LLAMA["vocab_size"], (3 + 4 * i,), generator=gen).tolist()
        for i in range(len(new_tokens))
    ]
    return prompts, [SamplingParams(max_new_tokens=n, ignore_eos=True) for n in new_tokens]


def test_cuda_graph_tokens_match_eager_bitwise(capfd):
    """8 requests decoding together: every decode step has 8 rows, replayed in the graph of
    8, and eagerly the same 8 rows."""
    prompts, params = prompts_and_params([12] * 8)
    graphs = launch(1, prompts, params)
    assert "cuda graphs: captured" in capfd.readouterr().err
    assert_bitwise_equal(graphs, launch(1, prompts, params, "--disable-cuda-graph"))


def test_cuda_graph_eager_above_the_largest_size_bitwise():
    """The batch shrinks from 5 to 1: eager above --cuda-graph-max-bs 2 (5, 4, 3 rows),
    graphs of exactly 2 and 1 rows below."""
    prompts, params = prompts_and_params([14, 12, 10, 8, 6])
    mixed = launch(1, prompts, params, "--cuda-graph-max-bs", "2")
    assert_bitwise_equal(mixed, launch(1, prompts, params, "--disable-cuda-graph"))


@pytest.mark.parametrize("tp", [1, pytest.param(2, marks=needs_gpus(2))])
def test_overlap_schedule_tokens_match_the_synchronous_loop_bitwise(tp):
    """Requests of different lengths finishing at different steps, graphs and eager steps:
    the overlapped loop (inputs from the device's token board, tokens read one step late)
    runs the very same forwards as `--disable-overlap-schedule`."""
    prompts, params = prompts_and_params([14, 12, 10, 8, 6, 3])
    overlapped = launch(tp, prompts, params)
    assert_bitwise_equal(overlapped, launch(tp, prompts, params, "--disable-overlap-schedule"))


@needs_gpus(2)
def test_nccl_tp2_tokens_match_tp1(capfd):
    prompts, params = prompts_and_params([12, 12, 9, 6])
    tp2 = launch(2, prompts, params)
    err = capfd.readouterr().err
    assert "cuda graphs: captured" in err, err  # NCCL inside the graphs
    assert "not torn down" not in err, err
    assert_same_up_to_a_near_tie(tp2, launch(1, prompts, params))


@needs_gpus(2)
@pytest.mark.parametrize("arch", ["Qwen3MoeForCausalLM", "DeepseekV3ForCausalLM"])
def test_all2all_moe_decode_is_captured(arch, capfd):
    """The fixed-capacity all-to-all keeps decode free of host syncs, so MoE models capture
    CUDA graphs with the expert exchange inside, at every TP size the machine has. With 4
    requests decoding together every step has 4 rows, a capture size at any alignment here,
    so graph and eager run the same expert GEMMs on the same rows: bitwise equal. A warm-up
    launch first fills the Triton autotuner's on-disk cache for every row bucket, so both
    compared launches read the same tile configs from it."""
    tp = 4 if torch.cuda.device_count() >= 4 else 2
    prompts, params = prompts_and_params([12] * 4)
    a2a = ("--moe-a2a-backend", "all2all")
    launch(tp, prompts, params, *a2a, arch=arch)
    graphs = launch(tp, prompts, params, *a2a, arch=arch)
    err = capfd.readouterr().err
    assert "cuda graphs: captured" in err, err
    assert "not torn down" not in err, err  # the graphs were freed before NCCL's teardown
    eager = launch(tp, prompts, params, *a2a, "--disable-cuda-graph", arch=arch)
    assert_bitwise_equal(graphs, eager)
