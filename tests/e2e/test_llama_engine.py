"""Llama end to end through LLMEngine (real gloo ranks): against transformers, across TP
sizes and plans, with requests arriving while others run."""

from __future__ import annotations

import json
import shutil
import time

import pytest

from engine.frontend.llm_engine import LLMEngine
from engine.messages import SamplingParams
from tests.support.checkpoints import (
    LLAMA_H64,
    load_reference,
    reference_greedy,
    save_tiny_checkpoint,
)
from tests.support.engine import assert_close, cached_generate, generate, gone, server_args

pytestmark = pytest.mark.slow

CASES = {
    "gqa-untied": {"num_key_value_heads": 2},
    "gqa-tied": {"num_key_value_heads": 2, "tie_word_embeddings": True, "head_dim": 8},
}
PROMPTS = [[1, 2, 3, 4, 5], [17, 99, 3, 250, 8, 8, 41, 300, 2, 77, 5], [200, 201, 202]]
STEPS = 8
GREEDY = SamplingParams(max_new_tokens=STEPS, ignore_eos=True)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """Per case: the checkpoint and transformers' greedy tokens and logprobs per prompt."""
    root, out = tmp_path_factory.mktemp("llama-engine"), {}
    for name, extra in CASES.items():
        path = save_tiny_checkpoint(root / name, {**LLAMA_H64, **extra}, seed=3)
        model = load_reference(path)
        out[name] = (path, [reference_greedy(model, p, STEPS) for p in PROMPTS])
    return out


@pytest.mark.parametrize("tp", [1, 2])
@pytest.mark.parametrize("case", list(CASES))
def test_matches_transformers(checkpoints, case, tp):
    path, reference = checkpoints[case]
    results, _ = generate(("--model-path", str(path), "--tp-size", str(tp)), PROMPTS, [GREEDY] * 3)
    for result, (tokens, logprobs) in zip(results, reference, strict=True):
        assert result.output_ids == tokens
        assert_close(result.output_logprobs, logprobs, 1e-4)
        assert result.finish_reason == "length"


def test_stops_where_transformers_eos_says(checkpoints, tmp_path):
    path, reference = checkpoints["gqa-untied"]
    tokens = reference[1][0]
    cut = next(i for i in range(1, STEPS) if tokens[i] not in tokens[:i])
    eos = tokens[cut]
    copy = shutil.copytree(path, tmp_path / "eos")
    for name in ("config.json", "generation_config.json"):
        file = copy / name
        if file.exists():
            file.write_text(json.dumps({**json.loads(file.read_text()), "eos_token_id": eos}))
    params = SamplingParams(max_new_tokens=STEPS)
    results, _ = generate(("--model-path", str(copy)), PROMPTS, [params] * 3)
    assert results[1].output_ids == tokens[: cut + 1] and results[1].finish_reason == "stop"
    for result, (ref, _) in zip(results, reference, strict=True):
        expected = ref[: ref.index(eos) + 1] if eos in ref else ref
        assert result.output_ids == expected


# -- the embedded default across TP sizes and plans --------------------------------------

EMBEDDED_PROMPTS = (
    (256, 104, 101, 108, 108, 111),
    (256, 97, 98),
    tuple(range(256, 256 - 13, -1)),
    (256, 7),
)
MAX_NEW = (4, 6, 8, 5)
SAMPLED = {"temperature": 0.9, "top_p": 0.9, "top_k": 50}  # seeded: the same on every rank
PARAMS = tuple(
    SamplingParams(max_new_tokens=n, ignore_eos=True, **(SAMPLED if i == 3 else {}))
    for i, n in enumerate(MAX_NEW)
)


def embedded(*argv: str):
    return cached_generate(argv, EMBEDDED_PROMPTS, PARAMS)


def tokens_of(results):
    return [r.output_ids for r in results]


@pytest.mark.parametrize("tp", [2, 4])
def test_tp_sizes_give_identical_tokens(tp):
    base, _ = embedded("--tp-size", "1")
    results, _ = embedded("--tp-size", str(tp))
    assert tokens_of(results) == tokens_of(base)
    for a, b in zip(results, base, strict=True):
        assert_close(a.output_logprobs, b.output_logprobs, 1e-4)


def decode_rows():
    """Running requests at each decode step: all prefill together in step 1."""
    return [sum(n > k for n in MAX_NEW) for k in range(1, max(MAX_NEW))]


def test_counters_without_gather():
    _, report = embedded("--tp-size", "2")
    c = report["counters"]
    assert report["plan"]["plan"]["mlp_sync"]["value"] is False
    assert c["steps"] == 1 + len(decode_rows())
    assert c["mlp_sync_calls"] == 0 and c["gathered_buffer_bytes"] == 0
    assert c["attn_tp_padding_tokens"] == 0
    assert c["capture_sizes"] == [1, 2, 4, 8, 16, 24, 32]
    assert report["timings"]["ttft_ms"] > 0 and report["timings"]["tpot_ms"] > 0


def test_counters_with_attn_tp_gather():
    base, _ = embedded("--tp-size", "1")
    results, report = embedded("--tp-size", "2", "--moe-dense-tp-size", "1")
    assert tokens_of(results) == tokens_of(base)
    plan, c = report["plan"]["plan"], report["counters"]
    assert plan["gathered_buffer"]["value"] and plan["mlp_sync"]["value"]
    assert plan["token_alignment"]["value"] == 2
    assert c["steps"] == 1 + len(decode_rows())
    assert c["mlp_sync_calls"] == c["steps"]
    assert c["capture_sizes"] == [2, 4, 8, 16, 24, 32]
    assert c["gathered_buffer_bytes"] == 32 * 64 * 4  # largest capture size x hidden x fp32
    prefill = sum(map(len, EMBEDDED_PROMPTS))
    assert c["attn_tp_padding_tokens"] == prefill % 2 + sum(n % 2 for n in decode_rows())
    assert c["attn_tp_padding_tokens"] > 0


def test_dp_attention_runs_idle_batches_and_gives_the_same_tokens():
    base, _ = embedded("--tp-size", "1")
    results, report = embedded("--tp-size", "2", "--dp-size", "2", "--enable-dp-attention")
    assert tokens_of(results) == tokens_of(base)
    c = report["counters"]
    # group 0 serves requests 0 and 2 (8 steps), group 1 requests 1 and 3 (6, then idle)
    assert c["steps"] == max(MAX_NEW) and c["mlp_sync_calls"] == c["steps"]
    assert c["gathered_buffer_bytes"] == 32 * 2 * 64 * 4
    assert c["attn_tp_padding_tokens"] == 0


# -- requests over time -------------------------------------------------------------------


def test_requests_arriving_mid_run_match_running_alone():
    prompts = [list(p) for p in EMBEDDED_PROMPTS[:3]]
    params = [SamplingParams(max_new_tokens=40, ignore_eos=True)]
    params += [SamplingParams(max_new_tokens=n) for n in (5, 9)]
    with LLMEngine(server_args("--tp-size", "2", "--max-prefill-tokens", "64")) as engine:
        alone = [engine.generate([p], [q])[0] for p, q in zip(prompts, params, strict=True)]
        rids = [engine.submit(prompts[0], params[0], keep=True)]
        # finished as polled: result() runs ahead of poll(), whose queue may still hold a
        # final event that would then be taken for the next request's
        finished = set()
        while len(rids) < 3 or finished != set(rids):
            event = engine.poll(timeout=30)
            assert event is not None
            if event.finished:
                finished.add(event.rid)
            if len(rids) == 1 and len(engine.result(rids[0]).output_ids) == 3:
                rids.append(engine.submit(prompts[1], params[1], keep=True))
            elif len(rids) == 2 and engine.result(rids[1]).output_ids:
                rids.append(engine.submit(prompts[2], params[2], keep=True))
        together = [engine.take(rid) for rid in rids]
        assert together[0].last_token > together[2].first_token  # they overlapped

        # a request that can never fit finishes with an error; one in flight can be aborted
        bad = engine.submit([1] * 200)
        event = engine.poll(timeout=30)
        assert (event.rid, event.finish_reason) == (bad, "error")
        assert "--max-prefill-tokens 64" in event.error
        with pytest.raises(ValueError, match="outside the vocabulary"):
            engine.submit([100_000])
        steps_before = engine.report()["counters"]["steps"]
        long = engine.submit(
            prompts[0], SamplingParams(max_new_tokens=100, ignore_eos=True), keep=True
        )
        assert engine.poll(timeout=30).rid == long
        engine.abort(long)
        while not (event := engine.poll(timeout=30)).finished:
            pass
        decoded = len(engine.result(long).output_ids)
        assert event.finish_reason == "abort" and decoded < 100
        # the abort left rank 0 without work and without a step: its counters still arrive.
        # The overlap scheduler had launched one more step when the abort came: its token
        # is dropped, never sent.
        deadline = time.monotonic() + 10
        while engine.report()["counters"]["steps"] != steps_before + decoded + 1:
            assert time.monotonic() < deadline, engine.report()["counters"]
            time.sleep(0.05)
    assert all(gone(pid) for pid in engine.pids)
    for result, single in zip(together, alone, strict=True):
        assert result.output_ids == single.output_ids
        assert_close(result.output_logprobs, single.output_logprobs, 1e-4)
        assert result.finish_reason == single.finish_reason
