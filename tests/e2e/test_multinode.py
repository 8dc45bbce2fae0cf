"""Two nodes on one machine (gloo on CPU): `parcap generate` and `parcap serve` with `--nnodes 2
--node-rank 0/1 --dist-init-addr HOST:PORT` give the tokens of a one-host run of the same
flags; node 0 writes (or serves), node 1 prints one status line; killing either node stops
the other within seconds, with an error naming the lost node, and nothing is left."""

from __future__ import annotations

import functools
import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid

import pytest

from tests.support.engine import ROOT, free_port, pids_with_env, run_cli, wait_gone
from tests.support.served import PARCAP, Served

pytestmark = pytest.mark.slow

LLAMA = ("--model", "LlamaForCausalLM", "--tp-size", "2")
# attention-DP group 1's leader is rank 1, on node 1: its requests cross the link
DEEPSEEK = ("--model", "DeepseekV3ForCausalLM", "--tp-size", "2", "--moe-a2a-backend", "all2all")
DEEPSEEK += ("--enable-dp-attention", "--dp-size", "2")
MODELS = pytest.mark.parametrize("flags", [LLAMA, DEEPSEEK], ids=["llama", "deepseek_v3_a2a_dp"])
PROMPTS = ("Hello, nodes", "Two hosts", "0123")
NEW_TOKENS = 8


def rendezvous() -> str:
    """127.0.0.1:PORT with PORT (the ranks' rendezvous) and PORT+1 (node 0's links) free."""
    while True:
        port = free_port()
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port + 1))
            except OSError:
                continue
        return f"127.0.0.1:{port}"


def node_flags(rank: int, addr: str) -> list[str]:
    return ["--nnodes", "2", "--node-rank", str(rank), "--dist-init-addr", addr]


def marked() -> tuple[str, dict[str, str]]:
    """A marker every process of the test inherits, and the environment carrying it."""
    marker = uuid.uuid4().hex
    return marker, {**os.environ, "PYTHONPATH": str(ROOT), "PARCAP_TEST_NODE": marker}


def start(argv: list[str], env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen(
        [*PARCAP, *argv], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True, start_new_session=True,
    )  # fmt: skip


@functools.cache
def one_host(flags: tuple[str, ...]) -> tuple[dict, ...]:
    """`parcap generate` of PROMPTS on one host: the tokens every multi-node run must give."""
    argv = [*flags, "--max-new-tokens", str(NEW_TOKENS), "--ignore-eos"]
    for p in PROMPTS:
        argv += ["--prompt", p]
    done = run_cli("generate", *argv)
    assert done.returncode == 0, done.stderr
    return tuple(json.loads(line) for line in done.stdout.splitlines())


def assert_same(got: dict, want: dict) -> None:
    assert got["output_ids"] == want["output_ids"] and got["text"] == want["text"]
    assert got["output_logprobs"] == pytest.approx(want["output_logprobs"], abs=1e-4)


@MODELS
def test_generate_on_two_nodes_gives_the_one_host_tokens(flags):
    want = one_host(flags)
    addr, (marker, env) = rendezvous(), marked()
    argv = ["generate", *flags, "--max-new-tokens", str(NEW_TOKENS), "--ignore-eos"]
    for p in PROMPTS:
        argv += ["--prompt", p]
    start_s = time.monotonic()
    # node 1 first: it waits for node 0, as a host started early would
    node1 = start([*argv, *node_flags(1, addr)], env)
    node0 = start([*argv, *node_flags(0, addr)], env)
    out0, err0 = node0.communicate(timeout=120)
    out1, err1 = node1.communicate(timeout=60)
    assert node0.returncode == 0, err0
    assert node1.returncode == 0, err1
    for got, expected in zip(map(json.loads, out0.splitlines()), want, strict=True):
        assert_same(got, expected)
    assert out1 == ""  # node 0 writes the results; node 1 only says it was there
    (status,) = err1.splitlines()
    assert status.startswith("parcap generate: node 1 of 2: ranks 1-1 ready")
    assert time.monotonic() - start_s < 60
    assert pids_with_env(marker) == []


@MODELS
def test_serve_on_two_nodes_gives_the_one_host_tokens(tmp_path, flags):
    want = one_host(flags)
    addr, (marker, env) = rendezvous(), marked()
    node1 = start(["serve", *flags, *node_flags(1, addr)], env)
    server = Served(tmp_path / "node0.log", *flags, *node_flags(0, addr), env=env)
    try:
        client = server.wait_ready().client
        for prompt, expected in zip(PROMPTS, want, strict=True):
            r = client.completions.create(
                model=flags[1], prompt=prompt, max_tokens=NEW_TOKENS, temperature=0, logprobs=0,
                extra_body={"ignore_eos": True},
            )  # fmt: skip
            assert r.choices[0].text == expected["text"]
            assert r.choices[0].logprobs.token_logprobs == pytest.approx(
                expected["output_logprobs"], abs=1e-4
            )
        os.killpg(server.pgid, signal.SIGTERM)  # a clean stop ends node 1 cleanly too
        assert server.proc.wait(timeout=30) == 0, server.text()
        out1, err1 = node1.communicate(timeout=30)
        assert node1.returncode == 0 and out1 == "", err1
        assert "ready" in err1 and "error" not in err1
        assert wait_gone(server.pgid, 10) == [] and pids_with_env(marker) == []
    finally:
        server.kill()
        if node1.poll() is None:
            os.killpg(node1.pid, signal.SIGKILL)
            node1.wait()


@pytest.mark.parametrize(("command", "victim"), [("generate", 1), ("serve", 0)])
def test_killing_a_node_stops_the_other(command, victim):
    addr, (marker, env) = rendezvous(), marked()
    argv = [command, *LLAMA]
    if command == "generate":
        argv += ["--prompt", "long", "--max-new-tokens", "1900", "--ignore-eos"]
    else:
        argv += ["--port", "0"]
    nodes = {rank: start([*argv, *node_flags(rank, addr)], env) for rank in (1, 0)}
    try:
        deadline = time.monotonic() + 60
        while "ready" not in (line := nodes[1].stderr.readline()):
            assert line and time.monotonic() < deadline, "node 1 never became ready"
        os.killpg(nodes[victim].pid, signal.SIGKILL)  # the whole node: front end and ranks
        killed = time.monotonic()
        survivor = nodes[1 - victim]
        _, err = survivor.communicate(timeout=30)
        assert time.monotonic() - killed < 30
        assert survivor.returncode == 1
        assert err.splitlines()[-1] == f"parcap: error: node {victim}: connection lost"
        nodes[victim].wait()
        deadline = time.monotonic() + 10
        while pids_with_env(marker) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert pids_with_env(marker) == []
    finally:
        for p in nodes.values():
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()


def test_torchrun_c10d_on_two_nodes_as_the_readme_shows(tmp_path):
    """The README's torchrun command, two hosts on one machine: global rank 0's host writes
    the one-host tokens, the other host writes nothing."""
    want = one_host(LLAMA)
    addr, (marker, env) = rendezvous(), marked()
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2"]
    torchrun += ["--nproc-per-node", "1", "--rdzv-backend", "c10d", "--rdzv-endpoint", addr]
    torchrun += ["--rdzv-id", marker, "-m", "engine.cli", "generate", *LLAMA]
    torchrun += ["--max-new-tokens", str(NEW_TOKENS), "--ignore-eos"]
    for p in PROMPTS:
        torchrun += ["--prompt", p]
    outputs = [tmp_path / f"host{i}.jsonl" for i in range(2)]
    hosts = [
        subprocess.Popen(
            [*torchrun, "--output", str(out)],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )  # fmt: skip
        for out in outputs
    ]
    for host in hosts:
        _, err = host.communicate(timeout=120)
        assert host.returncode == 0, err
    (written,) = [out for out in outputs if out.exists()]
    for got, expected in zip(map(json.loads, written.read_text().splitlines()), want, strict=True):
        assert_same(got, expected)
    assert pids_with_env(marker) == []


def test_a_silent_or_closed_link_is_lost():
    """A node that stops answering (a cut network: no EOF ever comes) is lost after the
    collective timeout; a closed connection at once. An idle link pings its peer."""
    from multiprocessing import Pipe

    from engine.frontend.nodes import Link, NodeError

    ours, theirs = Pipe()
    link = Link(ours, "node 1", timeout_s=1.5)  # pings go out after 1 s of quiet
    start = time.monotonic()
    with pytest.raises(NodeError, match=r"^node 1: no word for 2s$"):
        while True:
            link.recv(0.1)
    assert 1.5 <= time.monotonic() - start < 5
    assert theirs.poll() and type(theirs.recv()).__name__ == "Ping"  # it kept saying hello
    theirs.close()
    with pytest.raises(NodeError, match="^node 1: connection lost$"):
        link.recv(1.0)
