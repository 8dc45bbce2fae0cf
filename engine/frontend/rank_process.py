"""A rank's process: set up (parent watch, threads, GPU environment), run its worker, and
report how it ended through the outbox: `Ready`, `Counters` (global rank 0), `Bye`, or one
`RankFailed` line. Started by the front end; runs in the rank's own process."""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
import warnings
from collections.abc import Callable
from typing import TYPE_CHECKING

from engine.messages import Bye, Inbox, Launch, Outbox, RankFailed, Ready

if TYPE_CHECKING:
    import torch

# NVLink multicast (NVLS) in NCCL, torch's symmetric memory and NVSHMEM can take the GPUs of
# a shared host out of service: off unless the operator's environment sets them.
GPU_ENV_DEFAULTS = {
    "NCCL_NVLS_ENABLE": "0",
    "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
    "NVSHMEM_DISABLE_NVLS": "1",
}
# A GPU rank computes next to nothing on the host (seeded draws of a few rows); a team of
# dozens of OpenMP threads there costs more to wake each step than it saves (measured on a
# 64-core host: decode steps of 5-15 ms with 64 threads, 1.5-5 ms with 4; bench/RESULTS.md).
GPU_RANK_THREADS = 4
# How long a finished rank tries to leave its process groups before it exits without: NCCL's
# teardown can block for good (pytorch/pytorch#115388), and the process is ending anyway.
LEAVE_TIMEOUT_S = 10.0


def start_rank(device: str, local_rank: int, local_ranks: int) -> torch.device:
    """Set up this process as a rank: it dies with its parent, shares the host's cores
    with the other local ranks, and stays quiet; returns its torch device."""
    import torch

    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.2)
        os._exit(1)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()
    # torch 2.13 deprecates the *_tensor collectives in favour of APIs older torch lacks
    warnings.filterwarnings("ignore", message="`torch.distributed.", category=FutureWarning)
    threads = max(1, (os.cpu_count() or 1) // local_ranks)
    if device == "cpu":
        torch.set_num_threads(threads)
        return torch.device("cpu")
    for name, value in GPU_ENV_DEFAULTS.items():
        os.environ.setdefault(name, value)  # read when NCCL creates its communicators
    torch.set_num_threads(min(threads, GPU_RANK_THREADS))
    return torch.device("cuda", local_rank)


def run_rank(rank: int, launch: Launch, inboxes: list[Inbox], outbox: Outbox) -> None:
    """Entry point of a spawned rank; any failure goes to the outbox as one line."""
    # Ctrl-C, systemd and container runtimes signal the whole process group; the front end
    # decides how ranks stop (`Ranks` starts them with both ignored already; this keeps it so).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        local = launch.args.tp_size // launch.args.nnodes  # this host's ranks; one GPU each
        device = start_rank(launch.args.device, rank % local, local)
        attn_tp = launch.plan.attn_tp_size
        inbox = inboxes[rank // attn_tp] if rank % attn_tp == 0 else None
        from engine.runtime.worker import Worker  # the rank's runtime, imported in the rank

        worker = Worker(rank, launch, inbox, outbox, device)
        outbox.put(Ready(rank))
        worker.run()
        if rank == 0:
            outbox.put(worker.counters())
        left = within(worker.close, LEAVE_TIMEOUT_S)
        outbox.put(Bye(rank))
        if not left:  # a stuck teardown thread would also stall the interpreter's exit
            print(f"rank {rank}: process groups not torn down after {LEAVE_TIMEOUT_S:.0f}s;"
                  " exiting without", file=sys.stderr, flush=True)  # fmt: skip
            outbox.close()
            outbox.join_thread()
            os._exit(0)
    except BaseException as e:  # every failure, even SystemExit, must reach the front end
        outbox.put(RankFailed(rank, failure_line(rank, e)))
        outbox.close()
        outbox.join_thread()
        os._exit(1)


def failure_line(rank: int, error: BaseException) -> str:
    message = " ".join(str(error).split())
    return f"rank {rank}: {type(error).__name__}" + (f": {message}" if message else "")


def within(fn: Callable[[], object], timeout_s: float) -> bool:
    """Run `fn` in a daemon thread for at most `timeout_s`: whether it finished. An error it
    raised is raised here."""
    errors: list[BaseException] = []

    def call() -> None:
        try:
            fn()
        except BaseException as e:  # handed to the caller
            errors.append(e)

    thread = threading.Thread(target=call, name="bounded", daemon=True)
    thread.start()
    thread.join(timeout_s)
    if errors:
        raise errors[0]
    return not thread.is_alive()
