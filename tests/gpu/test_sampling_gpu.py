"""The sampler on CUDA logits: the same seeded frequency tests as on CPU (temperature not 1,
top-k, top-p against the exact distribution, chi-square at ALPHA = 1e-3), the very same
draws as from CPU logits for the same seeds, and greedy rows left on the device."""

from __future__ import annotations

import pytest
import torch

from engine.messages import Request, SamplingParams
from engine.runtime.sampling import sample
from engine.runtime.sequence import Sequence
from tests.unit.test_sampling_statistics import CASES, check_distribution, counts_of, draw_tokens

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]


@pytest.mark.parametrize("case", list(CASES))
def test_cuda_draws_follow_the_exact_distribution_and_match_cpu(case):
    params = CASES[case]
    on_gpu = draw_tokens(params, device="cuda")
    check_distribution(counts_of(on_gpu), params)
    # a request's draws depend on its seed and the logits alone, not on their device
    assert torch.equal(on_gpu, draw_tokens(params, device="cpu"))


def test_mixed_batch_on_cuda():
    """Greedy rows take the argmax of bf16-computed logits on the device; a drawn row is
    reported with its logprob under the model's distribution; padding rows are ignored."""
    gen = torch.Generator(device="cuda").manual_seed(0)
    logits = torch.randn(6, 1000, generator=gen, device="cuda").bfloat16().float()
    params = [SamplingParams(), SamplingParams(temperature=0.7, top_k=20), SamplingParams()]
    seqs = [Sequence(Request.make(i, [1], p, 9)) for i, p in enumerate(params)]
    tokens, logprobs = sample(logits, seqs)  # 3 requests, 3 padding rows
    assert len(tokens) == 3
    assert [tokens[0], tokens[2]] == logits[[0, 2]].argmax(-1).tolist()
    assert tokens[1] in torch.topk(logits[1], 20).indices.tolist()
    expected = torch.log_softmax(logits[:3], -1)[torch.arange(3), torch.tensor(tokens)]
    assert logprobs == pytest.approx(expected.tolist(), abs=1e-5)
