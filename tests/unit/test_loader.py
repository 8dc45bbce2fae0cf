import json
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from engine.model_api import RankGroup
from engine.model_api.config import checkpoint_dtype, config_from_dict, head_dim, load_config
from engine.model_api.weights import CheckpointError, TensorSource
from engine.runtime.loader import (
    RandomSource,
    iter_checkpoint,
    load_checkpoint,
    load_model,
    random_tensor,
    random_weights,
)
from models.layers.linear import ColumnParallelLinear, RowParallelLinear
from models.llama import LlamaForCausalLM
from tests.support.checkpoints import (
    LLAMA_H32,
    load_reference,
    parcap_greedy,
    save_tiny_checkpoint,
)
from tests.support.models import build


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt")
    single = save_tiny_checkpoint(root / "single", LLAMA_H32, seed=3)
    sharded = save_tiny_checkpoint(root / "sharded", LLAMA_H32, seed=3, max_shard_size="40KB")
    return single, sharded


def new_model(path_or_config):
    config = (
        path_or_config
        if isinstance(path_or_config, types.SimpleNamespace)
        else load_config(path_or_config)
    )
    return build(LlamaForCausalLM, config)


def tensors(path):
    return {name: source.full() for name, source in iter_checkpoint(path)}


def test_sharded_index_reads_the_same_tensors(checkpoints):
    single, sharded = checkpoints
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    a, b = tensors(single), tensors(sharded)
    assert a.keys() == b.keys() == set(index["weight_map"])
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=0)

    models = [new_model(single), new_model(sharded)]
    for model, path in zip(models, checkpoints):
        load_checkpoint(model, path)
    outs = [parcap_greedy(m, [[5, 6, 7]], 3)[2] for m in models]
    for x, y in zip(*outs):
        torch.testing.assert_close(x, y, rtol=0, atol=0)


def test_safetensors_narrow_reads_the_slice(checkpoints):
    sources = dict(iter_checkpoint(checkpoints[0]))
    source = sources["model.layers.1.self_attn.q_proj.weight"]
    full = source.full()
    torch.testing.assert_close(source.narrow(0, 8, 8), full.narrow(0, 8, 8))
    torch.testing.assert_close(source.narrow(1, 16, 16), full.narrow(1, 16, 16))


def in_memory(path):
    return [(name, TensorSource(t)) for name, t in tensors(path).items()]


def load_error(path, weights) -> str:
    with pytest.raises(CheckpointError) as info:
        load_model(new_model(path), weights)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_missing_tensor_is_named(checkpoints):
    weights = [
        (n, s) for n, s in in_memory(checkpoints[0]) if n != "model.layers.1.mlp.up_proj.weight"
    ]
    assert load_error(checkpoints[0], weights).startswith(
        "model.layers.1.mlp.up_proj.weight: missing"
    )


def test_unexpected_tensor_is_named(checkpoints):
    weights = in_memory(checkpoints[0]) + [
        ("model.layers.0.mlp.extra.weight", TensorSource(torch.zeros(2)))
    ]
    assert load_error(checkpoints[0], weights).startswith(
        "model.layers.0.mlp.extra.weight: unexpected"
    )


def test_misshaped_tensor_is_named(checkpoints):
    weights = dict(in_memory(checkpoints[0]))
    weights["model.layers.0.self_attn.k_proj.weight"] = TensorSource(torch.zeros(24, 32))
    message = load_error(checkpoints[0], list(weights.items()))
    assert message.startswith("model.layers.0.self_attn.k_proj.weight: shape (24, 32)")
    assert "(16, 32)" in message


def params_of(model) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def test_unused_buffers_and_tied_lm_head_are_skipped(tmp_path, checkpoints):
    """A checkpoint's rotary `inv_freq` buffer, and under tied embeddings a stray (here
    zero) `lm_head.weight`, change no weight: the model holds exactly the checkpoint's
    tensors, its LM head is the embedding, and its logits are transformers'."""
    plain = new_model(checkpoints[0])
    load_checkpoint(plain, checkpoints[0])
    weights = in_memory(checkpoints[0])
    weights.append(("model.layers.0.self_attn.rotary_emb.inv_freq", TensorSource(torch.zeros(4))))
    with_buffer = new_model(checkpoints[0])
    load_model(with_buffer, weights)
    for name, value in params_of(plain).items():
        torch.testing.assert_close(params_of(with_buffer)[name], value, rtol=0, atol=0)

    tied = save_tiny_checkpoint(tmp_path, {**LLAMA_H32, "tie_word_embeddings": True}, seed=4)
    names = tensors(tied)
    assert "lm_head.weight" not in names
    embedding = names["model.embed_tokens.weight"]
    assert embedding.abs().min() > 0  # a zeroed row would show
    extra = [*in_memory(tied), ("lm_head.weight", TensorSource(torch.zeros(300, 32)))]
    model = new_model(tied)
    load_model(model, extra)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    torch.testing.assert_close(model.lm_head.weight, embedding, rtol=0, atol=0)

    reference = load_reference(tied)
    prompt = [5, 6, 7, 250, 299]
    with torch.no_grad():
        expected = reference(input_ids=torch.tensor([prompt])).logits[0, -1]
    logits = parcap_greedy(model, [prompt], 1)[2][0][0]
    torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-4)


def test_checkpoint_files_must_exist(tmp_path, checkpoints):
    with pytest.raises(CheckpointError, match="no \\*.safetensors"):
        list(iter_checkpoint(tmp_path))
    index = {"weight_map": {"model.norm.weight": "model-00002-of-00002.safetensors"}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="model-00002-of-00002.safetensors"):
        list(iter_checkpoint(tmp_path))


def test_loader_reads_bf16_checkpoints_into_fp32(tmp_path, checkpoints):
    bf16 = {name: t.to(torch.bfloat16) for name, t in tensors(checkpoints[0]).items()}
    save_file(bf16, str(tmp_path / "model.safetensors"))
    model = new_model(checkpoints[0])
    load_checkpoint(model, tmp_path)
    expected = bf16["model.layers.0.mlp.down_proj.weight"].float()
    torch.testing.assert_close(model.model.layers[0].mlp.down_proj.weight, expected, rtol=0, atol=0)


def test_random_weights_are_seeded_per_name():
    shapes = {"a.weight": (6, 4), "b.weight": (6, 4)}
    first = {n: s.full() for n, s in random_weights(shapes, seed=7)}
    again = {n: s.full() for n, s in random_weights(dict(reversed(shapes.items())), seed=7)}
    other = {n: s.full() for n, s in random_weights(shapes, seed=8)}
    for name in shapes:
        torch.testing.assert_close(first[name], again[name], rtol=0, atol=0)
        assert not torch.equal(first[name], other[name])
    assert not torch.equal(first["a.weight"], first["b.weight"])


def test_random_weights_are_stable_across_processes():
    code = (
        "from engine.runtime.loader import random_tensor;"
        "print(repr(random_tensor('model.layers.0.mlp.up_proj.weight', (3, 5), 11).sum().item()))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        cwd=Path(__file__).parents[2],
    )
    here = random_tensor("model.layers.0.mlp.up_proj.weight", (3, 5), 11).sum().item()
    assert float(out.stdout) == here


def test_random_weight_scales():
    norm = random_tensor("model.layers.0.input_layernorm.weight", (4096,), 0)
    bias = random_tensor("model.layers.0.self_attn.q_proj.bias", (4096,), 0)
    matrix = random_tensor("model.layers.0.mlp.down_proj.weight", (256, 1024), 0)
    assert abs(norm.mean().item() - 1) < 0.01 and 0.05 < norm.std().item() < 0.2
    assert abs(bias.mean().item()) < 0.01 and bias.std().item() < 0.05
    assert matrix.std().item() == pytest.approx(1024**-0.5, rel=0.05)


@pytest.mark.parametrize("tp", [2, 4])
def test_random_shards_equal_narrow_of_the_full_tensor(tp):
    name = "model.layers.0.self_attn.o_proj.weight"
    source = RandomSource(name, (16, 32), seed=5)
    full = source.full()
    for rank in range(tp):
        group = RankGroup("tp", rank, tp)
        col = ColumnParallelLinear(32, 16, group)
        col.weight.weight_loader(col.weight, RandomSource(name, (16, 32), seed=5))
        row = RowParallelLinear(32, 16, group)
        row.weight.weight_loader(row.weight, RandomSource(name, (16, 32), seed=5))
        torch.testing.assert_close(col.weight, full.chunk(tp, 0)[rank], rtol=0, atol=0)
        torch.testing.assert_close(row.weight, full.chunk(tp, 1)[rank], rtol=0, atol=0)
        torch.testing.assert_close(
            source.narrow(1, rank * 32 // tp, 32 // tp), full.chunk(tp, 1)[rank]
        )


def test_model_config_helpers(tmp_path):
    (tmp_path / "config.json").write_text(
        json.dumps(
            {
                "hidden_size": 64,
                "num_attention_heads": 4,
                "torch_dtype": "bfloat16",
                "rope_scaling": {"a": 1},
            }
        )
    )
    for path in (tmp_path, tmp_path / "config.json"):
        config = load_config(path)
        assert head_dim(config) == 16
        assert config.rope_scaling == {"a": 1}
        assert checkpoint_dtype(config) is torch.bfloat16
    assert (
        head_dim(config_from_dict({"hidden_size": 64, "num_attention_heads": 4, "head_dim": 32}))
        == 32
    )
    assert checkpoint_dtype(config_from_dict({"dtype": "float32"})) is torch.float32
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_config(tmp_path / "absent")
