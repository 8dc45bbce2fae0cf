"""DeepseekV4ForCausalLM in one process: greedy parity with transformers 5.23 over the paged
cache (whole and chunked prefill, padded batches), and its seeded random weights."""

from __future__ import annotations

import pytest
import torch

from engine.model_api.config import load_config
from engine.runtime.loader import load_checkpoint
from models.deepseek_v4 import DeepseekV4ForCausalLM
from tests.support.checkpoints import load_reference, parcap_greedy, reference_greedy
from tests.support.deepseek_v4 import (
    CASES,
    HCA,
    PROMPTS,
    STEPS,
    assert_no_near_tie,
    checkpoint,
    index_gaps,
    parcap_model,
    probe,
    tiny_random_model,
)

__all__ = ["checkpoint"]  # a fixture


@pytest.mark.parametrize("case", CASES)
def test_greedy_matches_transformers(case, checkpoint):
    """Prefill whole, in chunks of 3 and of 4 (later chunks extend cached windows, state
    rows and entries), then decode, in shared batches padded to 4 rows; the prompts evict
    from the window, close HCA and CSA entries and make the indexer's top-k bind."""
    path = checkpoint(case)
    config = load_config(path)
    model = parcap_model(config)
    load_checkpoint(model, path)
    runs = {
        chunk: parcap_greedy(model, PROMPTS, STEPS, chunk=chunk, pad_to=4) for chunk in (None, 3, 4)
    }

    reference = load_reference(path)
    expected = []
    with probe(reference) as seen:
        for prompt in PROMPTS:
            expected.append(reference_greedy(reference, prompt, STEPS))
    assert seen.longest > config.sliding_window
    assert seen.longest >= reference.config.compress_rates[HCA]
    assert seen.gaps, "the indexer's top-k never bound"
    assert seen.clamped > 0.1 * seen.gates, f"clamp fired on {seen.clamped}/{seen.gates} gates"
    assert_no_near_tie(seen.gaps)

    for chunk, (tokens, logprobs, _) in runs.items():
        for ours, our_logprobs, (ref_tokens, ref_logprobs) in zip(tokens, logprobs, expected):
            assert ours == ref_tokens, f"chunk {chunk}"
            assert our_logprobs == pytest.approx(ref_logprobs, abs=1e-4), f"chunk {chunk}"
    assert len({t for out in runs[None][0] for t in out}) > 3


def test_near_tie_guard_names_a_tie_as_such():
    clear, tied = [0.9, 0.6, 0.3, 0.0], [0.5, 0.3, 0.3 + 1e-7, 0.1]
    gaps = index_gaps(torch.tensor([clear] * 11 + [tied]), rate=3, top_k=2)
    assert gaps == pytest.approx([0.3, 0.3, 0.3, 1e-7], abs=1e-7)  # queries 8..11 bind
    with pytest.raises(AssertionError, match="near-tie"):
        assert_no_near_tie(gaps)
    assert_no_near_tie(gaps[:3])
    exact_zeros = index_gaps(torch.tensor([[0.2, 0.0, 0.0, -0.1]] * 12), rate=3, top_k=2)
    with pytest.raises(AssertionError, match="near-tie"):
        assert_no_near_tie(exact_zeros)


def test_padding_rows_do_not_change_a_request():
    """pad_to 4 vs 1: the padding rows (token 0, position 0, the sink slot) route nowhere
    and write no request's cache (differences: matmul rounding over more rows)."""
    model = tiny_random_model()
    _, _, padded = parcap_greedy(model, PROMPTS[1:3], 4, chunk=3, pad_to=4)
    _, _, unpadded = parcap_greedy(model, PROMPTS[1:3], 4, chunk=3, pad_to=1)
    for a, b in zip(padded, unpadded, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


def test_tiny_config_with_random_weights_decodes_varied_tokens():
    assert DeepseekV4ForCausalLM.parallel_capabilities.self_managed_sp is True
    tokens, logprobs, _ = parcap_greedy(tiny_random_model(), [list(b"Hello, world")], 24)
    assert len(set(tokens[0])) > 8
    assert all(lp > -5.9 for lp in logprobs[0])  # above uniform over 384 tokens (-5.95)


def test_released_checkpoint_names_load_as_the_saved_ones(checkpoint, tmp_path):
    """DeepSeek's released naming (``embed.weight``, ``layers.{i}...``, ``hc_head_fn``, an
    ``mtp.*`` block to skip) loads into the same weights as transformers' saved naming."""
    from safetensors.torch import load_file, save_file

    from models.deepseek_v4_weights import _HUB_TOP

    path = checkpoint("tiny")
    saved = load_file(path / "model.safetensors")
    to_hub = {v: k for k, v in _HUB_TOP.items()}
    hub = {to_hub.get(name, name.removeprefix("model.")): t for name, t in saved.items()}
    hub["mtp.0.emb.weight"] = torch.zeros(2, 2)
    assert set(hub) != set(saved) and "layers.0.attn.wq_a.weight" in hub
    released = tmp_path / "released"
    released.mkdir()
    (released / "config.json").write_text((path / "config.json").read_text())
    save_file(hub, released / "model.safetensors")
    models = []
    for where in (path, released):
        model = parcap_model(load_config(path))
        load_checkpoint(model, where)
        models.append(model.state_dict())
    for name, tensor in models[0].items():
        torch.testing.assert_close(models[1][name], tensor, rtol=0, atol=0)
