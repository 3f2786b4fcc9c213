"""Local worlds of torch.distributed processes for the tests, the suites and the benchmarks: `LocalWorld` starts
`world_size` ranks on this machine (gloo on CPU, NCCL on CUDA), keeps them for many jobs, and never hangs.

The ranks are forked from a forkserver that has imported torch once (a rank starts in well under a second instead
of re-importing torch), join through a TCPStore the parent opens on a free port (port 0: no race for ports), run
with one torch thread each, and execute jobs: a module-level function sent to every rank, whose per-rank results
come back in rank order. Collectives in the ranks time out after `timeout_s`; the parent watches every job: a rank
that raises, dies or outlives `job_timeout_s` fails the job with a `WorldError` naming each rank's fate, and the
world is torn down (its process groups may be mid-collective) and started afresh by the next job. A job that
expects an error on its ranks should catch it there and return it.
"""

from __future__ import annotations

import datetime
import os
import queue
import time
import traceback
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

HOST = "127.0.0.1"
_POLL_S = 0.05


class WorldError(RuntimeError):
    """A job failed on some rank (an exception, a dead rank or a timeout); `failures` maps rank -> what happened."""

    def __init__(self, message: str, failures: dict[int, str]) -> None:
        super().__init__(message)
        self.failures = failures


def _rank_main(rank: int, world_size: int, port: int, backend: str, timeout_s: float, inbox: Any,
               outbox: Any) -> None:
    """A rank: join the world, then run jobs from `inbox` until None; report each job's result or traceback."""
    torch.set_num_threads(1)
    timeout = datetime.timedelta(seconds=timeout_s)
    if backend == "nccl":
        torch.cuda.set_device(rank % torch.cuda.device_count())
    store = dist.TCPStore(HOST, port, world_size, is_master=False, timeout=timeout)
    dist.init_process_group(backend, store=store, rank=rank, world_size=world_size, timeout=timeout)
    outbox.put((rank, None, "ok", None))
    while (job := inbox.get()) is not None:
        job_id, fn, args = job
        try:
            result = fn(*args)
        except Exception:  # reported to the parent with its traceback, never swallowed
            outbox.put((rank, job_id, "error", traceback.format_exc()))
        else:
            outbox.put((rank, job_id, "ok", result))
    dist.destroy_process_group()


class LocalWorld:
    """`world_size` ranks on this machine; use as a context manager or call `close()`."""

    def __init__(self, world_size: int, backend: str = "gloo", timeout_s: float = 30.0,
                 job_timeout_s: float = 180.0) -> None:
        if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
            raise ValueError(f"world_size: expected a positive integer, got {world_size!r}")
        if backend not in ("gloo", "nccl"):
            raise ValueError(f"backend: expected 'gloo' or 'nccl', got {backend!r}")
        if backend == "nccl" and not torch.cuda.is_available():
            raise ValueError("backend: 'nccl' needs a CUDA GPU; torch.cuda.is_available() is False")
        self.world_size, self.backend = world_size, backend
        self.timeout_s, self.job_timeout_s = timeout_s, job_timeout_s
        self._procs: list[Any] = []
        self._inboxes: list[Any] = []
        self._outbox: Any = None
        self._store: Any = None
        self._jobs = 0

    def __enter__(self) -> LocalWorld:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def running(self) -> bool:
        return bool(self._procs)

    def start(self) -> None:
        """Start the ranks and wait until every one has joined the process group."""
        if self.running:
            return
        ctx = mp.get_context("forkserver")
        ctx.set_forkserver_preload(["torch", "torch.distributed"])
        self._store = dist.TCPStore(HOST, 0, self.world_size + 1, is_master=True, wait_for_workers=False,
                                    timeout=datetime.timedelta(seconds=self.timeout_s))
        self._outbox = ctx.Queue()
        self._inboxes = [ctx.Queue() for _ in range(self.world_size)]
        self._procs = [ctx.Process(target=_rank_main, daemon=True,
                                   args=(r, self.world_size, self._store.port, self.backend, self.timeout_s,
                                         self._inboxes[r], self._outbox))
                       for r in range(self.world_size)]
        for p in self._procs:
            p.start()
        self._collect(None, "start", self.job_timeout_s)

    def run(self, fn: Callable[..., Any], *args: Any) -> list[Any]:
        """Run fn(*args) on every rank (fn: a module-level function); its results in rank order."""
        self.start()
        self._jobs += 1
        for inbox in self._inboxes:
            inbox.put((self._jobs, fn, args))
        return self._collect(self._jobs, getattr(fn, "__qualname__", str(fn)), self.job_timeout_s)

    def _collect(self, job_id: int | None, what: str, timeout_s: float) -> list[Any]:
        """Wait for every rank's report of `job_id`; raise WorldError on any failure (closing a broken world)."""
        results: dict[int, Any] = {}
        failures: dict[int, str] = {}
        deadline = time.monotonic() + timeout_s
        grace: float | None = None  # after a death, how long the others may take to report their own error
        while len(results) + len(failures) < self.world_size:
            now = time.monotonic()
            if now > deadline or (grace is not None and now > grace):
                break
            try:
                rank, jid, status, payload = self._outbox.get(timeout=_POLL_S)
            except queue.Empty:
                for r, p in enumerate(self._procs):
                    if r not in results and r not in failures and p.exitcode is not None:
                        failures[r] = f"died (exit code {p.exitcode})"
                        grace = grace or time.monotonic() + self.timeout_s + 5.0
                continue
            if jid != job_id:
                continue  # a late report of an earlier, failed job
            if status == "ok":
                results[rank] = payload
            else:
                failures[rank] = payload.strip().splitlines()[-1]
        silent = [r for r in range(self.world_size) if r not in results and r not in failures]
        for r in silent:
            failures[r] = (f"did not finish within {timeout_s:.0f} s" if grace is None
                           else "did not report after another rank died")
        if failures:
            self.close()  # a failed collective leaves the process groups unusable: the next job starts afresh
            detail = "; ".join(f"rank {r}: {failures[r]}" for r in sorted(failures))
            raise WorldError(f"{what} on {self.world_size} ranks failed: {detail}", failures)
        return [results[r] for r in range(self.world_size)]

    def close(self) -> None:
        """Stop the ranks (politely, then by force) and release the store."""
        for inbox in self._inboxes:
            inbox.put(None)
        for p in self._procs:
            p.join(timeout=5.0)
            if p.exitcode is None:
                p.kill()
                p.join(timeout=5.0)
        for q in (*self._inboxes, self._outbox):
            if q is not None:
                q.close()
                q.cancel_join_thread()
        self._procs, self._inboxes, self._outbox, self._store = [], [], None, None


def free_port() -> int:
    """A TCP port free at this moment on the loopback interface (for launchers that need one up front, such as
    torchrun's rendezvous endpoint)."""
    import socket

    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def child_env(threads: int = 1) -> dict[str, str]:
    """The environment for ranks launched as subprocesses (torchrun): one OpenMP thread each."""
    return {**os.environ, "OMP_NUM_THREADS": str(threads)}
