"""`parcap serve` end to end: a live server on 127.0.0.1, driven by the official openai client.

One server (tp 2) serves most tests and is shut down by SIGTERM in the last of them; a
second one has a rank killed under it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest

from engine.http.chat import ChatFormat
from tests.support.engine import wait_gone
from tests.support.served import PARCAP, Served

pytestmark = pytest.mark.slow

MODEL = "LlamaForCausalLM"
MAX_REQUEST_BYTES = 65536
PROMPTS = ["Hello, parcap", "The quick brown fox", "0123456789", "Tensor parallel"]
MAX_TOKENS = 24


def start_server(log: Path, *extra: str) -> Served:
    return Served(log, "--model", MODEL, "--tp-size", "2", *extra).wait_ready()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    s = start_server(
        tmp_path_factory.mktemp("serve") / "server.log",
        "--max-request-bytes",
        str(MAX_REQUEST_BYTES),
        "--graceful-timeout",
        "60",
    )
    try:
        yield s
    finally:
        s.kill()


@pytest.fixture(scope="module")
def generated():
    """`parcap generate` greedy output for PROMPTS, the reference the server must match."""
    argv = [*PARCAP, "generate", "--model", MODEL, "--tp-size", "2"]
    argv += ["--max-new-tokens", str(MAX_TOKENS)]
    for p in PROMPTS:
        argv += ["--prompt", p]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=300, start_new_session=True)
    assert out.returncode == 0, out.stderr
    lines = [json.loads(line) for line in out.stdout.splitlines()]
    assert len(lines) == len(PROMPTS)
    return dict(zip(PROMPTS, lines, strict=True))


def expected_finish(line: dict) -> str:
    return "length" if len(line["output_ids"]) == MAX_TOKENS else "stop"


def test_health_models_and_plan(server):
    assert server.get("/health").json() == {"status": "ok"}
    assert "on http://127.0.0.1:" in server.text()  # the default bind address
    assert [m.id for m in server.client.models.list().data] == [MODEL]
    assert server.client.models.retrieve(MODEL).id == MODEL
    explain = subprocess.run(
        [*PARCAP, "registry", "explain", MODEL, "--tp-size", "2", "--json"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert server.get("/v1/parallel_plan").json() == json.loads(explain.stdout)


@pytest.mark.parametrize("prompt", PROMPTS)
def test_completion_matches_generate(server, generated, prompt):
    want = generated[prompt]
    r = server.client.completions.create(
        model=MODEL, prompt=prompt, max_tokens=MAX_TOKENS, temperature=0, logprobs=0
    )
    choice = r.choices[0]
    assert choice.text == want["text"]
    assert choice.finish_reason == expected_finish(want)
    assert r.usage.completion_tokens == len(want["output_ids"])
    assert r.usage.prompt_tokens == len(prompt.encode()) + 1  # byte tokenizer + BOS
    assert choice.logprobs.token_logprobs == pytest.approx(want["output_logprobs"], abs=1e-4)

    chunks = list(
        server.client.completions.create(
            model=MODEL,
            prompt=prompt,
            max_tokens=MAX_TOKENS,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert "".join(c.choices[0].text for c in chunks if c.choices) == want["text"]
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == expected_finish(want)
    assert chunks[-1].usage.completion_tokens == len(want["output_ids"])


def test_prompt_as_token_ids(server, generated):
    prompt = PROMPTS[0]
    ids = [256, *prompt.encode()]
    r = server.client.completions.create(
        model=MODEL, prompt=ids, max_tokens=MAX_TOKENS, temperature=0
    )
    assert r.choices[0].text == generated[prompt]["text"]


def test_chat_matches_completion_of_its_prompt(server):
    messages = [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Say hi"},
    ]
    prompt = ChatFormat(None).prompt(messages)
    assert prompt == "system: You are terse.\nuser: Say hi\nassistant:"
    want = server.client.completions.create(
        model=MODEL, prompt=prompt, max_tokens=16, temperature=0
    )
    r = server.client.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=16, temperature=0
    )
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == want.choices[0].text
    assert r.choices[0].finish_reason == want.choices[0].finish_reason
    assert r.usage.prompt_tokens == want.usage.prompt_tokens
    chunks = list(
        server.client.chat.completions.create(
            model=MODEL, messages=messages, max_tokens=16, temperature=0, stream=True
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == want.choices[0].text


def test_stop_sequences(server, generated):
    # a stop string taken from the middle of a known greedy output, free of U+FFFD
    text = next(g["text"] for g in generated.values() if len(g["text"].replace("\ufffd", "")) >= 4)
    start = next(i for i in range(1, len(text) - 1) if "\ufffd" not in text[i : i + 2])
    stop = text[start : start + 2]
    want = text[: text.index(stop)]
    prompt = next(p for p, g in generated.items() if g["text"] == text)
    kwargs = dict(model=MODEL, prompt=prompt, max_tokens=MAX_TOKENS, temperature=0, stop=[stop])
    r = server.client.completions.create(**kwargs)
    assert (r.choices[0].text, r.choices[0].finish_reason) == (want, "stop")
    chunks = list(server.client.completions.create(stream=True, **kwargs))
    assert "".join(c.choices[0].text for c in chunks) == want
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_seeded_sampling_is_reproducible(server):
    def sample(seed: int) -> list[float]:
        r = server.client.completions.create(
            model=MODEL,
            prompt="Sampling",
            max_tokens=16,
            temperature=1.0,
            top_p=0.9,
            seed=seed,
            logprobs=0,
            extra_body={"ignore_eos": True},
        )
        return r.choices[0].logprobs.token_logprobs

    assert sample(7) == sample(7)
    assert sample(7) != sample(8)


def test_same_seed_draws_what_generate_draws(server):
    """A request's seed alone fixes its draws: `parcap generate` samples its two prompts
    with seeds 0 and 1 (the engine's --seed, 0 as the server's, which also seeds the
    weights, + the request's index); completions with those seeds and the same sampling
    fields return the same text and logprobs."""
    prompts, sampling = ["Sampling", "Seeds"], {"temperature": 0.8, "top_k": 50, "top_p": 0.9}
    argv = [*PARCAP, "generate", "--model", MODEL, "--tp-size", "2", "--seed", "0"]
    argv += ["--max-new-tokens", "12", "--ignore-eos", "--temperature", "0.8"]
    argv += ["--top-k", "50", "--top-p", "0.9", "--prompt", prompts[0], "--prompt", prompts[1]]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=300, start_new_session=True)
    assert out.returncode == 0, out.stderr
    generated = [json.loads(line) for line in out.stdout.splitlines()]
    for seed, prompt, want in zip((0, 1), prompts, generated, strict=True):
        r = server.client.completions.create(
            model=MODEL, prompt=prompt, max_tokens=12, seed=seed, logprobs=0,
            extra_body={"ignore_eos": True, "top_k": sampling["top_k"]},
            temperature=sampling["temperature"], top_p=sampling["top_p"],
        )  # fmt: skip
        assert r.choices[0].text == want["text"]
        assert r.choices[0].logprobs.token_logprobs == pytest.approx(
            want["output_logprobs"], abs=1e-4
        )
    assert generated[0]["output_ids"] != generated[1]["output_ids"]


CONCURRENT, NEW_TOKENS = 32, 24


def test_32_concurrent_requests_are_batched(server):
    """32 streamed requests sent at once are decoded together: at some moment at least 8 of
    them are between their first and their last token (a scheduler that runs k requests at a
    time shows at most k, plus one for a stream whose end the client has not read yet), and
    the server ran fewer steps for them than the 16 x NEW_TOKENS that running them two at a
    time takes (a prefill and NEW_TOKENS - 1 decodes per pair, 32 x NEW_TOKENS one at a
    time). Neither bound reads a clock."""
    lock = threading.Lock()
    streaming: set[int] = set()
    most = [0]
    start = threading.Barrier(CONCURRENT)

    def steps() -> int:
        return server.get("/v1/report").json()["counters"].get("steps", 0)

    def one(i: int) -> tuple[str | None, int]:
        start.wait()
        stream = server.client.completions.create(
            model=MODEL, prompt=f"request {i}", max_tokens=NEW_TOKENS, temperature=0,
            stream=True, stream_options={"include_usage": True}, extra_body={"ignore_eos": True},
        )  # fmt: skip
        finish, usage = None, 0
        for chunk in stream:
            if chunk.choices:
                with lock:
                    streaming.add(i)
                    most[0] = max(most[0], len(streaming))
                finish = chunk.choices[0].finish_reason or finish
            if chunk.usage:
                usage = chunk.usage.completion_tokens
            if finish:
                with lock:
                    streaming.discard(i)
        return finish, usage

    before = steps()
    with ThreadPoolExecutor(CONCURRENT) as pool:
        results = list(pool.map(one, range(CONCURRENT)))
    assert results == [("length", NEW_TOKENS)] * CONCURRENT
    assert most[0] >= 8, f"at most {most[0]} requests were streaming at once"
    # counters arrive when rank 0 runs out of work, right after the last step's tokens
    deadline = time.monotonic() + 10
    while (after := steps()) == before and time.monotonic() < deadline:
        time.sleep(0.1)
    assert NEW_TOKENS <= after - before < CONCURRENT // 2 * NEW_TOKENS


BAD_BODIES = [
    ({"prompt": "x", "max_tokens": 0}, 400, "max_tokens"),
    ({"prompt": "x", "max_tokens": 1.5}, 400, "max_tokens"),
    ({"prompt": "x", "max_tokens": 10_000}, 400, "max_tokens"),
    ({"prompt": "x", "temperature": -1}, 400, "temperature"),
    ({"prompt": "x", "top_p": 0}, 400, "top_p"),
    ({"prompt": "x", "top_p": 1.5}, 400, "top_p"),
    ({"prompt": "x", "n": 2}, 400, "n"),
    ({"prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
    ({"prompt": "x", "logprobs": 3}, 400, "logprobs"),
    ({"prompt": "x", "presence_penalty": 0.5}, 400, "presence_penalty"),
    ({"prompt": "x", "stream": "yes"}, 400, "stream"),
    ({"prompt": [999]}, 400, "prompt"),
    ({"prompt": []}, 400, "prompt"),
    ({"prompt": ["a", "b"]}, 400, "prompt"),
    ({"max_tokens": 4}, 400, "prompt"),
    ({"prompt": "x" * 3000}, 400, "context length"),
    ({"prompt": "x" * 2000, "max_tokens": 100}, 400, "context length"),
    ({"prompt": "x", "model": "gpt-4"}, 404, "gpt-4"),
]


@pytest.mark.parametrize(("body", "status", "mentions"), BAD_BODIES)
def test_bad_completion_requests(server, body, status, mentions):
    r = server.post("/v1/completions", json={"model": MODEL, **body})
    assert r.status_code == status, r.text
    assert mentions in r.json()["error"]["message"]


def test_bad_requests_through_the_client_and_raw(server):
    c = server.client
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        c.chat.completions.create(model="nope", messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.BadRequestError, match="temperature"):
        c.completions.create(model=MODEL, prompt="x", temperature=-0.5)
    with pytest.raises(openai.BadRequestError, match="messages"):
        c.chat.completions.create(model=MODEL, messages=[])
    with pytest.raises(openai.BadRequestError, match="context length"):
        c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "y" * 3000}])

    raw = [
        (server.post("/v1/completions", content=b'{"prompt": "x",'), 400, "JSON"),
        (server.post("/v1/completions", content=b"[1, 2]"), 400, "object"),
        (server.post("/v1/completions", content=b"\xff\xfe"), 400, "JSON"),
        (server.post("/v1/completions", content=b"x" * (MAX_REQUEST_BYTES + 1)), 413, "limit"),
        (server.post("/v1/chat/completions", json={"messages": "hi"}), 400, "messages"),
        (server.get("/v1/nowhere"), 404, "Not Found"),
        (server.get("/v1/completions"), 405, "Method Not Allowed"),
    ]
    oversized = {"model": MODEL, "prompt": "z" * MAX_REQUEST_BYTES}
    raw.append((server.post("/v1/completions", json=oversized), 413, "limit"))
    for r, status, mentions in raw:
        assert r.status_code == status, r.text
        assert mentions in r.json()["error"]["message"]
    assert server.get("/health").status_code == 200


def cpu_seconds(pids: list[int], window: float = 1.0) -> float:
    """CPU time `pids` use over the next `window` seconds."""

    def total() -> float:
        ticks = 0
        for pid in pids:
            stat = Path(f"/proc/{pid}/stat").read_text()
            utime, stime = stat[stat.rindex(")") + 2 :].split()[11:13]
            ticks += int(utime) + int(stime)
        return ticks / os.sysconf("SC_CLK_TCK")

    before = total()
    time.sleep(window)
    return total() - before


def test_client_that_leaves_aborts_its_request(server):
    # 2000 tokens keep the ranks busy for ~40s unless the request is aborted
    ranks = server.rank_pids()
    long = {"model": MODEL, "prompt": "abandon", "max_tokens": 2000, "ignore_eos": True}
    with httpx.stream("POST", f"{server.url}/v1/completions", json={**long, "stream": True}) as r:
        lines = r.iter_lines()  # kept: a dropped iterator closes the connection
        next(lines)
        assert cpu_seconds(ranks) > 0.4
    time.sleep(0.5)
    assert cpu_seconds(ranks) < 0.15

    with pytest.raises(httpx.ReadTimeout):
        server.post("/v1/completions", json=long, timeout=2.0)
    time.sleep(0.5)
    assert cpu_seconds(ranks) < 0.15
    assert server.get("/health").status_code == 200


def test_sigterm_finishes_in_flight_requests_and_leaves_nothing(server):
    """Last on the shared server: it shuts it down."""
    got: dict = {}
    first = threading.Event()

    def stream() -> None:
        chunks = server.client.completions.create(
            model=MODEL,
            prompt="graceful",
            max_tokens=64,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"ignore_eos": True},
        )
        got["chunks"] = []
        for c in chunks:
            got["chunks"].append(c)
            first.set()

    t = threading.Thread(target=stream)
    t.start()
    assert first.wait(30)
    ranks = server.rank_pids()
    assert len(ranks) == 2
    os.kill(server.proc.pid, signal.SIGTERM)
    t.join(60)
    assert got["chunks"][-1].usage.completion_tokens == 64
    assert server.proc.wait(timeout=30) == 0
    assert wait_gone(server.pgid, 10) == []
    with pytest.raises(httpx.ConnectError):
        server.get("/health")
    assert "Traceback" not in server.text()


def test_rank_failure_turns_health_red_and_fails_requests_fast(tmp_path):
    s = start_server(tmp_path / "server.log")
    try:
        assert s.get("/health").status_code == 200
        result: dict = {}

        def stream() -> None:
            try:
                for _ in s.client.completions.create(
                    model=MODEL,
                    prompt="doomed",
                    max_tokens=2000,
                    stream=True,
                    extra_body={"ignore_eos": True},
                ):
                    result["started"] = True
            except openai.APIError as e:
                result["error"] = e

        t = threading.Thread(target=stream)
        t.start()
        deadline = time.monotonic() + 30
        while "started" not in result and time.monotonic() < deadline:
            time.sleep(0.05)
        os.kill(s.rank_pids()[1], signal.SIGKILL)
        t.join(10)
        assert not t.is_alive() and "engine is down" in str(result["error"])

        health = s.get("/health")
        assert health.status_code == 503 and "rank 1" in health.json()["error"]
        began = time.monotonic()
        with pytest.raises(openai.APIStatusError) as e:
            s.client.completions.create(model=MODEL, prompt="after", max_tokens=4)
        assert e.value.status_code == 503 and time.monotonic() - began < 2

        os.kill(s.proc.pid, signal.SIGINT)
        assert s.proc.wait(timeout=30) == 1  # a failed launch says so in its exit code
        assert wait_gone(s.pgid, 10) == []
        assert "Traceback" not in s.text()
    finally:
        s.kill()


def test_refusals_exit_2_before_any_rank_starts():
    for extra, mentions in [
        (["--attn-tp-gather", "on"], "nothing to gather"),
        (["--port", "70000"], "--port"),
        (["--model", "NoSuchModel"], "NoSuchModel"),
    ]:
        argv = [*PARCAP, "serve", "--tp-size", "2", *extra]
        if "--model" not in extra:
            argv += ["--model", MODEL]
        r = subprocess.run(argv, capture_output=True, text=True, timeout=60, start_new_session=True)
        assert r.returncode == 2, r.stderr
        assert mentions in r.stderr and "parcap: error:" in r.stderr
