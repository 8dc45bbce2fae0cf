"""Continuous batching in one rank's scheduler, driven by a stand-in model."""

from __future__ import annotations

import pytest
import torch

from engine.messages import Limits, Request, SamplingParams
from engine.model_api.forward_batch import ForwardMode
from engine.runtime.kv_cache import KVPool, ReqToTokenPool
from engine.runtime.scheduler import Scheduler
from engine.runtime.sequence import Sequence

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
    assert not sched.idle_after()  # one more token to go
    sched.update(batch, [1], [0.0])
    batch = sched.schedule()
    assert sched.idle_after()
    sched.add(request(1, 2, 2))
    assert not sched.idle_after()
