"""One rank's model: built from the registry, its KV cache and attention backend, and one
forward step at a time."""

from __future__ import annotations

import gc
import itertools

import attrs
import torch

from engine.attention.registry import make_backend
from engine.messages import Launch
from engine.model_api.contract import ModelContext, MoeSettings
from engine.model_api.forward_batch import ForwardBatch, ForwardMode
from engine.model_api.parallel import ParallelState
from engine.runtime.graph_runner import GraphRunner
from engine.runtime.kv_cache import SINK_SLOT, KVPool, ReqToTokenPool
from engine.runtime.loader import build_model, iter_checkpoint, load_model, random_weights
from engine.runtime.sampling import sample
from engine.runtime.scheduler import Batch
from engine.runtime.step_layout import StepLayout, StepLayouter, capture_sizes, round_up
from registry import ParallelPlan, get_model_class


def gathered_buffer(
    plan: ParallelPlan, sizes: list[int], max_bs: int, hidden: int, dtype, device
) -> torch.Tensor | None:
    """Allocated once, when the plan asks for it, for the largest step a graph can take in
    the layout the gather needs (every attention-DP group's rows under mlp_tp_gather)."""
    if not plan.gathered_buffer.value:
        return None
    largest = sizes[-1] if sizes else round_up(max_bs, plan.token_alignment)
    groups = plan.attn_dp_size if plan.mlp_tp_gather.value else 1
    return torch.empty((largest * groups, hidden), dtype=dtype, device=device)


class ModelRunner:
    def __init__(self, launch: Launch, parallel: ParallelState) -> None:
        args, plan, source = launch.args, launch.plan, launch.source
        self.plan = plan
        self.parallel = parallel
        self.device = parallel.device
        self.dtype = getattr(torch, args.resolved_dtype)
        config = source.namespace
        cls = get_model_class(source.architecture)
        ctx = ModelContext(parallel, MoeSettings.from_args(args))
        self.model = build_model(cls, config, ctx, self.dtype)
        if source.path is None:
            weights = random_weights(cls.checkpoint_shapes(config), args.seed)
        else:
            weights = iter_checkpoint(source.path)
        load_model(self.model, weights)
        self.kv = KVPool(
            args.max_total_tokens, self.model.kv_cache_shapes(), self.dtype, self.device
        )
        width = min(source.context_len, args.max_total_tokens)
        self.table = ReqToTokenPool(args.max_running_requests, width, self.device)
        # CPU pads as a CUDA-graph run would, whatever --disable-cuda-graph says
        disabled = args.disable_cuda_graph and self.device.type == "cuda"
        sizes = [] if disabled else capture_sizes(args.cuda_graph_max_bs, plan.token_alignment)
        self.layouter = StepLayouter(plan, sizes, parallel)
        self.gathered_buffer = gathered_buffer(
            plan, sizes, args.cuda_graph_max_bs, config.hidden_size, self.dtype, self.device
        )
        self.graphs = GraphRunner(sizes, self.device, leader=parallel.rank == 0)
        max_slots = self.kv.num_slots + 1 + max(sizes, default=0)
        self.backend = make_backend(
            args.attention_backend, self.model.attention_spec(), self.dtype, self.device, max_slots
        )
        self.graphs.capture(self.model.forward, self.graph_batch)
        # Startup leaves a large heap of long-lived objects (torch, kernels, modules); frozen,
        # a collection that lands in a decode step scans only what the steps allocate.
        gc.collect()
        gc.freeze()

    @property
    def gathered_buffer_bytes(self) -> int:
        b = self.gathered_buffer
        return 0 if b is None else b.numel() * b.element_size()

    def prepare(self, batch: Batch | None, layout: StepLayout) -> ForwardBatch:
        """The step's rows: each request's new tokens, then padding up to `layout.rows`."""
        ids, positions, slots, seq_lens, extend_lens = [], [], [], [], []
        for seq in batch.seqs if batch else []:
            start = 0 if batch.mode is ForwardMode.EXTEND else len(seq) - 1
            ids += seq.token_ids[start:]
            positions += range(start, len(seq))
            slots += seq.slots[start : len(seq)]
            seq_lens.append(len(seq))
            extend_lens.append(len(seq) - start)
        pad = layout.rows - len(ids)
        as_tensor = lambda values: torch.tensor(values, dtype=torch.int64, device=self.device)
        return ForwardBatch(
            mode=layout.mode,
            input_ids=as_tensor(ids + [0] * pad),
            positions=as_tensor(positions + [0] * pad),
            out_cache_loc=as_tensor(slots + [SINK_SLOT] * pad),
            req_pool_indices=as_tensor([s.row for s in batch.seqs] if batch else []),
            seq_lens=seq_lens,
            extend_lens=extend_lens,
            num_tokens=layout.num_tokens,
            sample_rows=as_tensor([end - 1 for end in itertools.accumulate(extend_lens)]),
            kv_pool=self.kv,
            req_to_token=self.table.table,
            attn_backend=self.backend,
            num_token_non_padded=layout.num_token_non_padded,
            gathered_buffer=self.gathered_buffer,
            global_num_tokens=list(layout.group_rows),
            max_rows_per_rank=layout.max_rows_per_rank,
            attn_tp_gather=self.plan.attn_tp_gather.value,
            mlp_tp_gather=self.plan.mlp_tp_gather.value,
        )

    def graph_batch(self, rows: int) -> ForwardBatch:
        """The decode step a CUDA graph of `rows` rows is recorded on: every row a real
        one-token request at the sink slot (see `StepLayouter.capture`)."""
        layout = self.layouter.capture(rows, self.plan.attn_dp_size)
        idle = self.prepare(None, attrs.evolve(layout, mode=ForwardMode.IDLE, num_tokens=0))
        return attrs.evolve(
            idle,
            mode=ForwardMode.DECODE,
            req_pool_indices=torch.zeros(rows, dtype=torch.int64, device=self.device),
            seq_lens=[1] * rows,
            extend_lens=[1] * rows,
            num_tokens=rows,
            sample_rows=torch.arange(rows, device=self.device),
            num_token_non_padded=layout.num_token_non_padded,
        )

    @torch.inference_mode()
    def step(self, batch: Batch | None, layout: StepLayout) -> tuple[list[int], list[float]]:
        """Run one forward (an idle one when `batch` is None); sampled tokens and logprobs."""
        fb = self.prepare(batch, layout)
        logits = self.graphs.run(self.model.forward, fb, layout)
        if batch is None:
            return [], []
        return sample(logits, batch.seqs)
