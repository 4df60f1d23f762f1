"""Real servers for the scale-out tests: redis-server and haproxy from Debian's packages, ``vident`` processes
(started by :mod:`benchmarks.cluster`, which the scale-out benchmark uses too).

Nothing is mocked. Without a binary (or the ``queue`` extra's Python packages) the tests skip and say what to
install, except in CI (CI=true), where .ci/run installs them and a missing one is a failure.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import torch

from benchmarks import cluster

TINY = "most-nss-tiny"


def _missing(what: str, install: str) -> None:
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"CI must run the scale-out tests, but {what} is missing (.ci/run installs it: {install})")
    pytest.skip(f"needs {what} ({install})")


def require_binary(name: str, package: str) -> str:
    path = cluster.find_binary(name)
    if path is None:
        _missing(name, f"apt-get install {package}")
    return path


def require_queue_packages() -> None:
    """redis-py and Dramatiq: the ``queue`` extra (also in ``test``)."""
    absent = [name for name in ("redis", "dramatiq") if importlib.util.find_spec(name) is None]
    if absent:
        _missing(" and ".join(absent), "pip install -e '.[queue]'")


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread() -> Iterator[None]:
    """Servers these tests run in their own process get one torch thread, as cluster.vident gives child processes:
    with a replica, workers and haproxy on two cores, a second OpenMP thread only spins waiting for a core."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def redis_server(folder: Path) -> Iterator[str]:
    require_queue_packages()
    with cluster.redis_server(require_binary("redis-server", "redis-server"), folder) as url:
        yield url


def serve(port: int, log: Path, *extra: str, **env: str) -> cluster.Process:
    return cluster.serve(port, log, TINY, *extra, **env)


@dataclass
class Replicas:
    """Two ``vident serve`` replicas (named replica1, replica2 by haproxy) behind haproxy at ``url``."""

    url: str
    ports: list[int]
    processes: list[cluster.Process]

    def sessions(self, *replicas: int) -> list[int]:
        """Open sessions on each replica (indices into :attr:`ports`; default all), asked directly."""
        ports = [self.ports[i] for i in replicas] if replicas else self.ports
        return [httpx.get(f"http://127.0.0.1:{p}/healthz", timeout=5).json()["sessions"] for p in ports]


@contextmanager
def balanced_replicas(folder: Path, *extra: str) -> Iterator[Replicas]:
    """Two replicas (``extra``: more ``vident serve`` flags) behind haproxy running the shipped deploy/haproxy.cfg,
    each ready and passing haproxy's health check; all stopped at the end."""
    binary = require_binary("haproxy", "haproxy")
    ports = [cluster.free_port(), cluster.free_port()]
    processes = [serve(port, folder / f"replica{i}.log", *extra) for i, port in enumerate(ports, 1)]
    lb_port = cluster.free_port()
    balancer = cluster.haproxy(binary, folder / "haproxy.log", lb_port, ports)
    url = f"http://127.0.0.1:{lb_port}"
    try:
        for process, port in zip(processes, ports, strict=True):
            cluster.wait_ready(f"http://127.0.0.1:{port}", process)
        cluster.wait_balanced(url, balancer, {"replica1", "replica2"})
        yield Replicas(url, ports, processes)
    finally:
        for process in (balancer, *processes):
            process.stop()
