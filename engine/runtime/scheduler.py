"""Continuous batching for one attention-DP group.

Every rank of the group runs its own copy on the same broadcast requests, so all copies
make the same decisions. A step is either a prefill of waiting requests (preferred when
the head of the queue fits) or one decode token for every running request. Admission
reserves a request's whole KV budget (prompt + max_new_tokens - 1 slots), so a running
request never runs out of cache; the queue waits in order until slots free up.
"""

from __future__ import annotations

from collections import deque

from attrs import frozen

from engine.messages import Event, Limits, Request
from engine.model_api.forward_batch import ForwardMode
from engine.runtime.kv_cache import KVPool, ReqToTokenPool
from engine.runtime.sequence import Sequence, Status


@frozen
class Batch:
    mode: ForwardMode
    seqs: list[Sequence]

    @property
    def num_tokens(self) -> int:
        if self.mode is ForwardMode.EXTEND:
            return sum(len(s) for s in self.seqs)
        return len(self.seqs)


class Scheduler:
    def __init__(
        self, kv: KVPool, table: ReqToTokenPool, limits: Limits, eos_ids: frozenset[int]
    ) -> None:
        self.kv = kv
        self.table = table
        self.limits = limits
        self.eos_ids = eos_ids
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def add(self, request: Request) -> Event | None:
        """Queue `request`; a request that can never run finishes at once with an error."""
        reason = self.limits.check(len(request.prompt_ids), request.params.max_new_tokens)
        if reason is not None:
            return Event(request.rid, None, None, True, "error", reason)
        self.waiting.append(Sequence(request))
        return None

    def abort(self, rid: int) -> Event | None:
        for seq in [*self.waiting, *self.running]:
            if seq.rid == rid:
                if seq.status is Status.WAITING:
                    self.waiting.remove(seq)
                else:
                    self._release(seq)
                return Event(rid, None, None, True, "abort")
        return None

    def schedule(self) -> Batch | None:
        """The next step, committed: each of its sequences has one more token in flight.
        A sequence whose outputs in flight already reach max_new_tokens sits it out."""
        admitted = self._admit()
        if admitted:
            batch = Batch(ForwardMode.EXTEND, admitted)
        else:
            decoding = [s for s in self.running if s.scheduled_outputs < s.params.max_new_tokens]
            if not decoding:
                return None
            batch = Batch(ForwardMode.DECODE, decoding)
        for seq in batch.seqs:
            seq.in_flight += 1
        return batch

    def _admit(self) -> list[Sequence]:
        admitted: list[Sequence] = []
        tokens = 0
        while self.waiting:
            seq = self.waiting[0]
            if (
                len(self.running) >= self.limits.max_running_requests
                or tokens + len(seq) > self.limits.max_prefill_tokens
                or self.kv.available < seq.budget
                or self.table.available == 0
            ):
                break
            self.waiting.popleft()
            seq.slots = self.kv.alloc(seq.budget)
            seq.row = self.table.alloc()
            self.table.write(seq.row, 0, seq.slots)
            seq.status = Status.RUNNING
            self.running.append(seq)
            admitted.append(seq)
            tokens += len(seq)
        return admitted

    def idle_after(self) -> bool:
        """True when, barring new requests, nothing is left once the scheduled steps ran."""
        if self.waiting:
            return False
        return all(s.scheduled_outputs >= s.params.max_new_tokens for s in self.running)

    def update(self, batch: Batch, tokens: list[int], logprobs: list[float]) -> list[Event]:
        """Append each sequence's sampled token; finished sequences leave and free their KV.
        A sequence that finished or was aborted since the step was scheduled (the overlap
        scheduler's one wasted step) takes nothing."""
        events = []
        for seq, token, logprob in zip(batch.seqs, tokens, logprobs, strict=True):
            if seq.status is not Status.RUNNING:
                continue
            seq.in_flight -= 1
            seq.token_ids.append(token)
            reason = None
            if token in self.eos_ids and not seq.params.ignore_eos:
                reason = "stop"
            elif seq.num_output >= seq.params.max_new_tokens:
                reason = "length"
            if reason is not None:
                self._release(seq)
            events.append(Event(seq.rid, token, logprob, reason is not None, reason))
        return events

    def _release(self, seq: Sequence) -> None:
        seq.status = Status.FINISHED
        self.running.remove(seq)
        self.kv.free(seq.slots)
        self.table.free(seq.row)
        seq.slots, seq.row = [], None
