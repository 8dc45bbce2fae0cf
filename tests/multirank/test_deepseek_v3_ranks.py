"""DeepseekV3ForCausalLM's layers on two spawned gloo ranks: they shard the group's token
count themselves, so the plan must hand them the group's count (SGLang #38606)."""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.multiprocessing as mp

from engine.attention.torch_backend import TorchAttentionBackend
from engine.model_api import ForwardBatch, ForwardMode, MoeSettings
from engine.runtime.kv_cache import KVPool, ReqToTokenPool
from engine.runtime.process_groups import destroy_parallel, init_parallel
from models.deepseek_v3 import DeepseekV3ForCausalLM
from tests.support.batches import make_batch
from tests.support.deepseek_v3 import tiny_random_model
from tests.support.engine import free_port
from tests.support.models import rank_context


def prefill(model: DeepseekV3ForCausalLM, ids: list[int], rows: int, count: int) -> ForwardBatch:
    """One request's prefill padded to `rows`, with `num_token_non_padded` = `count`."""
    kv = KVPool(rows + 1, model.kv_cache_shapes(), torch.float32, torch.device("cpu"))
    table = ReqToTokenPool(1, rows, torch.device("cpu"))
    table.write(0, 0, kv.alloc(len(ids)))
    batch = make_batch(
        ForwardMode.EXTEND,
        len(ids),
        rows=rows,
        input_ids=ids,
        positions=range(len(ids)),
        slots=table.table[0, : len(ids)].tolist(),
        req_rows=[0],
        seq_lens=[len(ids)],
        extend_lens=[len(ids)],
        kv_pool=kv,
        req_to_token=table.table,
        backend=TorchAttentionBackend(),
        num_token_non_padded=count,
    )
    batch.attn_backend.plan(batch)
    return batch


SHARD_IDS = list(b"sharded")  # 7 real rows, padded to 8 as `--attn-tp-gather on` pads at A = 2


def final_hidden(model: DeepseekV3ForCausalLM, count: int) -> torch.Tensor:
    with torch.inference_mode():
        return model.model(prefill(model, SHARD_IDS, 8, count))


def shard_count_worker(rank: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    init_parallel(rank, 2, 1, torch.device("cpu"), f"tcp://127.0.0.1:{port}", 60)
    try:
        model = tiny_random_model(rank_context(MoeSettings("all2all")))
        n, shard = len(SHARD_IDS), 8 // 2
        # what SGLang's adjust_num_token_non_padded_for_attn_tp hands a rank
        local = min(max(n - rank * shard, 0), shard)
        out = {"global": final_hidden(model, n), "shard_local": final_hidden(model, local)}
        torch.save(out, Path(out_dir) / f"rank{rank}.pt")
    finally:
        destroy_parallel()


def test_layers_shard_the_global_token_count_and_a_shard_local_one_would_break(tmp_path):
    """At attention-TP 2 with all-to-all experts, the global count gives tp-1 hidden states
    on both ranks; a shard-local count (what the engine must never pass this model) makes
    the layers compute only part of the rows."""
    mp.spawn(shard_count_worker, args=(free_port(), str(tmp_path)), nprocs=2, join=True)
    single = final_hidden(tiny_random_model(), len(SHARD_IDS))[: len(SHARD_IDS)]
    for rank in (0, 1):
        out = torch.load(tmp_path / f"rank{rank}.pt")
        torch.testing.assert_close(out["global"][: len(SHARD_IDS)], single, rtol=0, atol=1e-5)
        wrong = out["shard_local"][: len(SHARD_IDS)]
        assert (wrong - single).abs().amax(dim=-1).max() > 0.1
        assert not math.isnan(float(wrong.sum()))
