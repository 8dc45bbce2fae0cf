"""GPU path: FlashInfer attention against the torch backend, CUDA-graph replays against eager
steps, NCCL tensor parallelism against one GPU. Skipped without CUDA (and FlashInfer).

Token comparisons allow a near-tie: two runs whose arithmetic differs in rounding (another
padded row count, another reduction split) may pick different tokens where the top two are
within rounding of each other. They must agree on every token before that point, and at it
both runs' chosen tokens must be (near-)equally likely.
"""

from __future__ import annotations

import types

import pytest
import torch

from engine.attention.base import AttentionSpec, MLASpec
from engine.attention.torch_backend import TorchAttentionBackend
from engine.model_api import ForwardBatch, ForwardMode
from engine.runtime.kv_cache import KVPool, ReqToTokenPool
from models.layers.attention import Attention
from tests.support.batches import make_batch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]

DTYPE = torch.bfloat16
TIE_LOGPROB = 0.05  # bf16 logits of a near-tie differ by about this much
# Llama shapes FlashInfer builds kernels for (head dim 128), small enough to load in a second.
LLAMA = dict(
    hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, head_dim=128, vocab_size=1024,
)  # fmt: skip


def needs_gpus(n: int) -> pytest.MarkDecorator:
    return pytest.mark.skipif(torch.cuda.device_count() < n, reason=f"needs {n} GPUs")


@pytest.fixture(scope="module")
def flashinfer_backend() -> types.ModuleType:
    pytest.importorskip("flashinfer")
    from engine.attention import flashinfer

    return flashinfer


# -- attention backends ------------------------------------------------------------------


def paged_batch(
    mode: ForwardMode,
    seq_lens: list[int],
    extend_lens: list[int],
    pad: int,
    layer_shapes: list[tuple[int, ...]],
    gen: torch.Generator,
) -> ForwardBatch:
    """Requests with random cached contexts at scattered slots, then `pad` padding rows."""
    device = torch.device("cuda")
    kv = KVPool(sum(seq_lens) + 64, [layer_shapes], DTYPE, device)
    for buf in kv.buffers[0]:
        buf.copy_(torch.randn(buf.shape, generator=gen, device=device).to(DTYPE))
    table = ReqToTokenPool(len(seq_lens) + 1, max(seq_lens, default=1), device)
    free = torch.randperm(kv.num_slots, generator=gen, device=device).add(1).tolist()
    rows, slots, req_rows = [], [], []
    for i, (seq_len, new) in enumerate(zip(seq_lens, extend_lens, strict=True)):
        mine, free = free[:seq_len], free[seq_len:]
        table.write(i + 1, 0, mine)  # row 0 stays unused, as a real table's rows may
        req_rows.append(i + 1)
        slots += mine[seq_len - new :]
        rows.append(new)
    n = sum(rows)
    return make_batch(
        mode,
        n,
        rows=n + pad,
        slots=slots,
        req_rows=req_rows,
        seq_lens=seq_lens,
        extend_lens=extend_lens,
        sample_rows=range(n),
        kv_pool=kv,
        req_to_token=table.table,
        device=device,
    )


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.float() - ref.float()).norm() / ref.float().norm()).item()


def torch_reference(q: torch.Tensor, layer: Attention, batch: ForwardBatch) -> torch.Tensor:
    backend = TorchAttentionBackend()
    backend.plan(batch)
    return backend.forward(q, None, None, layer.layer_id, layer.spec, batch)


def flashinfer(module: types.ModuleType, spec: AttentionSpec | MLASpec, max_slots: int):
    return module.FlashInferBackend(spec, DTYPE, torch.device("cuda"), max_slots)


@pytest.mark.parametrize("pad", [0, 3])
def test_flashinfer_decode_matches_torch(flashinfer_backend, pad):
    gen = torch.Generator(device="cuda").manual_seed(pad)
    heads, kv_heads, dim = 8, 2, 128
    layer = Attention(heads, dim, kv_heads, dim**-0.5, 0)
    lens = [1, 7, 33, 300]
    batch = paged_batch(ForwardMode.DECODE, lens, [1] * 4, pad, layer.kv_cache_shapes(), gen)
    q = torch.randn(batch.rows, heads, dim, generator=gen, device="cuda").to(DTYPE)
    ref = torch_reference(q, layer, batch)
    fi = flashinfer(flashinfer_backend, layer.spec, 4096)
    for plan in (fi.plan, fi.plan_replay):  # the eager wrapper, then a graph's
        plan(batch)
        out = fi.forward(q, None, None, layer.layer_id, layer.spec, batch)
        assert out.shape == (batch.rows, heads, dim)
        assert rel_err(out[:4], ref[:4]) < 2e-2


def test_flashinfer_decode_replays_in_a_cuda_graph(flashinfer_backend):
    """Captured on one step, replayed on another of the same row count after re-planning."""
    gen = torch.Generator(device="cuda").manual_seed(1)
    heads, kv_heads, dim = 8, 2, 128
    layer = Attention(heads, dim, kv_heads, dim**-0.5, 0)
    shapes = layer.kv_cache_shapes()
    first = paged_batch(ForwardMode.DECODE, [5, 9], [1, 1], 2, shapes, gen)
    second = paged_batch(ForwardMode.DECODE, [40, 3, 100], [1, 1, 1], 1, shapes, gen)
    second.kv_pool = first.kv_pool = KVPool(4096, [shapes], DTYPE, torch.device("cuda"))
    for buf in first.kv_pool.buffers[0]:
        buf.copy_(torch.randn(buf.shape, generator=gen, device="cuda").to(DTYPE))
    fi = flashinfer(flashinfer_backend, layer.spec, 4200)
    q = torch.randn(4, heads, dim, generator=gen, device="cuda").to(DTYPE)
    fi.plan_capture(first)
    fi.forward(q, None, None, layer.layer_id, layer.spec, first)  # warm-up outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fi.forward(q, None, None, layer.layer_id, layer.spec, first)
    fi.plan_replay(second)
    q.copy_(torch.randn(4, heads, dim, generator=gen, device="cuda").to(DTYPE))
    graph.replay()
    ref = torch_reference(q, layer, second)
    assert rel_err(out[:3], ref[:3]) < 2e-2


def test_flashinfer_extend_matches_torch(flashinfer_backend):
    gen = torch.Generator(device="cuda").manual_seed(2)
    heads, kv_heads, dim = 8, 2, 128
    layer = Attention(heads, dim, kv_heads, dim**-0.5, 0)
    # a whole prompt, a prompt after a cached prefix, a one-token prompt; 2 padding rows
    batch = paged_batch(
        ForwardMode.EXTEND, [20, 12, 1], [20, 5, 1], 2, layer.kv_cache_shapes(), gen
    )
    q = torch.randn(batch.rows, heads, dim, generator=gen, device="cuda").to(DTYPE)
    ref = torch_reference(q, layer, batch)
    fi = flashinfer(flashinfer_backend, layer.spec, 4096)
    fi.plan(batch)
    out = fi.forward(q, None, None, layer.layer_id, layer.spec, batch)
    assert rel_err(out[:26], ref[:26]) < 2e-2
    assert out[26:].abs().max() == 0


def test_flashinfer_mla_matches_torch(flashinfer_backend):
    gen = torch.Generator(device="cuda").manual_seed(3)
    spec = MLASpec(num_heads=16, kv_lora_rank=512, rope_dim=64, scaling=192**-0.5)
    batch = paged_batch(ForwardMode.DECODE, [3, 64, 257], [1, 1, 1], 1, [(1, 576)], gen)
    q_latent = torch.randn(4, 16, 512, generator=gen, device="cuda").to(DTYPE)
    q_pe = torch.randn(4, 16, 64, generator=gen, device="cuda").to(DTYPE)
    torch_backend = TorchAttentionBackend()
    torch_backend.plan(batch)
    ref = torch_backend.forward_mla(q_latent, q_pe, 0, spec, batch)
    fi = flashinfer(flashinfer_backend, spec, 4096)
    for plan in (fi.plan, fi.plan_replay):
        plan(batch)
        out = fi.forward_mla(q_latent, q_pe, 0, spec, batch)
        assert out.shape == q_latent.shape
        assert rel_err(out[:3], ref[:3]) < 2e-2


# -- the engine on GPU -------------------------------------------------------------------


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


def assert_same_tokens(a: list, b: list, tol: float = TIE_LOGPROB) -> None:
    """Same tokens, up to a near-tie (see the module docstring); most requests identical."""
    identical = 0
    for ra, rb in zip(a, b, strict=True):
        assert len(ra.output_ids) == len(rb.output_ids)
        diverge = next(
            (i for i, (x, y) in enumerate(zip(ra.output_ids, rb.output_ids)) if x != y), None
        )
        agree = len(ra.output_ids) if diverge is None else diverge
        for i in range(agree):
            assert abs(ra.output_logprobs[i] - rb.output_logprobs[i]) < tol, (i, ra, rb)
        if diverge is None:
            identical += 1
        else:
            gap = abs(ra.output_logprobs[diverge] - rb.output_logprobs[diverge])
            assert gap < tol, f"token {diverge} differs and is no near-tie: {ra} {rb}"
    assert identical * 2 >= len(a), f"only {identical} of {len(a)} requests match exactly"


def prompts_and_params(new_tokens: list[int]) -> tuple[list[list[int]], list]:
    from engine.messages import SamplingParams

    gen = torch.Generator().manual_seed(0)
    prompts = [
        torch.randint(0, LLAMA["vocab_size"], (3 + 4 * i,), generator=gen).tolist()
        for i in range(len(new_tokens))
    ]
    return prompts, [SamplingParams(max_new_tokens=n, ignore_eos=True) for n in new_tokens]


def test_cuda_graph_tokens_match_eager(capfd):
    prompts, params = prompts_and_params([12] * 5)  # 5 rows: replayed in the graph of 8
    graphs = launch(1, prompts, params)
    assert "cuda graphs: captured" in capfd.readouterr().err
    eager = launch(1, prompts, params, "--disable-cuda-graph")
    assert_same_tokens(graphs, eager)


def test_cuda_graph_eager_above_the_largest_size():
    # the batch shrinks from 5 to 1: eager above --cuda-graph-max-bs 2, replays below
    prompts, params = prompts_and_params([14, 12, 10, 8, 6])
    mixed = launch(1, prompts, params, "--cuda-graph-max-bs", "2")
    eager = launch(1, prompts, params, "--disable-cuda-graph")
    assert_same_tokens(mixed, eager)


@needs_gpus(2)
def test_nccl_tp2_tokens_match_tp1(capfd):
    prompts, params = prompts_and_params([12, 12, 9, 6])
    tp2 = launch(2, prompts, params)
    err = capfd.readouterr().err
    assert "cuda graphs: captured" in err, err  # NCCL inside the graphs
    assert "not torn down" not in err, err
    assert_same_tokens(tp2, launch(1, prompts, params))


@needs_gpus(2)
@pytest.mark.parametrize("arch", ["Qwen3MoeForCausalLM", "DeepseekV3ForCausalLM"])
def test_all2all_moe_decode_is_captured(flashinfer_backend, arch, capfd):
    """The fixed-capacity all-to-all keeps decode free of host syncs, so MoE models capture
    CUDA graphs with the expert exchange inside, at every TP size the machine has."""
    tp = 4 if torch.cuda.device_count() >= 4 else 2
    prompts, params = prompts_and_params([12, 12, 9, 6, 3])
    a2a = ("--moe-a2a-backend", "all2all")
    graphs = launch(tp, prompts, params, *a2a, arch=arch)
    err = capfd.readouterr().err
    assert "cuda graphs: captured" in err, err
    assert "not torn down" not in err, err  # the graphs were freed before NCCL's teardown
    eager = launch(tp, prompts, params, *a2a, "--disable-cuda-graph", arch=arch)
    # a graph's expert GEMMs and DeepSeek's token shards run at the bucket's row count, not
    # the step's: rounding moves bf16 logprobs by a few ulps (1/32 each in [4, 8)); 4 ulps
    assert_same_tokens(graphs, eager, tol=0.125)
