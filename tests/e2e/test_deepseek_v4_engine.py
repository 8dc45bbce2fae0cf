"""DeepseekV4ForCausalLM through `parcap generate`, as a user runs it: a checkpoint saved by
transformers' DeepseekV4ForCausalLM gives transformers' greedy tokens, and the embedded
tiny config decodes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.support.checkpoints import load_reference, reference_greedy
from tests.support.deepseek_v4 import ARCH, PROMPTS, STEPS, checkpoint
from tests.support.engine import run_cli

__all__ = ["checkpoint"]  # a fixture

# small, so that the requests are admitted over several steps and batches change size
ENGINE_ARGS = ("--max-prefill-tokens", "40")


def generate(tmp_path: Path, *argv: str, prompts: list[list[int]], steps: int) -> list[dict]:
    """`parcap generate ARGV --input <prompts.jsonl> --ignore-eos`: one result per prompt."""
    file, out = tmp_path / "prompts.jsonl", tmp_path / "out.jsonl"
    file.write_text("".join(json.dumps({"input_ids": p}) + "\n" for p in prompts))
    done = run_cli(
        "generate", *argv, *ENGINE_ARGS, "--input", str(file), "--output", str(out),
        "--max-new-tokens", str(steps), "--ignore-eos",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    return [json.loads(line) for line in out.read_text().splitlines()]


def test_generate_from_a_transformers_checkpoint_matches_transformers(checkpoint, tmp_path):
    """The issue's done-when, on a config that differs from the tiny one in every size."""
    path = checkpoint("every-size")
    results = generate(
        tmp_path, "--model-path", str(path), "--tp-size", "1", prompts=PROMPTS, steps=STEPS
    )
    reference = load_reference(path)
    for prompt, result in zip(PROMPTS, results, strict=True):
        tokens, logprobs = reference_greedy(reference, prompt, STEPS)
        assert result["output_ids"] == tokens
        assert result["output_logprobs"] == pytest.approx(logprobs, abs=1e-4)


def test_generate_with_the_embedded_tiny_config_decodes_varied_tokens(tmp_path):
    prompts = [list(b"Hello, world"), list(b"DeepSeek-V4 hyper-connections")]
    results = generate(tmp_path, "--model", ARCH, prompts=prompts, steps=24)
    for result in results:
        assert len(set(result["output_ids"])) > 8
        assert all(lp > -5.9 for lp in result["output_logprobs"])
