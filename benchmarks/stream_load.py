"""Load and soak test of the streaming service on loopback: N concurrent clients for a bounded time.

Starts ``vident serve`` as a subprocess (so its memory is measured alone), measures the backend's raw
streaming FPS in this process first (same model, backend and frames, ``run_streams`` at batch 1),
then runs N clients that each keep two frames in flight for ``--seconds`` (or ``--minutes``), then
connects and drops ``--churn`` sessions (half of them mid-stream) ``--churn-rounds`` times. Reports
aggregate FPS, per-session latency p50/p95/p99 (client-measured round trip), drops, errors, the
server's RSS idle / after load / after churn, its RSS sampled every ``--sample-every`` seconds during
the load (start, peak, end, and the kernel's high-water mark), and what ``/metrics`` says at the end
(sessions still open = leaked, sessions opened, frames processed, errors by code).

    python -m benchmarks.stream_load --model most-nss-tiny --clients 4 --seconds 10 --size 240x320
    python -m benchmarks.stream_load --model most-nss --backend auto --clients 8 --minutes 3 --raw-seconds 0 --churn 0
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from benchmarks.make_sample import synthetic_clip
from service.client import Result, ServerError, StreamClient, encode_frame


def _status_mib(pid: int, field_name: str) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field_name + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field_name} for pid {pid}")


def rss_mib(pid: int) -> float:
    """Resident memory of a process (Linux /proc), MiB."""
    return _status_mib(pid, "VmRSS")


def peak_rss_mib(pid: int) -> float:
    """The process's resident-memory high-water mark since it started (VmHWM, kept by the kernel), MiB:
    the peak between two samples is not missed."""
    return _status_mib(pid, "VmHWM")


class RssSampler:
    """Samples a process's RSS every ``interval`` seconds on a thread: ``with RssSampler(pid) as s: ...``."""

    def __init__(self, pid: int, interval: float = 1.0) -> None:
        self.pid = pid
        self.interval = interval
        self.samples: list[tuple[float, float]] = []  # (seconds since start, MiB)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)

    def __enter__(self) -> RssSampler:
        self._start = time.monotonic()
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()

    def _sample(self) -> None:
        try:
            self.samples.append((round(time.monotonic() - self._start, 1), round(rss_mib(self.pid), 1)))
        except (OSError, RuntimeError):  # the process has gone
            pass

    def _run(self) -> None:
        while True:
            self._sample()
            if self._stop.wait(self.interval):
                return

    def summary(self) -> dict[str, object]:
        values = [mib for _, mib in self.samples]
        return {
            "interval_s": self.interval,
            "samples": len(values),
            "start": values[0] if values else None,
            "peak": max(values) if values else None,
            "end": values[-1] if values else None,
        }


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def raw_fps(
    model: str, backend: str, device: str, precision: str, frames: list[np.ndarray], seconds: float
) -> dict[str, object]:
    """Streaming FPS of the backend alone (run_streams: pre/post-processing included, no network)."""
    from service.backends.factory import create_backend
    from service.pipeline import Geometry, Stream, run_streams

    runtime = create_backend(model, backend, device, precision)
    h, w = frames[0].shape[:2]
    stream = Stream(runtime.spec, Geometry(h, w))
    for frame in frames[:3]:  # warm-up
        run_streams(runtime, [stream], [frame])
    done, infer_seconds, start = 0, 0.0, time.perf_counter()
    while time.perf_counter() - start < seconds and done < 10_000:
        result = run_streams(runtime, [stream], [frames[done % len(frames)]])[0]
        infer_seconds += result.infer_seconds
        done += 1
    wall = time.perf_counter() - start
    runtime.close()
    info = runtime.info
    fps = {"frames": done, "fps": done / wall, "infer_only_fps": done / infer_seconds}
    return {**fps, "backend": info.name, "precision": info.precision}


@dataclass
class SessionStats:
    processed: int = 0
    dropped: int = 0
    errors: int = 0
    latencies_ms: list[float] = field(default_factory=list)


async def one_client(url: str, frames: list[bytes], seconds: float, in_flight: int = 2) -> SessionStats:
    """Streams ``frames`` in a loop for ``seconds`` with at most ``in_flight`` unanswered, then closes."""
    stats = SessionStats()
    async with StreamClient(url, output_format="jpeg") as client:
        answered = asyncio.Event()

        async def receive() -> None:
            async for message in client.messages():
                if isinstance(message, Result):
                    stats.processed += 1
                    stats.dropped = int(message.header["dropped"])
                    if message.latency_s is not None:
                        stats.latencies_ms.append(message.latency_s * 1e3)
                elif isinstance(message, ServerError):
                    stats.errors += 1
                if isinstance(message, dict) and message.get("type") == "bye":
                    break
                answered.set()

        receiver = asyncio.create_task(receive())
        end = time.perf_counter() + seconds
        while time.perf_counter() < end and not receiver.done():
            if client.sent - stats.processed - stats.dropped - stats.errors >= in_flight:
                answered.clear()
                try:
                    await asyncio.wait_for(answered.wait(), timeout=max(0.01, end - time.perf_counter()))
                except asyncio.TimeoutError:
                    break
                continue
            await client.send_frame(frames[client.sent % len(frames)])
        await client.close()
        await asyncio.wait_for(receiver, timeout=600)
    return stats


async def churn(url: str, frames: list[bytes], sessions: int, at_once: int) -> int:
    """Opens ``sessions`` sessions, ``at_once`` at a time; half leave mid-stream without closing."""
    finished = 0

    async def one(i: int) -> None:
        nonlocal finished
        client = StreamClient(url)
        async with client:
            await client.send_frame(frames[i % len(frames)])
            await client.send_frame(frames[(i + 1) % len(frames)])
            if i % 2 == 0:  # polite: wait for the results and close
                await client.close()
                async for _ in client.messages():
                    pass
            # else: the socket drops with frames in flight
        finished += 1

    for start in range(0, sessions, at_once):
        await asyncio.gather(*(one(i) for i in range(start, min(sessions, start + at_once))))
    return finished


def get_json(url: str) -> dict[str, object]:
    with urllib.request.urlopen(url, timeout=10) as response:
        return json.loads(response.read())


def wait_until(predicate, timeout: float, what: str, process: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"the server exited with code {process.returncode} while waiting for {what}")
        try:
            if predicate():
                return
        except OSError:
            pass
        time.sleep(0.2)
    raise TimeoutError(f"timed out waiting for {what}")


@contextmanager
def served(settings: dict[str, str], timeout: float = 600.0) -> Iterator[tuple[subprocess.Popen, str]]:
    """``vident serve`` in a subprocess on a free port, configured through ``VIDENT_*`` variables
    (``settings``: field name -> value, e.g. ``{"MODEL": "most-nss"}``); yields the process and
    ``http://127.0.0.1:PORT`` once ``/readyz`` says the default model is loaded. Batch jobs keep their
    data in a temporary folder, so the benchmark never shares the user's (a folder is locked by the
    server using it)."""
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="vident-bench-jobs-") as jobs_dir:
        env = {**os.environ, "VIDENT_LOG_LEVEL": "warning", "VIDENT_JOBS_DATA_DIR": jobs_dir}
        env.update({f"VIDENT_{k}": v for k, v in settings.items()})
        command = [sys.executable, "-m", "service.cli", "serve", "--host", "127.0.0.1", "--port", str(port)]
        server = subprocess.Popen(command, stdout=subprocess.DEVNULL, env=env)
        base = f"http://127.0.0.1:{port}"
        try:
            wait_until(lambda: get_json(base + "/readyz")["ready"], timeout, "the server to load the model", server)
            yield server, base
        finally:
            server.terminate()
            try:
                server.wait(timeout=60)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()


def server_metrics(base: str) -> dict[str, float]:
    """``/metrics`` as ``{"name{label=value,...}": value}`` (labels sorted), for the report."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(base + "/metrics", timeout=10) as response:
        text = response.read().decode()
    values = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
            values[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
    return values


def percentiles(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"p50": None, "p95": None, "p99": None}
    return {f"p{q}": round(float(np.percentile(values, q)), 1) for q in (50, 95, 99)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="most-nss-tiny")
    parser.add_argument("--backend", default="torch")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", default="auto")
    parser.add_argument("--clients", type=int, default=4)
    duration = parser.add_mutually_exclusive_group()
    duration.add_argument("--seconds", type=float, default=10.0, help="length of the load")
    duration.add_argument("--minutes", type=float, default=None, help="length of the load (a soak)")
    parser.add_argument("--size", default="240x320", help="HxW of the streamed frames")
    parser.add_argument("--churn", type=int, default=50, help="sessions that connect and drop after the load")
    parser.add_argument("--churn-rounds", type=int, default=3, help="rounds of --churn sessions")
    parser.add_argument("--raw-seconds", type=float, default=5.0, help="time for the raw backend FPS baseline")
    parser.add_argument("--sample-every", type=float, default=5.0, help="seconds between RSS samples during the load")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    seconds = args.minutes * 60 if args.minutes is not None else args.seconds
    height, width = (int(v) for v in args.size.split("x"))
    clip = synthetic_clip(24, height, width, seed=5)
    jpegs = [encode_frame(f, "jpeg", 90) for f in clip]

    load_start = round(os.getloadavg()[0], 2)
    raw = None
    if args.raw_seconds > 0:
        raw = raw_fps(args.model, args.backend, args.device, args.precision, clip, args.raw_seconds)
    settings = {"MODEL": args.model, "BACKEND": args.backend, "DEVICE": args.device, "PRECISION": args.precision}
    settings["MAX_SESSIONS"] = str(max(args.clients, 8))
    from service.pipeline import Geometry

    padded_h, padded_w = Geometry(height, width).padded
    settings["WARMUP_SIZE"] = f"{padded_h}x{padded_w}"  # warm up at the size the clients will send
    with served(settings) as (server, base):
        ws_url = base.replace("http://", "ws://") + "/v1/stream"
        rss_idle = rss_mib(server.pid)
        start = time.perf_counter()
        with RssSampler(server.pid, args.sample_every) as sampler:
            sessions = asyncio.run(_load(ws_url, jpegs, args.clients, seconds))
        elapsed = time.perf_counter() - start
        # every session has closed on the client side; a session the server still counts has leaked
        with contextlib.suppress(TimeoutError):
            wait_until(lambda: get_json(base + "/healthz")["sessions"] == 0, 60, "every session to close")
        metrics_after_load = server_metrics(base)
        rss_loaded = rss_mib(server.pid)
        churned, rss_churn = 0, []
        for _ in range(args.churn_rounds if args.churn else 0):  # a leak grows every round; an allocator plateaus
            churned += asyncio.run(churn(ws_url, jpegs, args.churn, max(args.clients, 8)))
            wait_until(lambda: get_json(base + "/healthz")["sessions"] == 0, 60, "every session to close")
            time.sleep(1.0)
            rss_churn.append(round(rss_mib(server.pid), 1))
        metrics_end = server_metrics(base)
        rss_high_water = peak_rss_mib(server.pid)

    processed = sum(s.processed for s in sessions)
    report = {
        "model": args.model,
        "backend": args.backend,
        "device": args.device,
        "size": f"{height}x{width}",
        "clients": args.clients,
        "seconds": round(elapsed, 2),
        "frames_processed": processed,
        "aggregate_fps": round(processed / elapsed, 2),
        "per_session_fps": [round(s.processed / elapsed, 2) for s in sessions],
        "per_session_processed": [s.processed for s in sessions],
        "latency_ms_per_session": [percentiles(s.latencies_ms) for s in sessions],
        "latency_ms_all": percentiles([v for s in sessions for v in s.latencies_ms]),
        "dropped": sum(s.dropped for s in sessions),
        "errors": sum(s.errors for s in sessions),
        "raw_backend": raw,
        "service_vs_raw": round(processed / elapsed / raw["fps"], 3) if raw else None,
        "churn_sessions": churned,
        "server_rss_mib": {
            "idle": round(rss_idle, 1),
            "during_load": sampler.summary(),
            "after_load": round(rss_loaded, 1),
            "after_each_churn_round": rss_churn,
            "high_water_mark": round(rss_high_water, 1),
        },
        "server_metrics": {
            "sessions_open_after_load": _sum(metrics_after_load, "vident_sessions"),
            "sessions_open_at_end": _sum(metrics_end, "vident_sessions"),  # leaked sessions
            "sessions_opened": _sum(metrics_end, "vident_sessions_opened_total"),
            "frames_received": _sum(metrics_end, "vident_frames_received_total"),
            "frames_processed": _sum(metrics_end, "vident_frames_processed_total"),
            "errors": {k: v for k, v in metrics_end.items() if k.startswith("vident_errors_total")},
            "send_timeouts": _sum(metrics_end, "vident_send_timeouts_total"),
        },
        "rss_samples_mib": sampler.samples,
        "host": {
            "cpus": os.cpu_count(),
            "machine": platform.machine(),
            "python": platform.python_version(),
            "load_average_1m": {"start": load_start, "end": round(os.getloadavg()[0], 2)},  # other work on the host
        },
        "command": " ".join(["python -m benchmarks.stream_load", *sys.argv[1:]]),
    }
    print(json.dumps({k: v for k, v in report.items() if k != "rss_samples_mib"}, indent=1))
    if args.json:
        args.json.write_text(json.dumps(report, indent=1) + "\n")


def _sum(metrics: dict[str, float], name: str) -> float:
    """One sample of :func:`server_metrics` summed over its labels."""
    return sum(v for k, v in metrics.items() if k == name or k.startswith(name + "{"))


async def _load(url: str, frames: list[bytes], clients: int, seconds: float) -> list[SessionStats]:
    return list(await asyncio.gather(*(one_client(url, frames, seconds) for _ in range(clients))))


if __name__ == "__main__":
    main()
