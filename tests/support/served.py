"""`parcap serve` as a subprocess for end-to-end tests: its own session (so its process
group is its own and can be signalled or killed whole), logging to a file."""

from __future__ import annotations

import functools
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai

from tests.support.engine import ROOT, group_pids

PARCAP = [sys.executable, "-m", "engine.cli"]
STARTUP_S = 120


class Served:
    """`parcap serve --port 0 ARGV`; `wait_ready` returns once /health answers 200."""

    def __init__(self, log: Path, *argv: str, env: dict[str, str] | None = None) -> None:
        self.log = log
        with open(log, "w") as out:
            self.proc = subprocess.Popen(
                [*PARCAP, "serve", "--port", "0", *argv],
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                cwd=ROOT,
                env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})},
            )
        self.pgid = self.proc.pid
        self.url: str | None = None

    def wait_ready(self) -> Served:
        deadline = time.monotonic() + STARTUP_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"server exited {self.proc.returncode}:\n{self.text()}")
            if self.url is None and (m := re.search(r"serving \S+ on (http://\S+)", self.text())):
                self.url = m.group(1)
            if self.url is not None:
                try:
                    if httpx.get(f"{self.url}/health", timeout=5).status_code == 200:
                        return self
                except httpx.TransportError:
                    pass
            time.sleep(0.2)
        raise AssertionError(f"server not ready after {STARTUP_S}s:\n{self.text()}")

    @functools.cached_property
    def client(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key="x", max_retries=0)

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def get(self, path: str) -> httpx.Response:
        return httpx.get(self.url + path, timeout=30)

    def post(self, path: str, timeout: float = 60, **kwargs) -> httpx.Response:
        return httpx.post(self.url + path, timeout=timeout, **kwargs)

    def rank_pids(self) -> list[int]:
        return [
            pid
            for pid in group_pids(self.pgid)
            if b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes()
        ]

    def kill(self) -> None:
        if group_pids(self.pgid):
            os.killpg(self.pgid, signal.SIGKILL)
        if self.proc.poll() is None:
            self.proc.wait()
