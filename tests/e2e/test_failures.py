"""A failing rank stops the whole launch quickly, with its error, and leaves no process."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
import uuid

import pytest

from engine.frontend.llm_engine import EngineError, LLMEngine
from engine.messages import SamplingParams
from engine.runtime.worker import KILL_HOOK
from tests.support.engine import ROOT, gone, pids_with_env, run_cli, server_args

pytestmark = pytest.mark.slow

LONG = SamplingParams(max_new_tokens=500, ignore_eos=True)


def wait_gone(pids: list[int], seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if all(gone(pid) for pid in pids):
            return True
        time.sleep(0.05)
    return False


def test_rank_killed_mid_run_stops_the_engine(monkeypatch):
    monkeypatch.setenv(KILL_HOOK, "1:3")
    with LLMEngine(server_args("--tp-size", "2")) as engine:
        start = time.monotonic()
        with pytest.raises(EngineError, match=r"^rank 1: killed by SIGKILL$"):
            engine.generate([[256, 1, 2]], LONG)
        assert time.monotonic() - start < 10
        assert all(gone(pid) for pid in engine.pids)
        with pytest.raises(EngineError):
            engine.submit([1])


def test_cli_exits_nonzero_naming_the_rank_and_leaves_nothing():
    marker = f"PARCAP_TEST_MARKER={uuid.uuid4().hex}"
    env = {KILL_HOOK: "0:2", marker.split("=")[0]: marker.split("=")[1]}
    start = time.monotonic()
    proc = run_cli(
        "generate",
        "--tp-size",
        "2",
        "--moe-dense-tp-size",
        "1",
        "--max-new-tokens",
        "400",
        "--ignore-eos",
        "--prompt",
        "hello",
        env=env,
    )
    assert proc.returncode == 1 and proc.stdout == ""
    assert proc.stderr.splitlines()[-1] == "parcap: error: rank 0: killed by SIGKILL"
    assert time.monotonic() - start < 30
    assert pids_with_env(marker) == []


def test_ranks_die_with_the_front_end():
    script = textwrap.dedent(
        """
        import time
        from engine.frontend.llm_engine import LLMEngine
        from tests.support.engine import server_args

        if __name__ == "__main__":
            engine = LLMEngine(server_args("--tp-size", "2"))
            print(*engine.pids, flush=True)
            time.sleep(120)
        """
    )
    front = subprocess.Popen(
        [sys.executable, "-c", script],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,  # its resource tracker reports the queues it never closed
        text=True,
    )
    try:
        pids = [int(p) for p in front.stdout.readline().split()]
        assert len(pids) == 2 and not any(gone(pid) for pid in pids)
    finally:
        front.send_signal(signal.SIGKILL)
        front.wait()
    assert wait_gone(pids, 5)


def test_a_rank_leaves_its_groups_within_a_bound():
    """A finished rank tries to leave its process groups for a bounded time (NCCL's teardown
    can block for good); what the call raised still surfaces."""
    from engine.frontend.rank_process import within

    def broken() -> None:
        raise ValueError("broken")

    assert within(lambda: None, 5.0)
    release = threading.Event()
    start = time.monotonic()
    assert not within(release.wait, 0.2)
    assert time.monotonic() - start < 2
    release.set()
    with pytest.raises(ValueError, match="broken"):
        within(broken, 5.0)
