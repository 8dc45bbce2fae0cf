"""DeepseekV3ForCausalLM through the engine (real gloo ranks): its self-managed sequence
parallelism under every topology against tp 1, the plan's counters, and transformers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from engine.frontend.llm_engine import LLMEngine
from engine.messages import SamplingParams
from engine.server_args import ServerArgs
from tests.support.checkpoints import load_reference, reference_greedy
from tests.support.deepseek_v3 import ARCH, PROMPTS, checkpoint
from tests.support.engine import run_cli

__all__ = ["checkpoint"]  # a fixture

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
