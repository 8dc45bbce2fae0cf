"""Shared by the engine's runtime tests: launches, the CLI as a subprocess, process checks,
free ports for spawned gloo ranks."""

from __future__ import annotations

import functools
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

from engine.frontend.llm_engine import LLMEngine
from engine.frontend.results import Result
from engine.messages import SamplingParams
from engine.server_args import ServerArgs

ROOT = Path(__file__).resolve().parents[2]
EMBEDDED = "LlamaForCausalLM"


def server_args(*argv: str) -> ServerArgs:
    if "--model-path" not in argv and "--model" not in argv:
        argv = ("--model", EMBEDDED, *argv)
    return ServerArgs.from_cli(list(argv))


def generate(
    argv: tuple[str, ...], prompts: list[list[int]], params: list[SamplingParams]
) -> tuple[list[Result], dict]:
    """One launch: results and the report, with every rank gone afterwards."""
    with LLMEngine(server_args(*argv)) as engine:
        results = engine.generate(prompts, params)
    assert all(gone(pid) for pid in engine.pids)
    return results, engine.report()


@functools.cache
def cached_generate(argv: tuple[str, ...], prompts: tuple, params: tuple) -> tuple:
    """`generate` once per distinct launch within a test session."""
    return generate(argv, [list(p) for p in prompts], list(params))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    # a zombie has exited; only its parent's wait is missing
    stat = Path(f"/proc/{pid}/stat")
    return stat.exists() and stat.read_text().rsplit(")", 1)[1].split()[0] == "Z"


def pids_with_env(marker: str) -> list[int]:
    """Processes whose environment holds `marker` (children inherit it)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                if marker.encode() in (entry / "environ").read_bytes():
                    found.append(int(entry.name))
            except OSError:
                continue
    return [pid for pid in found if not gone(pid)]


def group_pids(pgid: int) -> list[int]:
    """Live processes of process group `pgid` (zombies excluded: they have exited)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()  # state ppid pgrp ...
        if int(fields[2]) == pgid and fields[0] != "Z":
            pids.append(int(entry.name))
    return pids


def wait_gone(pgid: int, timeout: float) -> list[int]:
    """`group_pids(pgid)` once it is empty or `timeout` seconds have passed."""
    deadline = time.monotonic() + timeout
    while (left := group_pids(pgid)) and time.monotonic() < deadline:
        time.sleep(0.1)
    return left


def run_cli(
    *argv: str, env: dict | None = None, timeout: float = 120, cmd: list[str] | None = None
) -> subprocess.CompletedProcess:
    """`parcap ARGV` (or `cmd ARGV`) as a subprocess from the repository root."""
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    return subprocess.run(
        [*(cmd or [sys.executable, "-m", "engine.cli"]), *argv],
        cwd=ROOT,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def assert_close(actual: list[float], expected: list[float], tol: float) -> None:
    assert len(actual) == len(expected)
    worst = max((abs(a - b) for a, b in zip(actual, expected)), default=0.0)
    assert worst <= tol, f"logprobs differ by {worst:.3g} > {tol}: {actual} vs {expected}"
