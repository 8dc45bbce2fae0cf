"""One rank's model: built from the registry, its KV cache, and one forward step at a time."""

from __future__ import annotations

import gc
import itertools
import json
import types
from pathlib import Path
from typing import Any

import attrs
import torch
from attrs import frozen

from engine.communicator import MoeSettings, use_moe_settings
from engine.distributed import ParallelState
from engine.forward_batch import ForwardBatch, ForwardMode
from engine.graph_runner import GraphRunner
from engine.kv_cache import SINK_SLOT, KVPool, ReqToTokenPool
from engine.loader import build_model, iter_checkpoint, load_model, random_weights
from engine.model_config import config_from_dict
from engine.sampling import sample
from engine.scheduler import Batch
from registry import get_model_class


class ModelSourceError(ValueError):
    """A model that cannot be located or described; reported before any rank starts."""


@frozen
class ModelSource:
    """Which class to build and from what: picklable, sent to every rank."""

    architecture: str
    config: dict[str, Any]  # config.json, or the class's tiny_config()
    path: str | None  # checkpoint directory; None means seeded random weights

    @property
    def namespace(self) -> types.SimpleNamespace:
        return config_from_dict(self.config)

    @property
    def context_len(self) -> int:
        return int(self.config.get("max_position_embeddings", 2048))


def model_source(model: str | None, model_path: str | None) -> ModelSource:
    """From `--model ARCH` (embedded tiny config) or `--model-path DIR` (its config.json)."""
    if model_path is None:
        return ModelSource(model, dict(get_model_class(model).tiny_config()), None)
    file = Path(model_path) / "config.json"
    if not file.is_file():
        raise ModelSourceError(f"{model_path}: no config.json there (is it a checkpoint folder?)")
    config = _read_json(file)
    archs = config.get("architectures")
    if not archs or not isinstance(archs[0], str):
        raise ModelSourceError(f"{file}: no 'architectures' list naming the model class")
    get_model_class(archs[0])
    # generation stops where transformers' generate stops: generation_config.json first
    generation = Path(model_path) / "generation_config.json"
    if generation.is_file():
        eos = _read_json(generation).get("eos_token_id")
        if eos is not None:
            config["eos_token_id"] = eos
    return ModelSource(archs[0], config, str(model_path))


def _read_json(file: Path) -> dict[str, Any]:
    try:
        value = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelSourceError(f"{file}: not valid JSON ({e})") from None
    if not isinstance(value, dict):
        raise ModelSourceError(f"{file}: expected a JSON object")
    return value


def num_token_non_padded(
    n: int, rows: int, attn_tp_rank: int, attn_tp_size: int, shard_local: bool
) -> int:
    """Real rows among this rank's model input: all `n`, or, when the step's `rows` are
    split evenly across attention-TP ranks, the real ones in this rank's shard."""
    if not shard_local:
        return n
    shard = rows // attn_tp_size
    return min(max(n - attn_tp_rank * shard, 0), shard)


def attention_backend(
    model: torch.nn.Module, device: torch.device, dtype: torch.dtype, max_slots: int
) -> object:
    """FlashInfer on CUDA where it serves the model's attention layers (decode then runs in
    CUDA graphs); the torch backend otherwise. `max_slots` bounds the KV slots one graph
    step reads (the pool's, plus one sink slot per padding row)."""
    from models.layers.attention import TorchAttentionBackend

    if device.type == "cuda":
        from models.layers import flashinfer_backend

        if flashinfer_backend.available():
            backend = flashinfer_backend.backend_for(model, dtype, max_slots)
            if backend is not None:
                return backend
    return TorchAttentionBackend()


class ModelRunner:
    def __init__(
        self,
        source: ModelSource,
        args: Any,
        plan: Any,
        parallel: ParallelState,
    ) -> None:
        self.plan = plan
        self.parallel = parallel
        self.device = parallel.device
        self.dtype = getattr(torch, args.resolved_dtype)
        config = source.namespace
        cls = get_model_class(source.architecture)
        with use_moe_settings(MoeSettings.from_args(args)):
            self.model = build_model(cls, config, self.dtype, self.device)
        if source.path is None:
            weights = random_weights(cls.checkpoint_shapes(config), args.seed)
        else:
            weights = iter_checkpoint(source.path)
        load_model(self.model, weights)
        shapes = self.model.kv_cache_shapes()
        self.kv = KVPool(args.max_total_tokens, shapes, self.dtype, self.device)
        width = min(source.context_len, args.max_total_tokens)
        self.table = ReqToTokenPool(args.max_running_requests, width, self.device)
        # CPU pads as a CUDA-graph run would, whatever --disable-cuda-graph says
        self.graphs = GraphRunner(
            plan,
            args.cuda_graph_max_bs,
            args.disable_cuda_graph and self.device.type == "cuda",
            config.hidden_size,
            self.dtype,
            self.device,
        )
        max_slots = self.kv.num_slots + 1 + max(self.graphs.sizes, default=0)
        self.backend = attention_backend(self.model, self.device, self.dtype, max_slots)
        # DESIGN.md: never shard-local for a model that shards tokens itself
        self.shard_local = plan.attn_tp_gather.value and not plan.capabilities.self_managed_sp
        self.graphs.capture(self.model.forward, self.graph_batch)
        # Startup leaves a large heap of long-lived objects (torch, kernels, modules); frozen,
        # a collection that lands in a decode step scans only what the steps allocate.
        gc.collect()
        gc.freeze()

    def prepare(self, batch: Batch | None, rows: int, global_rows: list[int]) -> ForwardBatch:
        """The step's rows: each request's new tokens, then padding up to `rows`."""
        ids, positions, slots, seq_lens, extend_lens = [], [], [], [], []
        for seq in batch.seqs if batch else []:
            start = 0 if batch.mode is ForwardMode.EXTEND else len(seq) - 1
            ids += seq.token_ids[start:]
            positions += range(start, len(seq))
            slots += seq.slots[start : len(seq)]
            seq_lens.append(len(seq))
            extend_lens.append(len(seq) - start)
        n = len(ids)
        pad = rows - n
        as_tensor = lambda values: torch.tensor(values, dtype=torch.int64, device=self.device)
        return ForwardBatch(
            mode=batch.mode if batch else ForwardMode.IDLE,
            input_ids=as_tensor(ids + [0] * pad),
            positions=as_tensor(positions + [0] * pad),
            out_cache_loc=as_tensor(slots + [SINK_SLOT] * pad),
            req_pool_indices=as_tensor([s.row for s in batch.seqs] if batch else []),
            seq_lens=seq_lens,
            extend_lens=extend_lens,
            num_tokens=n,
            sample_rows=as_tensor([end - 1 for end in itertools.accumulate(extend_lens)]),
            kv_pool=self.kv,
            req_to_token=self.table.table,
            attn_backend=self.backend,
            num_token_non_padded=num_token_non_padded(
                n, rows, self.parallel.attn_tp_rank, self.parallel.attn_tp_size, self.shard_local
            ),
            gathered_buffer=self.graphs.buffer,
            global_num_tokens=global_rows,
            attn_tp_gather=self.plan.attn_tp_gather.value,
            mlp_tp_gather=self.plan.mlp_tp_gather.value,
        )

    def graph_batch(self, rows: int) -> ForwardBatch:
        """The decode step a CUDA graph of `rows` rows is recorded on: every row a real
        one-token request at the sink slot, so that nothing the model derives from the
        batch's counts (num_tokens, num_token_non_padded) masks rows out of the graph."""
        idle = self.prepare(None, rows, [rows] * self.plan.attn_dp_size)  # static tensors
        return attrs.evolve(
            idle,
            mode=ForwardMode.DECODE,
            req_pool_indices=torch.zeros(rows, dtype=torch.int64, device=self.device),
            seq_lens=[1] * rows,
            extend_lens=[1] * rows,
            num_tokens=rows,
            sample_rows=torch.arange(rows, device=self.device),
            num_token_non_padded=num_token_non_padded(
                rows, rows, self.parallel.attn_tp_rank, self.parallel.attn_tp_size, self.shard_local
            ),
        )

    @torch.inference_mode()
    def step(
        self, batch: Batch | None, rows: int, global_rows: list[int]
    ) -> tuple[list[int], list[float]]:
        """Run one forward (an idle one when `batch` is None); sampled tokens and logprobs."""
        fb = self.prepare(batch, rows, global_rows)
        logits = self.graphs.run(self.model.forward, fb)  # prepares the backend when eager
        if batch is None:
            return [], []
        return sample(logits, batch.seqs)
