"""Signals to the whole process group, as Ctrl-C, systemd's KillMode=control-group or a
container runtime send them: `parcap serve` drains (the request in flight completes in
full, new ones get 503) and exits 0; `parcap generate` stops cleanly with exit 130. The
ranks never die of the signal, and nothing is left running."""

from __future__ import annotations

import fcntl
import os
import pty
import signal
import struct
import subprocess
import termios
import threading
import time
from typing import Any

import httpx
import openai
import pytest

from tests.support.engine import ROOT, group_pids, wait_gone
from tests.support.served import PARCAP, Served

pytestmark = pytest.mark.slow


def stream_in_background(client: openai.OpenAI, model: str, tokens: int) -> tuple[dict, Any]:
    """A streamed greedy completion of `tokens` tokens read in a thread; (what it got, the
    event set at its first chunk)."""
    got: dict = {"chunks": []}
    first = threading.Event()

    def read() -> None:
        try:
            for chunk in client.completions.create(
                model=model, prompt="drain", max_tokens=tokens, temperature=0, stream=True,
                stream_options={"include_usage": True}, extra_body={"ignore_eos": True},
            ):  # fmt: skip
                got["chunks"].append(chunk)
                first.set()
        except Exception as e:  # the assertion on got names it
            got["error"] = e
            first.set()

    got["thread"] = threading.Thread(target=read, daemon=True)
    got["thread"].start()
    return got, first


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_group_signal_drains_the_server(tmp_path, sig):
    tokens = 300
    server = Served(tmp_path / "serve.log", "--tp-size", "2", "--graceful-timeout", "60")
    try:
        server.wait_ready()  # the embedded default model: no --model needed
        got, first = stream_in_background(server.client, "LlamaForCausalLM", tokens)
        assert first.wait(60), server.text()
        os.killpg(server.pgid, sig)  # the server, its ranks and the resource tracker
        deadline = time.monotonic() + 10
        while "draining" not in server.text() and time.monotonic() < deadline:
            time.sleep(0.05)
        late = httpx.post(
            f"{server.url}/v1/completions", json={"prompt": "late", "max_tokens": 2}, timeout=10
        )
        assert got["thread"].is_alive(), "the stream ended before the late request was sent"
        assert late.status_code == 503 and late.json()["error"]["code"] == "shutting_down"
        got["thread"].join(60)
        assert "error" not in got, got.get("error")
        assert got["chunks"][-1].usage.completion_tokens == tokens
        finishes = [c.choices[0].finish_reason for c in got["chunks"] if c.choices]
        assert finishes[-1] == "length"
        assert server.proc.wait(timeout=30) == 0, server.text()
        assert wait_gone(server.pgid, 10) == []
        assert "Traceback" not in server.text() and "killed by" not in server.text()
    finally:
        server.kill()


def test_ctrl_c_stops_generate_cleanly_and_bars_show_on_a_terminal():
    """Progress bars are drawn on a terminal (stderr is a pty here); Ctrl-C to the group
    mid-generation exits 130 with one line, and every rank is gone."""
    controller, terminal = pty.openpty()
    # a new pty is 0 columns wide, which tqdm fills with an empty bar
    fcntl.ioctl(terminal, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))
    argv = [*PARCAP, "generate", "--tp-size", "2", "--prompt", "interrupt me"]
    argv += ["--max-new-tokens", "1900", "--ignore-eos"]
    proc = subprocess.Popen(
        argv, stdout=subprocess.PIPE, stderr=terminal, start_new_session=True, cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )  # fmt: skip
    os.close(terminal)
    seen = bytearray()
    try:
        deadline = time.monotonic() + 60
        while b"generating" not in seen and time.monotonic() < deadline and proc.poll() is None:
            seen += _read_all(controller)
        assert b"loading" in seen and b"generating" in seen, seen
        start = time.monotonic()
        os.killpg(proc.pid, signal.SIGINT)
        out, _ = proc.communicate(timeout=30)
        while chunk := _read_all(controller):
            seen += chunk
        assert proc.returncode == 130 and out == b""
        assert seen.decode(errors="replace").splitlines()[-1].endswith("parcap: interrupted")
        assert time.monotonic() - start < 20
        assert wait_gone(proc.pid, 10) == []
    finally:
        if group_pids(proc.pid):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        os.close(controller)


def _read_all(fd: int) -> bytes:
    try:
        return os.read(fd, 65536)
    except OSError:  # EIO: every writer of the terminal has exited
        return b""
