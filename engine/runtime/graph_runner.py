"""CUDA graphs of decode steps: one recorded per capture size, replayed for the steps whose
layout says so; everything else (CPU, prefill, sizes above the largest, a backend that
cannot be captured, a forward that waits on the host) runs eagerly."""

from __future__ import annotations

import sys
import time
import warnings
from collections.abc import Callable

import torch
from tqdm import tqdm

from engine.model_api.forward_batch import ForwardBatch
from engine.runtime.step_layout import StepLayout

Forward = Callable[[ForwardBatch], torch.Tensor]
# Eager runs before each capture: the first compiles kernels (FlashInfer JIT, Triton
# autotuning) and creates NCCL communicators, none of which can happen inside a capture.
WARMUPS = 2


class GraphRunner:
    def __init__(self, sizes: list[int], device: torch.device, leader: bool) -> None:
        self.sizes = sizes
        self.device = torch.device(device)
        self.leader = leader  # says what happened on stderr
        self.graphs: dict[int, CapturedStep] = {}

    def capture(self, forward: Forward, make_batch: Callable[[int], ForwardBatch]) -> None:
        """On CUDA, record one graph per capture size, largest first so that the smaller
        ones reuse its memory pool; `make_batch(rows)` gives the decode step each is
        recorded on. The warm-up finds out whether the forward can be captured."""
        if self.device.type != "cuda" or not self.sizes:
            return
        largest = make_batch(self.sizes[-1])
        backend = largest.attn_backend
        if not backend.supports_cuda_graph:
            self._say(f"cuda graphs: off (the {backend.name} attention backend cannot be captured)")
            return
        start = time.monotonic()
        bar = (
            tqdm(total=len(self.sizes), desc="capturing cuda graphs", disable=None)
            if self.leader
            else None
        )
        pool = torch.cuda.graph_pool_handle()
        with torch.inference_mode():
            for rows in reversed(self.sizes):
                batch = largest if rows == self.sizes[-1] else make_batch(rows)
                for _ in range(WARMUPS):
                    backend.plan_capture(batch)
                    forward(batch)
                if rows == self.sizes[-1] and (reason := host_sync(forward, batch)):
                    if bar:
                        bar.close()
                    self._say(f"cuda graphs: off ({reason}); decode steps run eagerly")
                    return
                self.graphs[rows] = CapturedStep.record(forward, batch, pool)
                if bar:
                    bar.update()
        if bar:
            bar.close()
        self._say(
            f"cuda graphs: captured {len(self.graphs)} sizes ({self.sizes[0]}..{self.sizes[-1]}"
            f" rows) in {time.monotonic() - start:.1f}s"
        )

    def run(self, forward: Forward, batch: ForwardBatch, layout: StepLayout) -> torch.Tensor:
        """Logits of one step: a replay of the graph of its rows when the layout says so and
        one was captured, else the backend planned and an eager forward."""
        step = self.graphs.get(layout.rows) if layout.use_graph else None
        if step is None:
            batch.attn_backend.plan(batch)
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

    def _say(self, line: str) -> None:
        if self.leader:
            print(line, file=sys.stderr, flush=True)


class CapturedStep:
    """One recorded decode step: the static batch it was recorded on (a replay copies the
    step's token ids, positions and KV slots into it; the backend re-plans its metadata in
    place) and the logits it writes, one row per padded row."""

    def __init__(self, graph: torch.cuda.CUDAGraph, batch: ForwardBatch, logits: torch.Tensor):
        self.graph, self.batch, self.logits = graph, batch, logits

    @classmethod
    def record(cls, forward: Forward, batch: ForwardBatch, pool: object) -> CapturedStep:
        graph = torch.cuda.CUDAGraph()
        batch.attn_backend.plan_capture(batch)
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
        static.real_rows.copy_(batch.real_rows)
        batch.attn_backend.plan_replay(batch)
        self.graph.replay()
        return self.logits[: batch.batch_size]


def host_sync(forward: Forward, batch: ForwardBatch) -> str | None:
    """Runs `forward` once with host synchronisation forbidden: why it cannot be captured
    (it waits on the device from the host), or None."""
    batch.attn_backend.plan_capture(batch)
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
