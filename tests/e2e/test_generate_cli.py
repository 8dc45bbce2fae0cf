"""`parcap generate`: prompts in, JSON lines out, a report, and clear refusals."""

from __future__ import annotations

import json
import sys
import time

import pytest
import torch
from safetensors.torch import load_file, save_file

import engine.frontend.launcher
from engine.entrypoints.generate import main
from registry import explain
from tests.support.checkpoints import LLAMA_H32, save_tiny_checkpoint
from tests.support.engine import run_cli, server_args

KEYS = {"output_ids", "output_logprobs", "text"}


@pytest.fixture(scope="module")
def hello_tp2():
    start = time.monotonic()
    proc = run_cli("generate", "--model", "LlamaForCausalLM", "--tp-size", "2", "--prompt", "hello")
    return proc, time.monotonic() - start


@pytest.mark.slow
def test_prompt_at_tp2_prints_one_json_line(hello_tp2):
    proc, seconds = hello_tp2
    assert proc.returncode == 0, proc.stderr
    (line,) = proc.stdout.splitlines()
    result = json.loads(line)
    assert set(result) == KEYS
    assert len(result["output_ids"]) == len(result["output_logprobs"]) <= 16
    assert all(lp <= 0 for lp in result["output_logprobs"])
    assert isinstance(result["text"], str)
    # progress bars are drawn on a terminal only (tests/e2e/test_shutdown.py runs one)
    assert proc.stderr == ""
    assert seconds < 60


@pytest.mark.slow
def test_input_file_output_file_and_report(hello_tp2, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    sampled = '{"prompt": "hello", "temperature": 1.0, "seed": 7}'
    lines = ['{"prompt": "hello"}', "", '{"input_ids": [256, 1, 2, 3]}']
    # a line's own settings override the flags for that line only
    lines += ['{"input_ids": [256, 1, 2, 3], "max_new_tokens": 3}', sampled, sampled]
    prompts.write_text("\n".join(lines) + "\n")
    out, report = tmp_path / "out.jsonl", tmp_path / "report.json"
    code = main(
        ["--input", str(prompts), "--output", str(out), "--report-json", str(report)]
        + ["--max-new-tokens", "5", "--ignore-eos", "--moe-dense-tp-size", "1", "--tp-size", "2"]
    )
    assert code == 0
    first, second, short, *sampled = (json.loads(line) for line in out.read_text().splitlines())
    assert set(first) == set(second) == KEYS
    assert len(first["output_ids"]) == len(second["output_ids"]) == 5
    assert short["output_ids"] == second["output_ids"][:3]
    assert sampled[0]["output_ids"] == sampled[1]["output_ids"] != first["output_ids"]
    hello = json.loads(hello_tp2[0].stdout)["output_ids"]
    n = min(5, len(hello))  # without --ignore-eos, hello may have stopped early
    assert first["output_ids"][:n] == hello[:n]
    doc = json.loads(report.read_text())
    args = server_args("--moe-dense-tp-size", "1", "--tp-size", "2")
    assert doc["plan"] == explain("LlamaForCausalLM", args)
    c = doc["counters"]
    assert set(c) == {
        "steps",
        "gathered_buffer_bytes",
        "mlp_sync_calls",
        "attn_tp_padding_tokens",
        "capture_sizes",
        "decode_steps",
        "decode_device_ms",
    }
    assert c["decode_device_ms"] is None  # measured on CUDA only
    assert c["steps"] == 5 and c["mlp_sync_calls"] == 5 and c["gathered_buffer_bytes"] > 0
    assert all(size % 2 == 0 for size in c["capture_sizes"])
    assert doc["timings"]["ttft_ms"] > 0 and doc["timings"]["tpot_ms"] > 0


@pytest.fixture
def no_ranks(monkeypatch):
    """Fail the test if a rank would start."""

    def refuse(*args, **kwargs):
        raise AssertionError("a rank started")

    monkeypatch.setattr(engine.frontend.launcher.Ranks, "__init__", refuse)


def refused(capsys, *argv: str) -> str:
    with pytest.raises(SystemExit) as exit:
        main(list(argv))
    assert exit.value.code == 2
    err = capsys.readouterr().err
    (line,) = err.splitlines()
    assert line.startswith("parcap: error: ")
    return line


def test_bad_inputs_exit_2_before_any_rank(no_ranks, capsys, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "ok"}\n{"prompt": "ok",\n')
    assert f"{bad}:2: not valid JSON" in refused(capsys, "--input", str(bad))
    wrong = tmp_path / "wrong.jsonl"
    wrong.write_text('{"input_ids": [1, "x"]}\n')
    assert f"{wrong}:1: expected" in refused(capsys, "--input", str(wrong))
    for line, error in [
        ('{"prompt": "a", "max_tokens": 5}', "unknown key 'max_tokens' (known: prompt, "),
        ('{"prompt": "a", "top_k": 2.5}', "'top_k' must be int (got 2.5)"),
        ('{"prompt": "a", "ignore_eos": 1}', "'ignore_eos' must be bool (got 1)"),
        ('{"prompt": "a", "temperature": -1}', "'temperature' must be a number >= 0 (got -1)"),
        ('{"prompt": "a", "max_new_tokens": 4000}', "prompt of 2 tokens + max_new_tokens 4000"),
    ]:
        wrong.write_text('{"prompt": "fine"}\n' + line + "\n")
        assert f"{wrong}:2: {error}" in refused(capsys, "--input", str(wrong))
    big = tmp_path / "big.jsonl"
    big.write_text('{"input_ids": [1, 384]}\n')
    assert "input id 384 is outside the vocabulary" in refused(capsys, "--input", str(big))
    missing = tmp_path / "missing.jsonl"
    assert f"--input {missing}: No such file" in refused(capsys, "--input", str(missing))
    assert "no prompts" in refused(capsys)
    assert "not both" in refused(capsys, "--prompt", "a", "--input", str(bad))
    assert "unknown architecture 'Nope'" in refused(capsys, "--model", "Nope", "--prompt", "a")
    replicas = refused(capsys, "--tp-size", "2", "--dp-size", "2", "--prompt", "a")
    assert "--dp-size 2 without --enable-dp-attention" in replicas
    assert "--max-new-tokens must be" in refused(capsys, "--max-new-tokens", "0", "--prompt", "a")
    line = refused(capsys, "--prompt", "a" * 40, "--max-prefill-tokens", "16")
    assert "--prompt #1: prompt of 41 tokens exceeds --max-prefill-tokens 16" in line
    assert "no config.json" in refused(capsys, "--model-path", str(tmp_path), "--prompt", "a")
    nowhere = str(tmp_path / "no" / "out.jsonl")
    assert "its directory does not exist" in refused(capsys, "--prompt", "a", "--output", nowhere)
    heads = refused(capsys, "--tp-size", "3", "--prompt", "a")
    assert "--tp-size 3: LlamaForCausalLM's num_attention_heads (8) must be divisible" in heads
    v4 = ("--model", "DeepseekV4ForCausalLM", "--moe-a2a-backend", "all2all", "--prompt", "a")
    assert "o_groups (4) must be divisible by the attention-TP size (8)" in refused(
        capsys, *v4, "--tp-size", "8"
    )
    dp = ("--tp-size", "16", "--dp-size", "16", "--enable-dp-attention")
    experts = refused(capsys, *v4, *dp)  # heads fit attention-TP 1; 8 experts on 16 ranks
    assert "the number of routed experts (8) must be divisible by the TP size (16)" in experts
    on_cpu = refused(capsys, "--attention-backend", "flashinfer", "--prompt", "a")
    assert "--attention-backend flashinfer: FlashInfer runs on CUDA devices only" in on_cpu


def test_refused_plan_exits_2_with_one_line():
    start = time.monotonic()
    proc = run_cli(
        "generate", "--tp-size", "2", "--moe-dense-tp-size", "1", "--disable-attn-tp-gather",
        "--prompt", "hello",
    )  # fmt: skip
    assert proc.returncode == 2 and proc.stdout == ""
    (line,) = proc.stderr.splitlines()
    assert line.startswith("parcap: error: --attn-tp-gather off") and "refused" in line
    assert time.monotonic() - start < 30


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return save_tiny_checkpoint(tmp_path_factory.mktemp("cli"), LLAMA_H32)


@pytest.mark.slow
def test_broken_checkpoint_names_the_tensor(checkpoint, tmp_path, capsys):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text((checkpoint / "config.json").read_text())
    tensors = load_file(checkpoint / "model.safetensors")
    tensors["model.layers.1.mlp.up_proj.weight"] = torch.zeros(3, 3)
    save_file(tensors, broken / "model.safetensors")
    with pytest.raises(SystemExit) as exit:
        main(["--model-path", str(broken), "--tp-size", "2", "--input", str(ids_file(tmp_path))])
    assert exit.value.code == 1
    line = capsys.readouterr().err.splitlines()[-1]
    assert line.startswith("parcap: error: rank ")
    assert "CheckpointError: model.layers.1.mlp.up_proj.weight: shape (3, 3)" in line


def ids_file(tmp_path):
    path = tmp_path / "ids.jsonl"
    path.write_text('{"input_ids": [5, 6, 7]}\n{"input_ids": [250, 3]}\n')
    return path


@pytest.mark.slow
def test_torchrun_matches_spawned_ranks(checkpoint, tmp_path):
    common = ["--model-path", str(checkpoint), "--tp-size", "2", "--max-new-tokens", "6"]
    common += ["--input", str(ids_file(tmp_path)), "--ignore-eos"]
    spawned = run_cli("generate", *common)
    assert spawned.returncode == 0, spawned.stderr
    out = tmp_path / "torchrun.jsonl"
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]
    proc = run_cli(
        "-m", "engine.cli", "generate", *common, "--output", str(out), cmd=torchrun, timeout=180
    )
    assert proc.returncode == 0, proc.stderr
    lines = out.read_text().splitlines()
    assert len(lines) == 2
    for mine, theirs in zip(lines, spawned.stdout.splitlines(), strict=True):
        a, b = json.loads(mine), json.loads(theirs)
        assert a["output_ids"] == b["output_ids"] and a["text"] == b["text"]
        assert a["output_logprobs"] == pytest.approx(b["output_logprobs"], abs=1e-5)
