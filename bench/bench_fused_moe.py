"""Fused MoE on CUDA: Triton grouped GEMM vs the torch reference path, bf16.

Checks both against an fp32 reference, then times them (median of triton.testing.do_bench)
and reports the bandwidth over the touched expert weights. Run with PYTHONPATH=. :

    python bench/bench_fused_moe.py --out fused_moe.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from functools import partial

import torch

from models.layers.fused_moe import HAS_TRITON, fused_experts_torch, fused_experts_triton

SHAPES = {
    # per-rank expert shapes: (hidden, intermediate, local experts, top-k)
    "qwen3-30b-a3b": (2048, 768, 128, 8),
    "deepseek-v3-subset": (7168, 2048, 32, 8),
}
TOKENS = (1, 2, 4, 8, 16, 32, 64, 256)
MAX_REL_ERR = 1e-2
DEVICE = "cuda"


def make_experts(h: int, inter: int, e: int, gen: torch.Generator):
    w13 = torch.randn(e, 2 * inter, h, generator=gen, device=DEVICE, dtype=torch.bfloat16)
    w2 = torch.randn(e, h, inter, generator=gen, device=DEVICE, dtype=torch.bfloat16)
    return w13.mul_(h**-0.5), w2.mul_(inter**-0.5)


def route(t: int, e: int, k: int, gen: torch.Generator):
    logits = torch.randn(t, e, generator=gen, device=DEVICE)
    weights, ids = logits.softmax(-1).topk(k, dim=-1)
    return weights / weights.sum(-1, keepdim=True), ids


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.float() - ref).norm() / ref.norm()).item()


def median_ms(fn) -> float:
    import triton.testing

    return triton.testing.do_bench(fn, warmup=10, rep=50, return_mode="median")


def bench_shape(name: str, tokens: tuple[int, ...], gen: torch.Generator) -> list[dict]:
    h, inter, e, k = SHAPES[name]
    w13, w2 = make_experts(h, inter, e, gen)
    w13_ref, w2_ref = w13.float(), w2.float()
    bytes_per_expert = (w13[0].numel() + w2[0].numel()) * w13.element_size()
    rows = []
    for t in tokens:
        x = torch.randn(t, h, generator=gen, device=DEVICE, dtype=torch.bfloat16)
        weights, ids = route(t, e, k, gen)
        start = time.perf_counter()
        out = fused_experts_triton(x, w13, w2, weights, ids)  # first call compiles and tunes
        torch.cuda.synchronize()
        first_call_s = time.perf_counter() - start
        ref = fused_experts_torch(x.float(), w13_ref, w2_ref, weights, ids)
        err_triton = rel_err(out, ref)
        err_torch = rel_err(fused_experts_torch(x, w13, w2, weights, ids), ref)
        ms_triton = median_ms(partial(fused_experts_triton, x, w13, w2, weights, ids))
        ms_torch = median_ms(partial(fused_experts_torch, x, w13, w2, weights, ids))
        touched = ids.unique().numel() * bytes_per_expert
        rows.append(
            dict(
                shape=name, hidden=h, intermediate=inter, experts=e, top_k=k, tokens=t,
                touched_experts=ids.unique().numel(), touched_bytes=touched,
                triton_ms=ms_triton, torch_ms=ms_torch, speedup=ms_torch / ms_triton,
                triton_gbps=touched / ms_triton / 1e6, torch_gbps=touched / ms_torch / 1e6,
                rel_err_triton=err_triton, rel_err_torch=err_torch,
                first_call_s=first_call_s, ok=err_triton < MAX_REL_ERR,
            )
        )  # fmt: skip
        r = rows[-1]
        print(
            f"{name:>20} {t:>5} {r['touched_experts']:>4} {ms_triton:>9.4f} {ms_torch:>9.4f} "
            f"{r['speedup']:>7.2f} {r['triton_gbps']:>8.0f} {r['torch_gbps']:>8.0f} "
            f"{err_triton:>9.2e} {err_torch:>9.2e} {first_call_s:>6.1f}"
            + ("" if r["ok"] else "  FAIL"),
            flush=True,
        )
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="bench_fused_moe.json", help="JSON results path")
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--tokens", nargs="+", type=int, default=list(TOKENS))
    args = parser.parse_args(argv)
    if not (torch.cuda.is_available() and HAS_TRITON):
        print("needs CUDA and triton", file=sys.stderr)
        return 2
    import triton

    torch.backends.cuda.matmul.allow_tf32 = False  # the fp32 reference must be fp32
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    start = time.perf_counter()
    print(
        f"{'shape':>20} {'T':>5} {'exp':>4} {'triton_ms':>9} {'torch_ms':>9} {'speedup':>7} "
        f"{'tri_GB/s':>8} {'tor_GB/s':>8} {'err_tri':>9} {'err_tor':>9} {'1st_s':>6}"
    )
    rows = []
    for name in args.shapes:
        rows += bench_shape(name, tuple(args.tokens), gen)
        torch.cuda.empty_cache()  # the previous shape's weights are garbage now
    result = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "dtype": "bfloat16",
        "max_rel_err": MAX_REL_ERR,
        "wall_s": time.perf_counter() - start,
        "ok": all(r["ok"] for r in rows),
        "rows": rows,
    }
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(f"wrote {args.out} in {result['wall_s']:.1f}s; ok={result['ok']}")
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
