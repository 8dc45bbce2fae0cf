"""The runtime's single-process parts: scheduler, graph runner padding, sampling, tokenizer."""

from __future__ import annotations

import types

import pytest
import torch

from engine.forward_batch import ForwardMode
from engine.graph_runner import GraphRunner, capture_sizes
from engine.kv_cache import KVPool, ReqToTokenPool
from engine.model_runner import num_token_non_padded
from engine.sampling import sample
from engine.scheduler import Limits, Scheduler
from engine.sequence import Request, SamplingParams, Sequence
from engine.tokenizer import ByteTokenizer, HFTokenizer, eos_ids, load_tokenizer
from registry import ParallelCapabilities, PlanArgs, resolve_plan

EOS = 99


def make_scheduler(slots=64, max_running=8, max_prefill=64, context=48) -> Scheduler:
    kv = KVPool(slots, [[(1, 1), (1, 1)]], torch.float32, torch.device("cpu"))
    table = ReqToTokenPool(max_running, context, torch.device("cpu"))
    return Scheduler(kv, table, Limits(max_running, max_prefill, slots, context), frozenset({EOS}))


def request(rid, prompt_len, max_new, ignore_eos=True, first=1):
    params = SamplingParams(max_new_tokens=max_new, ignore_eos=ignore_eos)
    return Request.make(rid, [first + i for i in range(prompt_len)], params, 0)


def next_token(seq: Sequence) -> int:
    """A stand-in model: the next token depends on the whole context, as a real one does."""
    return (sum(t * (i + 1) for i, t in enumerate(seq.token_ids)) * 7 + 3) % 97


def drive(scheduler: Scheduler, arrivals: dict[int, list[Request]], check=None) -> dict:
    """Run to completion, adding `arrivals[step]` before each step; tokens per request."""
    out, step = {}, 0
    while scheduler.has_work or any(s >= step for s in arrivals):
        for r in arrivals.get(step, []):
            assert scheduler.add(r) is None
        batch = scheduler.schedule()
        step += 1
        if batch is None:
            continue
        if check:
            check(scheduler, batch)
        tokens = [next_token(s) for s in batch.seqs]
        for event in scheduler.update(batch, tokens, [0.0] * len(tokens)):
            out.setdefault(event.rid, []).append(event.token_id)
    return out


def alone(req: Request, **limits) -> list[int]:
    return drive(make_scheduler(**limits), {0: [req]})[req.rid]


def test_continuous_batching_matches_each_request_alone():
    reqs = [request(0, 5, 6), request(1, 2, 9, first=40), request(2, 11, 3), request(3, 1, 7)]
    arrivals = {0: [reqs[0]], 2: [reqs[1], reqs[2]], 5: [reqs[3]]}
    modes = []
    sched = make_scheduler()
    together = drive(sched, arrivals, lambda s, b: modes.append(b.mode))
    for r in reqs:
        assert together[r.rid] == alone(r)
        assert len(together[r.rid]) == r.params.max_new_tokens
    # new requests joined between steps: prefill after decode steps had begun
    assert modes[:3] == [ForwardMode.EXTEND, ForwardMode.DECODE, ForwardMode.EXTEND]
    assert sched.kv.available == sched.kv.num_slots and sched.table.available == 8


def test_full_cache_makes_requests_wait_in_order_never_overcommit():
    # each request reserves 10 + 6 - 1 = 15 slots; 32 slots hold two at a time
    reqs = [request(i, 10, 6, first=10 * i) for i in range(4)]
    sched = make_scheduler(slots=32)

    def check(s, batch):
        reserved = sum(len(q.slots) for q in s.running)
        assert reserved + s.kv.available == 32 and len(s.running) <= 2
        assert all(len(q.slots) == q.budget for q in s.running)
        assert [q.rid for q in s.waiting] == sorted(q.rid for q in s.waiting)

    together = drive(sched, {0: reqs}, check)
    assert all(together[r.rid] == alone(r) for r in reqs)
    assert sched.kv.available == 32


def test_limits_on_running_requests_and_prefill_tokens():
    sched = make_scheduler(max_running=2, max_prefill=12)
    for i in range(3):
        sched.add(request(i, 5, 4))
    first = sched.schedule()
    assert first.mode is ForwardMode.EXTEND and [s.rid for s in first.seqs] == [0, 1]
    assert first.num_tokens == 10
    assert sched.schedule().mode is ForwardMode.DECODE  # the third waits for a free slot


def test_prompt_longer_than_prefill_budget_waits_for_its_own_step():
    sched = make_scheduler(max_prefill=8)
    sched.add(request(0, 5, 2))
    sched.add(request(1, 5, 2))
    assert [s.rid for s in sched.schedule().seqs] == [0]
    assert [s.rid for s in sched.schedule().seqs] == [1]


@pytest.mark.parametrize(
    ("prompt_len", "max_new", "message"),
    [
        (0, 4, "the prompt is empty"),
        (40, 10, "exceeds the model's context length 48"),
        (30, 1, "exceeds --max-prefill-tokens 20"),
        (20, 20, "more than --max-total-tokens 32"),
    ],
)
def test_requests_that_can_never_run_finish_with_an_error(prompt_len, max_new, message):
    sched = make_scheduler(slots=32, max_prefill=20)
    event = sched.add(request(7, prompt_len, max_new))
    assert event.rid == 7 and event.finished and event.finish_reason == "error"
    assert message in event.error and event.token_id is None
    assert not sched.has_work


def test_stop_on_eos_and_length_frees_the_cache():
    sched = make_scheduler()
    sched.add(request(0, 3, 10, ignore_eos=False))
    sched.add(request(1, 3, 10, ignore_eos=True))
    sched.add(request(2, 3, 2, ignore_eos=False))
    batch = sched.schedule()
    events = sched.update(batch, [5, EOS, 6], [-1.0, -2.0, -3.0])
    assert [e.finished for e in events] == [False, False, False]
    batch = sched.schedule()
    events = sched.update(batch, [EOS, EOS, 7], [-1.0, -2.0, -3.0])
    assert [(e.rid, e.finished, e.finish_reason) for e in events] == [
        (0, True, "stop"),
        (1, False, None),
        (2, True, "length"),
    ]
    assert [s.rid for s in sched.running] == [1]
    assert sched.kv.available == 64 - sched.running[0].budget


def test_abort_waiting_and_running_requests():
    sched = make_scheduler(max_running=1)
    sched.add(request(0, 3, 5))
    sched.add(request(1, 3, 5))
    sched.schedule()
    assert sched.abort(1).finish_reason == "abort"  # waiting
    assert sched.abort(0).finish_reason == "abort"  # running
    assert sched.abort(0) is None
    assert not sched.has_work and sched.kv.available == 64 and sched.table.available == 1


def test_idle_after_predicts_the_end_of_work():
    sched = make_scheduler()
    sched.add(request(0, 2, 2))
    batch = sched.schedule()
    assert not sched.idle_after(batch)  # one more token to go
    sched.update(batch, [1], [0.0])
    batch = sched.schedule()
    assert sched.idle_after(batch)
    sched.add(request(1, 2, 2))
    assert not sched.idle_after(batch)


# -- graph runner ---------------------------------------------------------------------


def test_capture_sizes_are_aligned_buckets():
    assert capture_sizes(32, 1) == [1, 2, 4, 8, 16, 24, 32]
    assert capture_sizes(32, 2) == [2, 4, 8, 16, 24, 32]
    assert capture_sizes(20, 8) == [8, 16, 24]
    assert capture_sizes(5, 1) == [1, 2, 4, 5]


def plan(**kw):
    return resolve_plan(ParallelCapabilities(), PlanArgs(**kw))


def runner(p, max_bs=32, disable=False):
    return GraphRunner(p, max_bs, disable, 64, torch.float32, torch.device("cpu"))


def test_padding_follows_the_plan_alignment():
    g = runner(plan(tp_size=4, moe_dense_tp_size=1))
    assert g.alignment == 4 and all(s % 4 == 0 for s in g.sizes)
    assert g.can_run(3, is_decode=True) and not g.can_run(3, is_decode=False)
    assert g.padded(3, graph_tokens=3) == 4
    assert g.padded(17, graph_tokens=17) == 24  # the bucket, beyond the alignment
    assert not g.can_run(33, is_decode=True) and g.padded(33, None) == 36
    g.count_padding([3, 17, 8, 0])
    assert g.padding_tokens == 1 + 3 + 0 + 0
    plain = runner(plan(tp_size=4))
    assert plain.padded(5, None) == 5 and plain.padded(5, 5) == 8


@pytest.mark.parametrize(
    ("kw", "rows"),
    [
        ({"tp_size": 2}, 0),
        ({"tp_size": 2, "moe_dense_tp_size": 1}, 32),
        ({"tp_size": 4, "dp_size": 2, "enable_dp_attention": True}, 64),
        (
            {"tp_size": 4, "dp_size": 2, "enable_dp_attention": True, "moe_dense_tp_size": 1},
            64,
        ),
    ],
)
def test_gathered_buffer_allocated_once_iff_the_plan_says(kw, rows):
    p = plan(**kw)
    g = runner(p)
    assert (g.buffer is not None) == p.gathered_buffer.value
    assert g.buffer_bytes == rows * 64 * 4


def test_disabled_graphs_pad_to_alignment_only():
    g = runner(plan(tp_size=2, moe_dense_tp_size=1), disable=True)
    assert g.sizes == [] and not g.can_run(1, is_decode=True)
    assert g.padded(3, None) == 4 and g.buffer_bytes == 32 * 64 * 4


def test_num_token_non_padded_is_shard_local_only_when_asked():
    assert [num_token_non_padded(5, 8, r, 4, True) for r in range(4)] == [2, 2, 1, 0]
    assert [num_token_non_padded(5, 8, r, 4, False) for r in range(4)] == [5, 5, 5, 5]


# -- sampling and tokenizer -------------------------------------------------------------


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
    tokenizers = pytest.importorskip("tokenizers")
    model = tokenizers.models.WordLevel({"[UNK]": 0, "hello": 1, "world": 2}, unk_token="[UNK]")
    impl = tokenizers.Tokenizer(model)
    impl.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    impl.save(str(tmp_path / "tokenizer.json"))
    tok = load_tokenizer(str(tmp_path), small)
    assert isinstance(tok, HFTokenizer)
    assert tok.encode("hello world") == [1, 2]
    assert tok.decode([1, 2]) == "hello world"
