"""Sampling from logits and the front end's tokenizers."""

from __future__ import annotations

import types

import pytest
import tokenizers  # a dependency of transformers, so of the test extra
import torch

from engine.frontend.tokenizer import ByteTokenizer, HFTokenizer, eos_ids, load_tokenizer
from engine.messages import Request, SamplingParams
from engine.runtime.sampling import sample
from engine.runtime.sequence import Sequence


def seqs(*params):
    return [Sequence(Request.make(i, [1], p, 1234)) for i, p in enumerate(params)]


def test_greedy_takes_argmax_with_the_models_logprob():
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(0))
    tokens, logprobs = sample(logits, seqs(*[SamplingParams()] * 3))
    assert tokens == logits.argmax(-1).tolist()
    expected = torch.log_softmax(logits, -1)[torch.arange(3), logits.argmax(-1)]
    assert logprobs == pytest.approx(expected.tolist(), abs=1e-6)


def test_mixed_batch_draws_only_its_sampled_rows_and_ignores_padding_rows():
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(5, 50, generator=gen)  # 3 requests, then 2 padding rows of a graph
    params = [SamplingParams(), SamplingParams(temperature=1.0), SamplingParams()]
    tokens, logprobs = sample(logits, seqs(*params))
    assert len(tokens) == len(logprobs) == 3
    assert [tokens[0], tokens[2]] == logits[[0, 2]].argmax(-1).tolist()
    expected = torch.log_softmax(logits[:3], -1)[torch.arange(3), torch.tensor(tokens)]
    assert logprobs == pytest.approx(expected.tolist(), abs=1e-6)
    assert sample(logits, seqs(*params)) == (tokens, logprobs)  # same seeds, same draw


def test_seeded_sampling_repeats_and_respects_top_k_top_p():
    logits = torch.full((1, 300), -20.0)
    logits[0, :5] = torch.tensor([5.0, 4.0, 3.0, 2.0, 1.0])
    hot = SamplingParams(temperature=1.0)

    def draws(params, seed, n=30):
        (seq,) = seqs(params)
        seq.seed = seed
        return [sample(logits, [seq])[0][0] for _ in range(n)]

    assert draws(hot, 1) == draws(hot, 1)
    assert draws(hot, 1) != draws(hot, 2)
    assert set(draws(SamplingParams(temperature=1.0, top_k=2), 3)) <= {0, 1}
    assert set(draws(SamplingParams(temperature=1.0, top_p=0.5), 3)) == {0}
    assert set(draws(SamplingParams(temperature=2.0, top_k=1), 3)) == {0}


def test_byte_tokenizer_round_trip():
    tok = ByteTokenizer()
    ids = tok.encode("héllo")
    assert ids[0] == 256 and ids[1:] == list("héllo".encode())
    assert tok.decode([*ids, 257]) == "héllo"
    assert tok.decode([0xC3]) == "\ufffd"


def test_tokenizer_choice_and_eos(tmp_path):
    small = types.SimpleNamespace(vocab_size=200, eos_token_id=[3, 4])
    assert load_tokenizer(None, small) is None
    assert eos_ids(small) == {3, 4}
    assert isinstance(load_tokenizer(None, types.SimpleNamespace(vocab_size=384)), ByteTokenizer)
    assert eos_ids(types.SimpleNamespace(vocab_size=384)) == {257}
    model = tokenizers.models.WordLevel({"[UNK]": 0, "hello": 1, "world": 2}, unk_token="[UNK]")
    impl = tokenizers.Tokenizer(model)
    impl.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    impl.save(str(tmp_path / "tokenizer.json"))
    tok = load_tokenizer(str(tmp_path), small)
    assert isinstance(tok, HFTokenizer)
    assert tok.encode("hello world") == [1, 2]
    assert tok.decode([1, 2]) == "hello world"
