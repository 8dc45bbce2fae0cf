"""Step padding, the gathered buffer and CUDA graphs, as the plan decides.

Decode steps that fit a capture size are padded to the smallest one (what a CUDA graph
replay runs); other steps are padded to `plan.token_alignment` only. On CUDA one graph is
recorded per capture size and replayed for the decode steps padded to it; everything else
runs eagerly. On CPU the same padding runs eagerly, so every plan is testable without a GPU.
"""

from __future__ import annotations

import sys
import time
import warnings
from collections.abc import Callable

import torch

from engine.distributed import get_parallel
from engine.forward_batch import ForwardBatch, ForwardMode
from engine.progress import Progress

Forward = Callable[[ForwardBatch], torch.Tensor]
BASE_SIZES = (1, 2, 4, 8)
SIZE_STEP = 8
# Eager runs before each capture: the first compiles kernels (FlashInfer JIT, Triton
# autotuning) and creates NCCL communicators, none of which can happen inside a capture.
WARMUPS = 2


def round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def capture_sizes(max_bs: int, alignment: int) -> list[int]:
    """1, 2, 4, 8, then every multiple of 8 up to `max_bs`, each rounded up to `alignment`."""
    raw = [s for s in BASE_SIZES if s < max_bs] + list(range(SIZE_STEP, max_bs, SIZE_STEP))
    return sorted({round_up(s, alignment) for s in [*raw, max_bs]})


class GraphRunner:
    def __init__(
        self,
        plan: object,
        max_bs: int,
        disable: bool,
        hidden_size: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        self.plan = plan
        self.alignment = plan.token_alignment
        self.sizes = [] if disable else capture_sizes(max_bs, self.alignment)
        self.buffer: torch.Tensor | None = None
        if plan.gathered_buffer.value:
            largest = self.sizes[-1] if self.sizes else round_up(max_bs, self.alignment)
            groups = plan.attn_dp_size if plan.mlp_tp_gather.value else 1
            self.buffer = torch.empty((largest * groups, hidden_size), dtype=dtype, device=device)
        self.padding_tokens = 0
        self.device = torch.device(device)
        self.graphs: dict[int, CapturedStep] = {}

    @property
    def buffer_bytes(self) -> int:
        return 0 if self.buffer is None else self.buffer.numel() * self.buffer.element_size()

    def can_run(self, num_tokens: int, is_decode: bool) -> bool:
        """Whether a step of this group could replay a captured graph (idle steps can)."""
        return is_decode and bool(self.sizes) and num_tokens <= self.sizes[-1]

    def padded(self, num_tokens: int, graph_tokens: int | None) -> int:
        """Rows of a step: the bucket of `graph_tokens` on a graph step, else aligned."""
        if graph_tokens is not None:
            return next(s for s in self.sizes if s >= graph_tokens)
        return round_up(num_tokens, self.alignment)

    def count_padding(self, group_tokens: list[int]) -> None:
        """Add the rows that alignment alone adds to each attention-DP group's tokens."""
        self.padding_tokens += sum(round_up(n, self.alignment) - n for n in group_tokens)

    def capture(
        self, forward: Forward, make_batch: Callable[[int], ForwardBatch] | None = None
    ) -> None:
        """On CUDA, record one graph per capture size, largest first so that the smaller
        ones reuse its memory pool; `make_batch(rows)` gives the decode step each is
        recorded on. Steps run eagerly, with the same padding, on CPU, with an attention
        backend that cannot be captured, and for a forward that waits on the host (an
        all-to-all whose split sizes depend on the routing does): the warm-up finds out."""
        if self.device.type != "cuda" or not self.sizes or make_batch is None:
            return
        largest = make_batch(self.sizes[-1])
        backend = largest.attn_backend
        if not getattr(backend, "supports_cuda_graph", False):
            _say(f"cuda graphs: off ({type(backend).__name__} cannot be captured)")
            return
        start = time.monotonic()
        bar = Progress("capturing cuda graphs", len(self.sizes), "sizes") if _leader() else None
        pool = torch.cuda.graph_pool_handle()
        with torch.inference_mode():
            for rows in reversed(self.sizes):
                batch = largest if rows == self.sizes[-1] else make_batch(rows)
                for _ in range(WARMUPS):
                    backend.prepare_graph(batch)
                    forward(batch)
                if rows == self.sizes[-1] and (reason := host_sync(forward, batch)):
                    if bar:
                        bar.close()
                    _say(f"cuda graphs: off ({reason}); decode steps run eagerly")
                    return
                self.graphs[rows] = CapturedStep.record(forward, batch, pool)
                if bar:
                    bar.update()
        if bar:
            bar.close()
        _say(
            f"cuda graphs: captured {len(self.graphs)} sizes ({self.sizes[0]}..{self.sizes[-1]}"
            f" rows) in {time.monotonic() - start:.1f}s"
        )

    def run(self, forward: Forward, batch: ForwardBatch) -> torch.Tensor:
        """Logits of one step: a replay of the graph of its rows for a decode (or idle) step
        that every attention-DP group pads alike, else the backend prepared and an eager
        forward."""
        same_rows = all(n == batch.rows for n in batch.global_num_tokens or [batch.rows])
        step = None
        if batch.mode is not ForwardMode.EXTEND and same_rows:
            step = self.graphs.get(batch.rows)
        if step is None:
            batch.attn_backend.prepare(batch)
            return forward(batch)
        return step.replay(batch)

    def release(self) -> None:
        """Free the graphs before the process group goes: NCCL's communicator destroy waits
        forever on a live graph that captured its collectives (pytorch/pytorch#115388)."""
        if not self.graphs:
            return
        torch.cuda.synchronize(self.device)
        for step in self.graphs.values():
            step.graph.reset()
        self.graphs.clear()


class CapturedStep:
    """One recorded decode step: the static batch it was recorded on (a replay copies the
    step's token ids, positions and KV slots into it; the backend re-plans its metadata in
    place) and the logits it writes, one row per padded row."""

    def __init__(self, graph: torch.cuda.CUDAGraph, batch: ForwardBatch, logits: torch.Tensor):
        self.graph, self.batch, self.logits = graph, batch, logits

    @classmethod
    def record(cls, forward: Forward, batch: ForwardBatch, pool: object) -> CapturedStep:
        graph = torch.cuda.CUDAGraph()
        batch.attn_backend.prepare_graph(batch)
        torch.cuda.synchronize()
        try:
            with torch.cuda.graph(graph, pool=pool):
                logits = forward(batch)
        except RuntimeError as e:
            raise RuntimeError(
                f"CUDA graph capture of {batch.rows} rows failed ({' '.join(str(e).split())});"
                " run with --disable-cuda-graph"
            ) from e
        return cls(graph, batch, logits)

    def replay(self, batch: ForwardBatch) -> torch.Tensor:
        static = self.batch
        static.input_ids.copy_(batch.input_ids)
        static.positions.copy_(batch.positions)
        static.out_cache_loc.copy_(batch.out_cache_loc)
        batch.attn_backend.prepare_graph(batch)
        self.graph.replay()
        return self.logits[: batch.batch_size]


def host_sync(forward: Forward, batch: ForwardBatch) -> str | None:
    """Runs `forward` once with host synchronisation forbidden: why it cannot be captured
    (it waits on the device from the host), or None."""
    batch.attn_backend.prepare_graph(batch)
    torch.cuda.synchronize()
    previous = torch.cuda.get_sync_debug_mode()
    with warnings.catch_warnings():  # "a prototype feature": it is used as a probe only
        warnings.simplefilter("ignore", UserWarning)
        torch.cuda.set_sync_debug_mode("error")
    try:
        forward(batch)
    except RuntimeError as e:
        if "synchroniz" not in str(e):
            raise
        return "the forward waits on the host: " + str(e).splitlines()[0]
    finally:
        torch.cuda.set_sync_debug_mode(previous)
    return None


def _leader() -> bool:
    return get_parallel().rank == 0


def _say(line: str) -> None:
    if _leader():
        print(line, file=sys.stderr, flush=True)
