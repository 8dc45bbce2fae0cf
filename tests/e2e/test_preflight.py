"""Every mistake parcap can know from the config, the files and the flags exits 2 with one
line naming the flag and the numbers, before any rank starts; checkpoint errors name the
file; text prompts need the checkpoint's tokenizer, whose own settings decide BOS."""

from __future__ import annotations

import json
import time
import types
from pathlib import Path

import pytest
import tokenizers
import torch
from safetensors.torch import save_file

import engine.entrypoints.serve
import engine.frontend.launcher
from engine.entrypoints.generate import main as generate
from engine.frontend.tokenizer import load_tokenizer
from engine.model_api.weights import CheckpointError
from engine.runtime.loader import load_checkpoint
from models.llama import LlamaForCausalLM
from tests.support.engine import run_cli
from tests.support.models import build


@pytest.fixture(autouse=True)
def no_ranks(monkeypatch):
    """Fail the test if a rank (or, on node 0, the wait for the other nodes) would start."""

    def refuse(*args, **kwargs):
        raise AssertionError("a rank started")

    monkeypatch.setattr(engine.frontend.launcher.Ranks, "__init__", refuse)


def refused(capsys, *argv: str, main=generate) -> str:
    start = time.monotonic()
    with pytest.raises(SystemExit) as exit:
        main(list(argv))
    assert exit.value.code == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith("parcap: error: ")
    assert time.monotonic() - start < 20
    return line


def llama_dir(tmp_path, name: str = "llama", **changes) -> str:
    """A checkpoint folder holding only config.json: the embedded Llama config, changed."""
    path = tmp_path / name
    path.mkdir()
    (path / "config.json").write_text(json.dumps({**LlamaForCausalLM.tiny_config(), **changes}))
    return str(path)


def test_sizes_that_do_not_split_over_the_ranks(capsys, tmp_path):
    v3 = ("--model", "DeepseekV3ForCausalLM", "--prompt", "a")
    assert "--tp-size 3: DeepseekV3ForCausalLM's num_attention_heads (8) must be divisible by " \
        "the attention-TP size (3)" in refused(capsys, *v3, "--tp-size", "3")  # fmt: skip
    kv = llama_dir(tmp_path, num_attention_heads=12, num_key_value_heads=3, head_dim=8)
    line = refused(capsys, "--model-path", kv, "--load-format", "dummy", "--tp-size", "2")
    assert "num_key_value_heads (3) must be divisible by the attention-TP size (2) (or " in line
    dp3 = ("--tp-size", "6", "--dp-size", "3", "--enable-dp-attention", "--prompt", "a")
    assert "intermediate_size (128) must be divisible by the TP size (6)" in refused(capsys, *dp3)
    qwen = ("--model", "Qwen3MoeForCausalLM", "--moe-a2a-backend", "all2all", "--prompt", "a")
    dp16 = ("--tp-size", "16", "--dp-size", "16", "--enable-dp-attention")
    line = refused(capsys, *qwen, *dp16)
    assert "the number of routed experts (8) must be divisible by the TP size (16)" in line


def test_devices_that_are_not_there(capsys, monkeypatch):
    if not torch.cuda.is_available():
        line = refused(capsys, "--device", "cuda", "--prompt", "a")
        assert "--device cuda: CUDA is not available here" in line
        line = refused(
            capsys, "--device", "cuda", "--port", "0", main=engine.entrypoints.serve.main
        )
        assert "--device cuda: CUDA is not available here" in line
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    line = refused(capsys, "--device", "cuda", "--tp-size", "2", "--prompt", "a")
    assert "--device cuda --tp-size 2: this host runs 2 ranks, one GPU each, but 1 GPU is " in line


def test_a_kv_pool_too_small_for_the_context_asked_for(capsys):
    line = refused(
        capsys, "--context-length", "2048", "--max-total-tokens", "1024", "--prompt", "a"
    )
    assert line.endswith(
        "--context-length 2048: one request that long needs 2047 KV slots, more than "
        "--max-total-tokens 1024"
    )
    line = refused(capsys, "--context-length", "4096", "--prompt", "a")
    assert (
        "--context-length 4096: longer than LlamaForCausalLM's max_position_embeddings (2048)"
        in line
    )
    # the context asked for is the longest request served
    line = refused(capsys, "--context-length", "64", "--max-new-tokens", "60", "--prompt", "abcd")
    assert "exceeds the model's context length 64" in line


def test_node_flags_that_cannot_work(capsys, monkeypatch):
    assert "--nnodes 2 needs --dist-init-addr HOST:PORT" in refused(
        capsys, "--nnodes", "2", "--tp-size", "2", "--prompt", "a"
    )
    at = ("--dist-init-addr", "127.0.0.1:29999", "--prompt", "a")
    line = refused(capsys, "--nnodes", "2", "--tp-size", "3", *at)
    assert "--tp-size 3 --nnodes 2: every node runs tp_size / nnodes ranks" in line
    line = refused(capsys, "--nnodes", "2", "--node-rank", "2", "--tp-size", "2", *at)
    assert "--node-rank 2: must be below --nnodes 2" in line
    assert "expected HOST:PORT" in refused(capsys, "--dist-init-addr", "nowhere", "--prompt", "a")
    serve = engine.entrypoints.serve.main
    assert "--nnodes 2 needs --dist-init-addr" in refused(capsys, "--nnodes", "2", main=serve)
    for name, value in {"RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "x"}.items():
        monkeypatch.setenv(name, value)
    line = refused(capsys, "--nnodes", "2", "--tp-size", "2", *at)
    assert "under torchrun, torchrun's own --nnodes" in line


def test_checkpoint_files_are_checked_and_named(capsys, tmp_path):
    empty = llama_dir(tmp_path, "empty")
    line = refused(capsys, "--model-path", empty, "--input", "ids.jsonl")
    assert "no *.safetensors checkpoint there (--load-format dummy runs its config.json" in line
    truncated = llama_dir(tmp_path, "truncated")
    save_file({"model.norm.weight": torch.ones(64)}, f"{truncated}/model.safetensors")
    weights = Path(truncated) / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-16])  # a download cut short
    line = refused(capsys, "--model-path", truncated, "--prompt", "a")
    assert f"{truncated}/model.safetensors: not a readable safetensors file (" in line
    assert "incomplete metadata" in line


def test_text_prompts_need_the_checkpoints_tokenizer(capsys, tmp_path):
    bare = llama_dir(tmp_path)
    line = refused(capsys, "--model-path", bare, "--load-format", "dummy", "--prompt", "hello")
    assert line.endswith(f"--prompt #1: {bare} has no tokenizer.json, so text cannot be encoded; "
                         "give input_ids")  # fmt: skip


def test_token_ids_need_no_tokenizer(tmp_path):
    bare = llama_dir(tmp_path)
    ids = tmp_path / "ids.jsonl"
    ids.write_text('{"input_ids": [5, 6, 7]}\n')
    done = run_cli("generate", "--model-path", bare, "--load-format", "dummy", "--input", str(ids))
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["text"] is None  # no tokenizer: ids only


def test_bos_follows_the_tokenizers_own_settings(tmp_path):
    vocab = {"[UNK]": 0, "hello": 1, "world": 2, "<s>": 3, "</s>": 4}
    impl = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    impl.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    config = types.SimpleNamespace(vocab_size=5)

    def encoded(tokenizer_config: dict | None) -> list[int]:
        impl.save(str(tmp_path / "tokenizer.json"))
        if tokenizer_config is not None:
            (tmp_path / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
        return load_tokenizer(str(tmp_path), config).encode("hello world")

    # no post-processor: tokenizer_config.json's add_bos_token / add_eos_token decide
    assert encoded(None) == [1, 2]
    assert encoded({"bos_token": "<s>", "add_bos_token": True}) == [3, 1, 2]
    assert encoded({"bos_token": "<s>", "eos_token": {"content": "</s>"}, "add_bos_token": True,
                    "add_eos_token": True}) == [3, 1, 2, 4]  # fmt: skip
    # a post-processor in tokenizer.json is the tokenizer's own setting, and wins
    impl.post_processor = tokenizers.processors.TemplateProcessing(
        single="<s>:0 $A:0", special_tokens=[("<s>", 3)]
    )
    assert encoded({"bos_token": "<s>", "add_bos_token": False}) == [3, 1, 2]


CLI_MISTAKES = [
    ("generate", "--model", "DeepseekV3ForCausalLM", "--tp-size", "3", "--prompt", "a"),
    ("generate", "--device", "cuda", "--tp-size", "2", "--prompt", "a"),
    ("serve", "--nnodes", "2", "--tp-size", "2"),
    ("serve", "--context-length", "2048", "--max-total-tokens", "1024", "--port", "0"),
]


@pytest.mark.parametrize("argv", CLI_MISTAKES, ids=lambda argv: " ".join(argv[:3]))
def test_the_command_exits_2_with_one_line_within_20s(argv):
    if "cuda" in argv and torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    start = time.monotonic()
    done = run_cli(*argv, timeout=60)
    assert done.returncode == 2 and done.stdout == ""
    (line,) = done.stderr.splitlines()
    assert line.startswith("parcap: error: --")  # the flag first, then the numbers
    assert time.monotonic() - start < 20


def test_a_checkpoint_that_does_not_fit_names_the_file_and_the_tensor(tmp_path):
    """What only a rank finds out (a shape, a stray or a missing tensor) names both."""
    config = types.SimpleNamespace(**LlamaForCausalLM.tiny_config())
    shapes = LlamaForCausalLM.checkpoint_shapes(config)
    good = {name: torch.zeros(shape) for name, shape in shapes.items()}

    def error(tensors: dict) -> str:
        save_file(tensors, str(tmp_path / "model.safetensors"))
        with pytest.raises(CheckpointError) as info:
            load_checkpoint(build(LlamaForCausalLM, config), tmp_path)
        return str(info.value)

    file = tmp_path / "model.safetensors"
    bad = {**good, "model.norm.weight": torch.zeros(3)}
    assert error(bad) == (
        f"model.norm.weight: shape (3,) in {file}, LlamaForCausalLM expects (64,)"
    )
    stray = {**good, "model.layers.0.mlp.extra.weight": torch.zeros(2)}
    assert error(stray).startswith(f"model.layers.0.mlp.extra.weight: unexpected tensor in {file}")
    missing = {k: v for k, v in good.items() if k != "model.norm.weight"}
    assert error(missing) == f"model.norm.weight: missing from {file}"
