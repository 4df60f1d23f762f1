"""Streaming across replicas on real components: two `vident serve` processes behind haproxy (Debian's package)
running the shipped deploy/haproxy.cfg, eight `vident stream` clients (service.client.stream_source), one
replica killed with SIGKILL mid-stream. Nothing is mocked."""

from __future__ import annotations

import asyncio
import threading
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from fastapi.testclient import TestClient
from real_servers import TINY, Replicas, balanced_replicas, one_torch_thread  # noqa: F401

from benchmarks.cluster import wait_for
from benchmarks.make_sample import synthetic_clip
from service.app import create_app, serve_in_thread
from service.client import Reconnect, Source, StreamClient, StreamSummary, stream_source
from service.settings import Settings

CLIENTS = 8
FPS = 10.0
AFTER = 15  # frames each client sends after the kill: its new stream on the live replica, or the rest of its own


def test_a_full_replica_is_not_ready_until_a_session_ends() -> None:
    settings = Settings(model=TINY, backend="torch", preload=False, max_sessions=1, _env_file=None)
    with TestClient(create_app(settings)) as client:
        assert client.get("/readyz").status_code == 200
        with client.websocket_connect("/v1/stream") as ws:
            assert ws.receive_json()["type"] == "hello"
            full = client.get("/readyz")
            assert full.status_code == 503
            assert full.json() == {"ready": False, "status": "full", "model": TINY, "sessions": 1, "max_sessions": 1}
        wait_for(lambda: True if client.get("/readyz").status_code == 200 else None, 30, "readiness after the session")


def test_a_full_server_is_tried_again_until_a_session_ends(tmp_path: Path) -> None:
    clip = synthetic_clip(6, 48, 64, seed=4)
    policy = Reconnect(attempts=50, first_delay_s=0.1, max_delay_s=0.2)

    async def run(url: str) -> StreamSummary:
        async with StreamClient(url):  # holds the only session
            waiting = asyncio.create_task(
                stream_source(Source(iter(clip), 25, "clip"), url, tmp_path / "out", progress=False, reconnect=policy)
            )
            await asyncio.sleep(1.5)
            assert not waiting.done()  # refused (too_many_sessions), trying again
        return await asyncio.wait_for(waiting, 120)

    app = create_app(Settings(model=TINY, backend="torch", max_sessions=1, _env_file=None))
    with serve_in_thread(app) as url:
        summary = asyncio.run(run(url.replace("http://", "ws://") + "/v1/stream"))
    assert (summary.processed, summary.lost, summary.reconnects, len(summary.connections)) == (len(clip), 0, 0, 1)
    assert len(list((tmp_path / "out" / "restored").iterdir())) == len(clip)


def test_a_dead_replicas_sessions_reconnect_and_the_others_are_untouched(tmp_path: Path) -> None:
    with balanced_replicas(tmp_path, "--max-sessions", str(CLIENTS)) as replicas:
        clip, killed = synthetic_clip(12, 48, 64, seed=3), threading.Event()
        clients = [_Camera(clip, killed) for _ in range(CLIENTS)]
        summaries = asyncio.run(_stream_and_kill(replicas, clients, killed))

    first = Counter(s.connections[0].server for s in summaries)
    assert set(first) == {"replica1", "replica2"} and min(first.values()) >= 2, first  # spread over both
    for summary, camera in zip(summaries, clients, strict=True):
        report = summary.as_dict()
        assert summary.sent == camera.frames and not summary.errors, report
        assert summary.connections[0].sent > 0, report  # every session was streaming when the replica died
        if summary.connections[0].server == "replica1":  # reconnected to the live replica, a new stream finished
            assert summary.reconnects >= 1 and summary.connections[0].ended == "broken", report
            assert summary.connections[-1].server == "replica2" and summary.connections[-1].ended == "bye", report
            assert summary.connections[-1].processed > 0, report
            assert summary.processed + summary.dropped + summary.lost == camera.frames, report  # all accounted for
        else:  # untouched: one connection, nothing lost
            assert (summary.reconnects, summary.lost, len(summary.connections)) == (0, 0, 1), report
            assert summary.connections[0].ended == "bye", report
            assert summary.processed + summary.dropped == camera.frames, report


class _Camera:
    """A live source: the clip over and over until ``stop`` is set, then :data:`AFTER` frames more. Streams so
    last as long as the test needs, however slow the machine, and end soon after the kill."""

    def __init__(self, clip: list[np.ndarray], stop: threading.Event) -> None:
        self.clip = clip
        self.stop = stop
        self.frames = 0  # handed to the client so far

    def __iter__(self) -> Iterator[np.ndarray]:
        left = AFTER
        while left > 0:
            yield self.clip[self.frames % len(self.clip)]
            self.frames += 1
            left -= self.stop.is_set()


async def _stream_and_kill(replicas: Replicas, cameras: list[_Camera], killed: threading.Event) -> list[StreamSummary]:
    policy = Reconnect(attempts=10, first_delay_s=0.2, max_delay_s=2.0)
    url = replicas.url.replace("http://", "ws://") + "/v1/stream"
    clients = [
        asyncio.create_task(
            stream_source(Source(iter(camera), FPS, "camera"), url, None, True, progress=False, reconnect=policy)
        )
        for camera in cameras
    ]
    try:
        opened = lambda: True if sum(replicas.sessions()) == CLIENTS else None  # noqa: E731
        await asyncio.to_thread(wait_for, opened, 120, "all sessions open", 0.1)
        await asyncio.sleep(1.0)  # a few frames into every stream
        await asyncio.to_thread(replicas.processes[0].kill)
    finally:
        killed.set()  # also when something failed: the clients end instead of streaming for ever
    return list(await asyncio.wait_for(asyncio.gather(*clients), timeout=240))
