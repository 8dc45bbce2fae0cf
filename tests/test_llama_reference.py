import types
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from engine.distributed import destroy_parallel, init_parallel
from engine.forward_batch import ForwardBatch, ForwardMode
from engine.kv_cache import SINK_SLOT, KVPool, ReqToTokenPool
from engine.loader import build_model, load_checkpoint, load_random
from engine.model_config import config_from_dict, load_config
from models.layers.attention import TorchAttentionBackend
from models.llama import LlamaForCausalLM
from tests.checkpoints import (
    LLAMA_H64,
    load_reference,
    parcap_greedy,
    reference_greedy,
    save_tiny_checkpoint,
)
from tests.engine_helpers import free_port

CASES = {
    "gqa-untied": {"num_key_value_heads": 2},
    "tied-bias-headdim": {
        "num_key_value_heads": 4,
        "head_dim": 8,
        "tie_word_embeddings": True,
        "attention_bias": True,
        "mlp_bias": True,
        "rope_parameters": {"rope_type": "default", "rope_theta": 1e6},
    },
    "llama3-rope": {
        "num_key_value_heads": 1,
        "rope_parameters": {
            "rope_type": "llama3",
            "rope_theta": 500000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 16,
        },
    },
    "yarn-rope": {
        "num_key_value_heads": 2,
        "rope_parameters": {
            "rope_type": "yarn",
            "rope_theta": 10000.0,
            "factor": 4.0,
            "original_max_position_embeddings": 32,
        },
    },
}
PROMPTS = [[1, 2, 3, 4, 5], [17, 99, 3, 250, 8, 8, 41, 300, 2, 77, 5], [200, 201, 202]]
STEPS = 8


@pytest.fixture(scope="module")
def checkpoint_dir(tmp_path_factory):
    root, saved = tmp_path_factory.mktemp("llama"), {}

    def path(case: str, **extra) -> Path:
        key = (case, *sorted(extra.items()))
        if key not in saved:
            config = {**LLAMA_H64, **CASES[case], **extra}
            saved[key] = save_tiny_checkpoint(root / str(len(saved)), config, seed=1)
        return saved[key]

    return path


def parcap_model(config: types.SimpleNamespace) -> LlamaForCausalLM:
    return build_model(LlamaForCausalLM, config, torch.float32, torch.device("cpu"))


def run_parcap(path: Path):
    model = parcap_model(load_config(path))
    load_checkpoint(model, path)
    return parcap_greedy(model, PROMPTS, STEPS, chunk=4, pad_to=4)


@pytest.mark.parametrize("case", CASES)
def test_greedy_matches_transformers(case, checkpoint_dir):
    path = checkpoint_dir(case)
    tokens, logprobs, _ = run_parcap(path)
    reference = load_reference(path)
    for prompt, ours, our_logprobs in zip(PROMPTS, tokens, logprobs):
        ref_tokens, ref_logprobs = reference_greedy(reference, prompt, STEPS)
        assert ours == ref_tokens
        assert our_logprobs == pytest.approx(ref_logprobs, abs=1e-4)
    assert len({t for out in tokens for t in out}) > 3


@pytest.mark.parametrize("case", ["gqa-untied", "tied-bias-headdim"])
def test_checkpoint_shapes_match_transformers_state_dict(case, checkpoint_dir):
    path = checkpoint_dir(case)
    reference = load_reference(path)
    expected = {name: tuple(t.shape) for name, t in reference.state_dict().items()}
    if reference.config.tie_word_embeddings:
        expected.pop("lm_head.weight")
    assert LlamaForCausalLM.checkpoint_shapes(load_config(path)) == expected


def test_tiny_config_builds_a_transformers_llama_and_decodes_varied_tokens():
    import transformers

    values = LlamaForCausalLM.tiny_config()
    hf_values = {k: v for k, v in values.items() if k not in ("model_type", "torch_dtype")}
    reference = transformers.LlamaForCausalLM(transformers.LlamaConfig(**hf_values))
    expected = {name: tuple(t.shape) for name, t in reference.state_dict().items()}
    config = config_from_dict(values)
    assert LlamaForCausalLM.checkpoint_shapes(config) == expected

    model = parcap_model(config)
    load_random(model, seed=0)
    tokens, logprobs, _ = parcap_greedy(model, [list(b"Hello, world")], 24)
    assert len(set(tokens[0])) > 8
    assert all(lp > -5.0 for lp in logprobs[0])  # well above uniform over 384 tokens (-5.95)


def tp_worker(rank: int, port: int, jobs: list[tuple[str, str | None]], out_dir: str) -> None:
    torch.set_num_threads(1)
    init_parallel(rank, 2, 1, torch.device("cpu"), f"tcp://127.0.0.1:{port}", 60)
    try:
        for name, path in jobs:
            if path is None:
                model = parcap_model(config_from_dict(LlamaForCausalLM.tiny_config()))
                load_random(model, seed=0)
            else:
                model = parcap_model(load_config(path))
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
            model = parcap_model(config_from_dict(LlamaForCausalLM.tiny_config()))
            load_random(model, seed=0)
            single = parcap_greedy(model, PROMPTS, STEPS, chunk=4, pad_to=4)
        else:
            single = run_parcap(Path(path))
        rank0, rank1 = (torch.load(tmp_path / f"{name}-rank{r}.pt") for r in (0, 1))
        assert rank0[0] == rank1[0] == single[0], name
        for a, b, c in zip(rank0[2], rank1[2], single[2], strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
            torch.testing.assert_close(a, c, rtol=0, atol=1e-4)


def test_idle_batch_of_padding_rows_gives_no_logits():
    model = parcap_model(config_from_dict(LlamaForCausalLM.tiny_config()))
    load_random(model, seed=0)
    kv_pool = KVPool(8, model.kv_cache_shapes(), torch.float32, torch.device("cpu"))
    backend = TorchAttentionBackend()
    zeros = torch.zeros(3, dtype=torch.int64)
    batch = ForwardBatch(
        mode=ForwardMode.IDLE,
        input_ids=zeros,
        positions=zeros,
        out_cache_loc=zeros + SINK_SLOT,
        req_pool_indices=torch.zeros(0, dtype=torch.int64),
        seq_lens=[],
        extend_lens=[],
        num_tokens=0,
        sample_rows=torch.zeros(0, dtype=torch.int64),
        kv_pool=kv_pool,
        req_to_token=ReqToTokenPool(1, 8, torch.device("cpu")).table,
        attn_backend=backend,
    )
    backend.prepare(batch)
    with torch.inference_mode():
        logits = model(batch)
    assert logits.shape == (0, 384) and logits.dtype == torch.float32
