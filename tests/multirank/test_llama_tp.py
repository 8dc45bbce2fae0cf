"""Llama at tp 2 in two spawned gloo ranks, logits against one process."""

from pathlib import Path

import torch
import torch.multiprocessing as mp

from engine.model_api.config import load_config
from engine.runtime.loader import load_checkpoint
from engine.runtime.process_groups import destroy_parallel, init_parallel
from models.llama import LlamaForCausalLM
from tests.support.checkpoints import parcap_greedy
from tests.support.engine import free_port
from tests.support.models import rank_context, tiny_random
from tests.unit.test_llama_reference import PROMPTS, STEPS, checkpoint_dir, parcap_model, run_parcap

__all__ = ["checkpoint_dir"]  # the fixture, shared with the single-process tests


def tp_worker(rank: int, port: int, jobs: list[tuple[str, str | None]], out_dir: str) -> None:
    torch.set_num_threads(1)
    init_parallel(rank, 2, 1, torch.device("cpu"), f"tcp://127.0.0.1:{port}", 60)
    try:
        for name, path in jobs:
            if path is None:
                model = tiny_random(LlamaForCausalLM, rank_context())
            else:
                model = parcap_model(load_config(path), rank_context())
                load_checkpoint(model, path)
            result = parcap_greedy(model, PROMPTS, STEPS, chunk=4, pad_to=4)
            torch.save(result, Path(out_dir) / f"{name}-rank{rank}.pt")
    finally:
        destroy_parallel()


def test_tp2_logits_match_single_process(checkpoint_dir, tmp_path):
    jobs = [
        ("gqa", str(checkpoint_dir("gqa-untied"))),
        # One KV head for two ranks (replicated), a vocab that needs padding, tied, biases.
        (
            "kv1-odd-vocab",
            str(checkpoint_dir("tied-bias-headdim", num_key_value_heads=1, vocab_size=383)),
        ),
        ("tiny-random", None),
    ]
    mp.spawn(tp_worker, args=(free_port(), jobs, str(tmp_path)), nprocs=2, join=True)
    for name, path in jobs:
        if path is None:
            single = parcap_greedy(tiny_random(LlamaForCausalLM), PROMPTS, STEPS, chunk=4, pad_to=4)
        else:
            single = run_parcap(Path(path))
        rank0, rank1 = (torch.load(tmp_path / f"{name}-rank{r}.pt") for r in (0, 1))
        assert rank0[0] == rank1[0] == single[0], name
        for a, b, c in zip(rank0[2], rank1[2], single[2], strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
            torch.testing.assert_close(a, c, rtol=0, atol=1e-4)
