"""DeepseekV3ForCausalLM: parity with transformers 5.23, and its self-managed sequence
parallelism through the engine (DESIGN.md, Models), on CPU with real gloo ranks."""

from __future__ import annotations

import json
import math
import types
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from engine.communicator import MoeSettings, use_moe_settings
from engine.distributed import destroy_parallel, init_parallel
from engine.forward_batch import ForwardBatch, ForwardMode
from engine.kv_cache import SINK_SLOT, KVPool, ReqToTokenPool
from engine.llm_engine import LLMEngine
from engine.loader import (
    CheckpointError,
    build_model,
    load_checkpoint,
    load_model,
    load_random,
    random_weights,
)
from engine.model_config import config_from_dict, load_config
from engine.sequence import SamplingParams
from engine.server_args import ServerArgs
from models.deepseek_v3 import DeepseekV3ForCausalLM
from models.layers.attention import TorchAttentionBackend
from tests.checkpoints import (
    load_reference,
    parcap_greedy,
    reference_greedy,
    save_tiny_checkpoint,
)
from tests.engine_helpers import free_port, run_cli

ARCH = "DeepseekV3ForCausalLM"
BASE = {
    **{k: v for k, v in DeepseekV3ForCausalLM.tiny_config().items() if k != "torch_dtype"},
    "max_position_embeddings": 128,  # factor x original, as transformers' yarn expects
    # cos/sin scaled (mscale != mscale_all_dim) as well as the softmax
    "rope_parameters": {
        "rope_type": "yarn",
        "rope_theta": 10000.0,
        "factor": 4.0,
        "original_max_position_embeddings": 32,
        "beta_fast": 32,
        "beta_slow": 1,
        "mscale": 0.707,
        "mscale_all_dim": 1.0,
    },
}
CASES = {
    "yarn-q-lora": {},
    "no-q-lora-plain-rope-bias-tied": {
        "q_lora_rank": None,
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
        "rope_interleave": False,
        "attention_bias": True,
        "tie_word_embeddings": True,
        "first_k_dense_replace": 2,
        "n_shared_experts": 2,
        "norm_topk_prob": False,
    },
}
PROMPTS = [[1, 2, 3, 4, 5], [17, 99, 3, 250, 8, 8, 41, 300, 2, 77, 5], [200, 201, 202]]
STEPS = 8


def save_checkpoint(root: Path, case: str) -> Path:
    """A random transformers checkpoint, with a non-zero e_score_correction_bias (a buffer
    transformers initialises to zero, so the random re-draw leaves it out)."""
    from safetensors.torch import load_file, save_file

    path = save_tiny_checkpoint(root / case, {**BASE, **CASES[case]}, seed=1)
    file = path / "model.safetensors"
    tensors = load_file(file)
    generator = torch.Generator().manual_seed(7)
    for name, tensor in tensors.items():
        if name.endswith("e_score_correction_bias"):
            tensor.copy_(0.1 * torch.randn(tensor.shape, generator=generator))
    save_file(tensors, file, metadata={"format": "pt"})
    return path


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    root, saved = tmp_path_factory.mktemp("deepseek_v3"), {}

    def path(case: str) -> Path:
        if case not in saved:
            saved[case] = save_checkpoint(root, case)
        return saved[case]

    return path


DEFAULT_MOE = MoeSettings()  # backend none, dense layers TP-sharded


def parcap_model(
    config: types.SimpleNamespace, settings: MoeSettings = DEFAULT_MOE
) -> DeepseekV3ForCausalLM:
    with use_moe_settings(settings):
        return build_model(DeepseekV3ForCausalLM, config, torch.float32, torch.device("cpu"))


def tiny_random_model(settings: MoeSettings = DEFAULT_MOE) -> DeepseekV3ForCausalLM:
    model = parcap_model(config_from_dict(DeepseekV3ForCausalLM.tiny_config()), settings)
    load_random(model, seed=0)
    return model


# --- transformers parity, single process ---------------------------------------------


@pytest.mark.parametrize("case", CASES)
def test_greedy_matches_transformers(case, checkpoint):
    """Prefill in chunks of 4 (later chunks attend to cached latents), then decode, in
    shared batches padded to 4 rows."""
    path = checkpoint(case)
    model = parcap_model(load_config(path))
    load_checkpoint(model, path)
    tokens, logprobs, _ = parcap_greedy(model, PROMPTS, STEPS, chunk=4, pad_to=4)
    reference = load_reference(path)
    for prompt, ours, our_logprobs in zip(PROMPTS, tokens, logprobs, strict=True):
        ref_tokens, ref_logprobs = reference_greedy(reference, prompt, STEPS)
        assert ours == ref_tokens
        assert our_logprobs == pytest.approx(ref_logprobs, abs=1e-4)
    assert len({t for out in tokens for t in out}) > 3
    assert DeepseekV3ForCausalLM.checkpoint_shapes(load_config(path)) == saved_shapes(path)


def saved_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Tensor shapes as transformers saves them (per-expert, unlike its fused state dict)."""
    from safetensors import safe_open

    handle = safe_open(str(path / "model.safetensors"), framework="pt")
    return {name: tuple(handle.get_slice(name).get_shape()) for name in handle.keys()}  # noqa: SIM118


def test_tiny_config_is_a_transformers_deepseek_v3_and_decodes_varied_tokens(tmp_path):
    values = DeepseekV3ForCausalLM.tiny_config()
    path = save_tiny_checkpoint(tmp_path, {k: v for k, v in values.items() if k != "torch_dtype"})
    assert DeepseekV3ForCausalLM.checkpoint_shapes(config_from_dict(values)) == saved_shapes(path)
    assert DeepseekV3ForCausalLM.parallel_capabilities.self_managed_sp is True

    tokens, logprobs, _ = parcap_greedy(tiny_random_model(), [list(b"Hello, world")], 24)
    assert len(set(tokens[0])) > 8
    assert all(lp > -5.0 for lp in logprobs[0])  # well above uniform over 384 tokens (-5.95)


def test_kv_cache_holds_one_latent_row_per_token():
    model = tiny_random_model()
    config = model.config
    width = config.kv_lora_rank + config.qk_rope_head_dim
    assert model.kv_cache_shapes() == [[(1, width)]] * config.num_hidden_layers


def test_multi_token_prediction_layers_are_skipped_and_nothing_else():
    """Released DeepSeek-V3 checkpoints carry an MTP layer after the last decoder layer."""
    model = tiny_random_model()
    config = model.config
    shapes = DeepseekV3ForCausalLM.checkpoint_shapes(config)
    mtp = f"model.layers.{config.num_hidden_layers}.eh_proj.weight"
    extra = {mtp: (config.hidden_size, 2 * config.hidden_size)}
    load_model(model, random_weights(shapes | extra, seed=0))
    stray = {"model.layers.0.eh_proj.weight": (config.hidden_size, 2 * config.hidden_size)}
    with pytest.raises(CheckpointError, match="model.layers.0.eh_proj.weight: unexpected"):
        load_model(model, random_weights(shapes | stray, seed=0))


# --- the engine --------------------------------------------------------------------------

ENGINE_PROMPTS = [list(b"Hello"), list(b"The quick brown fox"), [256, 7], list(b"abcdefghij")]
ENGINE_PROMPTS += [list(b"DeepSeek-V3 shards tokens"), [300, 301, 302], list(b"xyz" * 5)]
MAX_NEW = 10
# small, so requests are admitted over several steps and batches change size
ENGINE_ARGS = ("--max-prefill-tokens", "32")


def engine_run(*argv: str, prompts=ENGINE_PROMPTS, ignore_eos: bool = False) -> tuple[list, dict]:
    if "--model-path" not in argv:
        argv = ("--model", ARCH, *argv)
    params = SamplingParams(max_new_tokens=MAX_NEW, ignore_eos=ignore_eos)
    with LLMEngine(ServerArgs.from_cli([*argv, *ENGINE_ARGS])) as engine:
        results = engine.generate(prompts, params)
    assert all(r.error is None for r in results)
    return [(r.output_ids, r.output_logprobs) for r in results], engine.report()


def cli_run(tmp_path: Path, *argv: str) -> tuple[list, dict]:
    """`parcap generate --model DeepseekV3ForCausalLM ARGV --report-json`, as a user runs it."""
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"input_ids": p}) + "\n" for p in ENGINE_PROMPTS))
    out, report = tmp_path / f"out{len(argv)}.jsonl", tmp_path / f"report{len(argv)}.json"
    argv = ("--model", ARCH, *argv, *ENGINE_ARGS, "--max-new-tokens", str(MAX_NEW))
    done = run_cli(
        "generate", *argv, "--input", str(prompts), "--output", str(out),
        "--report-json", str(report),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    return [(r["output_ids"], r["output_logprobs"]) for r in lines], json.loads(report.read_text())


@pytest.fixture(scope="module")
def tp1():
    results, _ = engine_run()
    assert len({t for ids, _ in results for t in ids}) > 10
    return results


def assert_same_outputs(results: list, expected: list) -> None:
    assert [ids for ids, _ in results] == [ids for ids, _ in expected]
    for (_, ours), (_, theirs) in zip(results, expected, strict=True):
        assert ours == pytest.approx(theirs, abs=1e-4)


def test_tp4_all2all_opts_out_of_the_gather_and_matches_on_and_tp1(tp1, tmp_path):
    """The issue's done-when: auto leaves the gather off (the model decides), with no
    gathered buffer and no per-step sync; `on` forces both; the tokens agree."""
    argv = ("--tp-size", "4", "--moe-a2a-backend", "all2all")
    auto, auto_report = cli_run(tmp_path, *argv)
    on, on_report = cli_run(tmp_path, *argv, "--attn-tp-gather", "on")

    decision = auto_report["plan"]["plan"]["attn_tp_gather"]
    assert (decision["value"], decision["source"]) == (False, "model")
    counters = auto_report["counters"]
    assert counters["gathered_buffer_bytes"] == 0
    assert counters["mlp_sync_calls"] == 0
    assert counters["attn_tp_padding_tokens"] == 0

    decision = on_report["plan"]["plan"]["attn_tp_gather"]
    assert (decision["value"], decision["source"]) == (True, "cli")
    counters = on_report["counters"]
    assert counters["gathered_buffer_bytes"] > 0
    assert counters["mlp_sync_calls"] == counters["steps"] > 0
    # steps padded to 4 rows: without the global num_token_non_padded the model would
    # drop real rows here (SGLang issue #38606) and these tokens would differ
    assert counters["attn_tp_padding_tokens"] > 0

    assert_same_outputs(auto, on)
    assert_same_outputs(auto, tp1)


def test_tp2_backend_none_with_replicated_dense_layers_matches_tp1(tp1):
    """MoE TP-sharded (all rows, all-reduce); dense layers token-parallel (TP 1)."""
    results, report = engine_run("--tp-size", "2", "--moe-dense-tp-size", "1")
    assert report["plan"]["plan"]["attn_tp_gather"]["source"] == "model"
    assert_same_outputs(results, tp1)


@pytest.mark.parametrize(
    "argv",
    [
        # attention-TP 1: MoE and dense layers TP-sharded over both groups' rows
        ("--tp-size", "2", "--dp-size", "2"),
        # attention-TP 2: experts token-parallel across groups, dense layers TP-sharded
        ("--tp-size", "4", "--dp-size", "2", "--moe-a2a-backend", "all2all"),
    ],
    ids=["tp2-dp2", "tp4-dp2-all2all"],
)
def test_dp_attention_matches_tp1(tp1, argv):
    """Two attention-DP groups admit their requests in different steps, so one group at
    times runs an idle batch; the TP-sharded MLPs gather every group's rows themselves."""
    results, report = engine_run(*argv, "--enable-dp-attention")
    assert report["counters"]["mlp_sync_calls"] == report["counters"]["steps"]
    assert_same_outputs(results, tp1)


def test_dp_group_without_any_request_runs_idle_batches(tp1):
    """One request for two attention-DP groups: group 1 never gets work and runs every
    step on zero rows (its attention and MLA projections included)."""
    results, report = engine_run(
        "--tp-size", "4", "--dp-size", "2", "--enable-dp-attention", prompts=ENGINE_PROMPTS[:1]
    )
    assert report["counters"]["mlp_sync_calls"] == report["counters"]["steps"] > 0
    assert_same_outputs(results, tp1[:1])


def test_engine_tp2_all2all_matches_transformers(checkpoint):
    path = checkpoint("yarn-q-lora")
    argv = ("--model-path", str(path), "--tp-size", "2", "--moe-a2a-backend", "all2all")
    results, _ = engine_run(*argv, prompts=PROMPTS, ignore_eos=True)
    reference = load_reference(path)
    for prompt, (ids, logprobs) in zip(PROMPTS, results, strict=True):
        ref_tokens, ref_logprobs = reference_greedy(reference, prompt, MAX_NEW)
        assert ids == ref_tokens
        assert logprobs == pytest.approx(ref_logprobs, abs=1e-4)


# --- the token count the layers shard by -------------------------------------------------


def prefill(model: DeepseekV3ForCausalLM, ids: list[int], rows: int, count: int) -> ForwardBatch:
    """One request's prefill padded to `rows`, with `num_token_non_padded` = `count`."""
    kv = KVPool(rows + 1, model.kv_cache_shapes(), torch.float32, torch.device("cpu"))
    table = ReqToTokenPool(1, rows, torch.device("cpu"))
    table.write(0, 0, kv.alloc(len(ids)))
    pad = rows - len(ids)
    batch = ForwardBatch(
        mode=ForwardMode.EXTEND,
        input_ids=torch.tensor(ids + [0] * pad),
        positions=torch.tensor(list(range(len(ids))) + [0] * pad),
        out_cache_loc=torch.cat([table.table[0, : len(ids)], torch.full((pad,), SINK_SLOT)]),
        req_pool_indices=torch.tensor([0]),
        seq_lens=[len(ids)],
        extend_lens=[len(ids)],
        num_tokens=len(ids),
        sample_rows=torch.tensor([len(ids) - 1]),
        kv_pool=kv,
        req_to_token=table.table,
        attn_backend=TorchAttentionBackend(),
        num_token_non_padded=count,
    )
    batch.attn_backend.prepare(batch)
    return batch


SHARD_IDS = list(b"sharded")  # 7 real rows, padded to 8 as `--attn-tp-gather on` pads at A = 2


def final_hidden(model: DeepseekV3ForCausalLM, count: int) -> torch.Tensor:
    with torch.inference_mode():
        return model.model(prefill(model, SHARD_IDS, 8, count))


def shard_count_worker(rank: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    init_parallel(rank, 2, 1, torch.device("cpu"), f"tcp://127.0.0.1:{port}", 60)
    try:
        model = tiny_random_model(MoeSettings("all2all", None))
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
