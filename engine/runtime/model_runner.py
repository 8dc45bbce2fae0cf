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
from engine.runtime.sampling import sample_on_device
from engine.runtime.scheduler import Batch
from engine.runtime.step_io import SampledStep, TokenBoard
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
        if source.path is None or args.load_format == "dummy":
            # drawn on a GPU where there is one: seconds for a real model's size
            where = self.device if self.device.type == "cuda" else None
            weights = random_weights(cls.checkpoint_shapes(config), args.seed, where)
        else:
            weights = iter_checkpoint(source.path)
        load_model(self.model, weights)
        self.kv = KVPool(
            args.max_total_tokens, self.model.kv_cache_shapes(), self.dtype, self.device
        )
        width = min(source.context_len, args.max_total_tokens)
        self.table = ReqToTokenPool(args.max_running_requests, width, self.device)
        self.board = TokenBoard(args.max_running_requests, self.device)
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
        """The step's rows: each request's new tokens, then padding up to `layout.rows`.

        A decode step's input ids are gathered on the device from the token board (each
        request's latest sampled token, which the host may not have read yet); everything
        else is built here and sent in one copy that does not wait for the device."""
        seqs = batch.seqs if batch else []
        decode = batch is not None and batch.mode is ForwardMode.DECODE
        ids, positions, slots, seq_lens, extend_lens = [], [], [], [], []
        for seq in seqs:
            context = seq.total - 1  # the step's own output is already counted in flight
            start = context - 1 if decode else 0
            ids += [seq.row] if decode else seq.token_ids[start:context]
            positions += range(start, context)
            slots += seq.slots[start:context]
            seq_lens.append(context)
            extend_lens.append(context - start)
        pad = layout.rows - len(positions)
        ids += [self.board.pad_row if decode else 0] * pad
        rows = [s.row for s in seqs]
        sample_rows = [end - 1 for end in itertools.accumulate(extend_lens)]
        host = torch.tensor(
            [*ids, *positions, *[0] * pad, *slots, *[SINK_SLOT] * pad, *rows, *sample_rows,
             *seq_lens, layout.num_token_non_padded, layout.num_tokens],
            dtype=torch.int64,
        )  # fmt: skip
        flat = host.to(self.device, non_blocking=True)
        n, bs = layout.rows, len(seqs)
        ids_t, pos_t, slots_t, rows_t, sample_t, lens_t, real_t = flat.split(
            [n, n, n, bs, bs, bs, 2]
        )
        return ForwardBatch(
            mode=layout.mode,
            input_ids=self.board.read(ids_t) if decode else ids_t,
            positions=pos_t,
            out_cache_loc=slots_t,
            req_pool_indices=rows_t,
            seq_lens=seq_lens,
            extend_lens=extend_lens,
            num_tokens=layout.num_tokens,
            sample_rows=sample_t,
            kv_pool=self.kv,
            req_to_token=self.table.table,
            attn_backend=self.backend,
            num_token_non_padded=layout.num_token_non_padded,
            gathered_buffer=self.gathered_buffer,
            global_num_tokens=list(layout.group_rows),
            max_rows_per_rank=layout.max_rows_per_rank,
            attn_tp_gather=self.plan.attn_tp_gather.value,
            mlp_tp_gather=self.plan.mlp_tp_gather.value,
            seq_lens_tensor=lens_t,
            real_rows=real_t,
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
            seq_lens_tensor=torch.ones(rows, dtype=torch.int64, device=self.device),
            real_rows=torch.tensor([layout.num_token_non_padded, rows], device=self.device),
        )

    @torch.inference_mode()
    def launch(self, batch: Batch | None, layout: StepLayout) -> SampledStep | None:
        """Run one forward (an idle one when `batch` is None) and sample it, without waiting
        for the device: the tokens go to the board for the next step and to the host."""
        fb = self.prepare(batch, layout)
        logits = self.graphs.run(self.model.forward, fb, layout)
        if batch is None:
            return None
        tokens, logprobs = sample_on_device(logits, batch.seqs)
        self.board.write(fb.req_pool_indices, tokens)
        drawn = any(not seq.params.greedy for seq in batch.seqs)
        return SampledStep(tokens, logprobs, must_wait=drawn)

    def step(self, batch: Batch | None, layout: StepLayout) -> tuple[list[int], list[float]]:
        """`launch`, then wait for the tokens (the synchronous step)."""
        sampled = self.launch(batch, layout)
        return ([], []) if sampled is None else sampled.resolve()
