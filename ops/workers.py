"""Start and stop real `sluice worker` processes (used by the demo, the benchmark and tests)."""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

_PR_SET_PDEATHSIG = 1

# Worker roles: a node is named ROLE@host by default, its role read from the queues it consumes,
# so two workers on one host never share a name (Celery would merge them in every reply) and an
# operator can address a role (`sluice scale --role sqlite`).
ROLES = ("postgres", "sqlite", "d1", "sluice")
MIXED_ROLE = "sluice"  # every queue, or a mix of sinks' queues


def role_for_queues(queues: Sequence[str]) -> str:
    """The role of a worker consuming `queues`: the sink of its one ingest queue (`postgres`,
    `sqlite`, `d1`; the PostgreSQL pool also takes dead letters, acknowledgements and runs),
    else `sluice` (several sinks, or no sink at all)."""
    names = [q.strip() for q in queues]
    sinks = {q.removeprefix("ingest.") for q in names if q.startswith("ingest.")}
    if len(sinks) == 1:
        (sink,) = sinks
        if sink in ROLES:
            return sink
    return MIXED_ROLE


def default_hostname(queues: Sequence[str]) -> str:
    """`ROLE@%h` for a worker consuming `queues` (Celery expands %h to this host's name)."""
    return f"{role_for_queues(queues)}@%h"


def role_of(node: str) -> str:
    """A node's role: its name before `@`, less a `-N` suffix that tells apart two workers of
    one role on one host (`postgres@db1` and `postgres-2@db1` → `postgres`)."""
    name = node.split("@", 1)[0]
    base, dash, n = name.rpartition("-")
    return base if dash and base and n.isdigit() else name


def _die_with_parent() -> None:
    """Runs in the child before exec: the kernel kills it if the process that started it dies,
    so a killed test run or demo never leaves workers consuming someone else's queues."""
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


MALLOC_ARENAS = 2  # arenas a threads-pool worker keeps; see cap_malloc_arenas


def cap_malloc_arenas(n: int) -> bool:
    """Let glibc's malloc keep at most n arenas in this process (as MALLOC_ARENA_MAX=n would).

    By default each thread that allocates gets an arena of its own, up to 8 per core, and memory
    freed in one stays there. The SQLite writer's threads each decode pages of different sizes,
    so without a cap its resident memory grows with the length of the run; with two arenas it
    stays flat, at the same speed. Call it before any worker thread starts (`sluice worker
    --pool threads` does). Returns False where libc is not glibc."""
    import ctypes.util

    m_arena_max = -8  # glibc's malloc.h
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(m_arena_max, n))
    except (OSError, AttributeError):  # no libc by that name, or no mallopt (musl, macOS)
        return False


# How long a thread of a threads-pool worker may hold the GIL while another waits for it
# (Python's default is 5 ms). The SQLite writer's committing thread gives the GIL up at every
# statement it runs, and waited up to that long each time to take it back from a thread
# validating the next page; a shorter turn keeps the commits going.
THREADS_SWITCH_INTERVAL = 0.0005


class WorkerPool:
    """Worker processes started with the same environment; stopped on exit (warm, then cold)."""

    def __init__(self, env: Mapping[str, str], log_dir: Path, loglevel: str = "INFO") -> None:
        self.env = env  # read at each start, so a config written later is seen
        self.loglevel = loglevel
        self.log_dir = log_dir
        self.procs: list[subprocess.Popen[bytes]] = []
        self._specs: dict[int, tuple[str, list[str], int, list[str]]] = {}

    def start(
        self,
        name: str,
        queues: Sequence[str],
        concurrency: int,
        extra: Sequence[str] = (),
        *,
        by_role: bool = False,
    ) -> subprocess.Popen[bytes]:
        """Start a worker named `name@%h`; with `by_role`, named as `sluice worker` names it
        by default (`ROLE@%h`), `name` then naming only its log file."""
        self.log_dir.mkdir(parents=True, exist_ok=True)
        log = (self.log_dir / f"worker-{name}.log").open("ab")
        cmd = [
            sys.executable,
            "-m",
            "sluice.ops.cli",
            "worker",
            "--queues",
            ",".join(queues),
            "--concurrency",
            str(concurrency),
            *([] if by_role else ["--hostname", f"{name}@%h"]),
            "--loglevel",
            self.loglevel,
            *extra,
        ]
        proc = subprocess.Popen(
            cmd,
            env=dict(self.env),
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=_die_with_parent,
        )
        self.procs.append(proc)
        self._specs[proc.pid] = (name, list(queues), concurrency, list(extra))
        return proc

    def start_sqlite_writer(self, name: str = "lite") -> subprocess.Popen[bytes]:
        """The SQLite writer as deployed: one process, its threads committing pages together."""
        from sluice.shared.sinks.sqlite import WRITER_THREADS

        return self.start(name, ["ingest.sqlite"], WRITER_THREADS, extra=["--pool", "threads"])

    def name_of(self, pid: int) -> str:
        """The name a running worker was started under (its pid when unknown)."""
        spec = self._specs.get(pid)
        return spec[0] if spec else str(pid)

    def restart_dead(self) -> int:
        """Start a replacement for every worker that exited, as a supervisor would (Celery can
        exit when it loses the broker and cannot reconnect). Returns how many were restarted."""
        restarted = 0
        for proc in [p for p in self.procs if p.poll() is not None]:
            self.procs.remove(proc)
            name, queues, concurrency, extra = self._specs.pop(proc.pid)
            self.start(f"{name}-r{restarted}", queues, concurrency, extra)
            restarted += 1
        return restarted

    def stop(self, timeout: float = 20) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for p in self.procs:
            try:
                p.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
        self.procs.clear()

    def __enter__(self) -> WorkerPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
