"""A scale-out deployment on one machine, from real processes: redis-server, haproxy with deploy/haproxy.cfg,
``vident serve`` replicas and ``vident worker`` processes. Used by ``benchmarks/scaleout.py`` and by the
scale-out tests, so both run what docker-compose.yml's ``scaleout`` profile runs, on loopback addresses.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, TypeVar

import httpx

T = TypeVar("T")
HAPROXY_CFG = Path(__file__).resolve().parents[1] / "deploy" / "haproxy.cfg"


def find_binary(name: str) -> str | None:
    """``name`` on PATH, or in /usr/sbin (haproxy's place on Debian, often not on a user's PATH)."""
    return shutil.which(name) or next(
        (p for p in (f"/usr/sbin/{name}", f"/usr/bin/{name}") if os.access(p, os.X_OK)), None
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(probe: Callable[[], T | None], timeout: float, what: str, interval: float = 0.05) -> T:
    """Polls ``probe`` until it returns something other than None (connection errors count as not yet)."""
    deadline = time.monotonic() + timeout
    last: BaseException | None = None
    while time.monotonic() < deadline:
        try:
            value = probe()
        except (httpx.TransportError, OSError, ValueError, KeyError) as exc:
            last, value = exc, None
        if value is not None:
            return value
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what} (last error: {last})")


class Process:
    """A child process whose output goes to a log file (read back when something fails)."""

    def __init__(self, command: list[str], log: Path, env: dict[str, str] | None = None) -> None:
        self.log = log
        self._out: IO[bytes] = log.open("wb")
        self.popen = subprocess.Popen(command, env=env, stdout=self._out, stderr=subprocess.STDOUT)

    def tail(self, chars: int = 3000) -> str:
        self._out.flush()
        return self.log.read_text(errors="replace")[-chars:]

    def alive(self) -> bool:
        return self.popen.poll() is None

    def kill(self) -> None:
        """SIGKILL: no shutdown code runs, as in a crash, an out-of-memory kill or a lost machine."""
        self.popen.kill()
        self.popen.wait(30)

    def pause(self) -> None:
        """SIGSTOP: frozen where it is (nothing it writes changes meanwhile) until :meth:`resume` or a kill."""
        self.popen.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        self.popen.send_signal(signal.SIGCONT)

    def stop(self) -> None:
        if self.alive():
            self.popen.terminate()
            try:
                self.popen.wait(30)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(30)
        self._out.close()


def vident(args: list[str], log: Path, threads: int = 1, **env: str) -> Process:
    """``vident ARGS`` in a child process with ``threads`` torch threads (one each by default: several
    processes on a few cores otherwise spin against each other's OpenMP threads)."""
    environment = {**os.environ, "OMP_NUM_THREADS": str(threads), **env}
    return Process([sys.executable, "-m", "service.cli", *args], log, environment)


def serve(port: int, log: Path, model: str, *extra: str, **env: str) -> Process:
    args = ["serve", "--model", model, "--backend", "torch", "--port", str(port), "--warmup-size", "", *extra]
    return vident(args, log, **env)


def wait_ready(url: str, process: Process, timeout: float = 240) -> None:
    """Until ``url``/readyz answers 200; generous: a loaded machine can be slow to import torch."""

    def ready() -> bool | None:
        if not process.alive():
            raise RuntimeError(f"{process.log.name} exited: {process.tail()}")
        return True if httpx.get(f"{url}/readyz", timeout=2).status_code == 200 else None

    wait_for(ready, timeout, f"{url}/readyz", interval=0.2)


@contextmanager
def redis_server(binary: str, folder: Path) -> Iterator[str]:
    """A throwaway redis-server on a free loopback port, no persistence; yields its URL."""
    port = free_port()
    command = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
    process = Process([*command, "--dir", str(folder)], folder / "redis.log")
    try:

        def answers() -> bool | None:
            if not process.alive():
                raise RuntimeError(f"redis-server exited: {process.tail()}")
            with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
                s.sendall(b"PING\r\n")
                return True if s.recv(16).startswith(b"+PONG") else None

        wait_for(answers, 30, "redis-server")
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        process.stop()


def haproxy(binary: str, log: Path, port: int, replicas: list[int]) -> Process:
    """haproxy running the shipped deploy/haproxy.cfg in front of ``replicas`` (loopback ports)."""
    env = {
        **os.environ,
        "VIDENT_LB_BIND": f"127.0.0.1:{port}",
        **{f"VIDENT_REPLICA_{i}": f"127.0.0.1:{p}" for i, p in enumerate(replicas, start=1)},
    }
    return Process([binary, "-db", "-f", str(HAPROXY_CFG)], log, env)


def wait_balanced(url: str, balancer: Process, servers: set[str], timeout: float = 60) -> None:
    """Until haproxy's health checks pass for every server in ``servers`` (answers come from each)."""

    def all_up() -> bool | None:
        if not balancer.alive():
            raise RuntimeError(f"haproxy exited: {balancer.tail()}")
        served = {httpx.get(f"{url}/healthz", timeout=2).headers.get("X-Served-By") for _ in range(2 * len(servers))}
        return True if served == servers else None

    wait_for(all_up, timeout, "every replica up behind haproxy", interval=0.5)
