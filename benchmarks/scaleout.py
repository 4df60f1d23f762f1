"""Scale-out numbers on one machine, from real processes (benchmarks/cluster.py): batch-job throughput with one
and two ``vident worker`` processes on the same clips, the time from a worker's death to its job's redelivery,
and streaming sessions per ``vident serve`` replica behind haproxy (deploy/haproxy.cfg).

    python -m benchmarks.scaleout --json scaleout.json

Each process gets ``--threads`` torch threads (default 1, one core's worth: two workers on two cores stand for
two machines). Needs redis-server and haproxy (``apt-get install redis-server haproxy``). Prints one JSON report.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx

from benchmarks.cluster import (
    Process,
    find_binary,
    free_port,
    haproxy,
    redis_server,
    serve,
    vident,
    wait_balanced,
    wait_for,
    wait_ready,
)
from benchmarks.make_sample import synthetic_clip
from service.client import Source, stream_source
from service.video import VideoWriter


def write_clip(path: Path, frames: int, height: int, width: int) -> Path:
    with VideoWriter(path, width, height, 25) as writer:
        for rgb in synthetic_clip(frames, height, width, seed=5):
            writer.write(rgb)
    return path


class JobCluster:
    """redis-server, one API replica (``vident serve --jobs-broker``) and named workers, in ``folder``."""

    def __init__(self, folder: Path, redis_url: str, model: str, threads: int, heartbeat_s: float) -> None:
        self.folder = folder
        self.threads = threads
        self.env = {
            "VIDENT_JOBS_DATA_DIR": str(folder / "jobs"),
            "VIDENT_JOBS_BROKER": redis_url,
            "VIDENT_JOBS_HEARTBEAT_TIMEOUT_S": str(heartbeat_s),
            "VIDENT_JOBS_BACKEND": "torch",
        }
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        self.api = serve(port, folder / "api.log", model, **self.env)
        self.workers: dict[str, Process] = {}
        wait_ready(self.url, self.api)

    def add_workers(self, names: list[str]) -> None:
        for name in names:
            log = self.folder / f"{name}.log"
            self.workers[name] = vident(["worker", "--worker-name", name], log, self.threads, **self.env)
        wanted = f"vident_jobs_workers {float(len(self.workers))}"
        wait_for(lambda: True if wanted in self._metrics() else None, 240, "workers", interval=0.2)

    def _metrics(self) -> str:
        for name, worker in self.workers.items():
            if not worker.alive():
                raise RuntimeError(f"worker {name} exited: {worker.tail()}")
        return httpx.get(f"{self.url}/metrics", timeout=5).text

    def submit(self, clip: Path) -> str:
        response = httpx.post(f"{self.url}/v1/jobs", files={"file": (clip.name, clip.read_bytes())}, timeout=60)
        response.raise_for_status()
        return response.json()["id"]

    def job(self, job_id: str) -> dict[str, Any]:
        return httpx.get(f"{self.url}/v1/jobs/{job_id}", timeout=5).json()

    def close(self) -> None:
        for process in (*self.workers.values(), self.api):
            process.stop()


def jobs_throughput(args: argparse.Namespace, redis: str, workers: int, clip: Path, folder: Path) -> dict[str, Any]:
    """``args.jobs`` jobs of the same clip, submitted at once; wall time from the first submission to the last
    job done (workers already started and idle)."""
    folder.mkdir()
    cluster = JobCluster(folder, redis, args.model, args.threads, heartbeat_s=15)
    try:
        cluster.add_workers([f"w{i}" for i in range(1, workers + 1)])
        start = time.monotonic()
        ids = [cluster.submit(clip) for _ in range(args.jobs)]

        def all_done() -> list[dict[str, Any]] | None:
            jobs = [cluster.job(i) for i in ids]
            return jobs if all(j["state"] in ("done", "failed") for j in jobs) else None

        jobs = wait_for(all_done, 3600, "jobs", interval=0.2)
        wall = time.monotonic() - start
    finally:
        cluster.close()
    failed = [j["error"] for j in jobs if j["state"] != "done"]
    if failed:
        raise RuntimeError(f"jobs failed: {failed}")
    frames = sum(j["frames_total"] for j in jobs)
    return {
        "workers": workers,
        "jobs": len(jobs),
        "frames": frames,
        "wall_s": round(wall, 2),
        "jobs_per_min": round(60 * len(jobs) / wall, 2),
        "frames_per_s": round(frames / wall, 2),
        "jobs_by_worker": dict(Counter(j["worker"] for j in jobs)),
    }


def redelivery(args: argparse.Namespace, redis: str, heartbeat_s: float, clip: Path, folder: Path) -> dict[str, Any]:
    """One job on w1, w2 idle; SIGKILL w1 once the job has progress; the time until the record shows the job
    running again (attempt 2, on w2) and until it is done."""
    folder.mkdir()
    cluster = JobCluster(folder, redis, args.model, args.threads, heartbeat_s)
    try:
        cluster.add_workers(["w1"])
        job_id = cluster.submit(clip)
        wait_for(lambda: True if cluster.job(job_id)["frames_done"] > 0 else None, 600, "progress", interval=0.02)
        cluster.add_workers(["w2"])  # started now, so the job surely ran on w1
        cluster.workers.pop("w1").kill()
        killed = time.monotonic()
        wait_for(lambda: True if cluster.job(job_id)["attempts"] == 2 else None, 600, "redelivery", interval=0.02)
        restarted = time.monotonic()
        job = wait_for(lambda: j if (j := cluster.job(job_id))["state"] in ("done", "failed") else None, 3600, "done")
        finished = time.monotonic()
    finally:
        cluster.close()
    return {
        "heartbeat_timeout_s": heartbeat_s,
        "kill_to_restart_s": round(restarted - killed, 2),
        "kill_to_done_s": round(finished - killed, 2),
        "state": job["state"],
        "attempts": job["attempts"],
        "worker": job["worker"],
    }


def sessions_per_replica(args: argparse.Namespace, folder: Path) -> list[dict[str, Any]]:
    """Two replicas behind haproxy; for each count in ``args.sessions``, that many real-time sessions per
    replica at ``args.fps`` for ``args.seconds``: frames each session got back, per replica."""
    folder.mkdir()
    ports = [free_port(), free_port()]
    replicas = [
        serve(port, folder / f"replica{i}.log", args.model, "--max-sessions", str(2 * max(args.sessions)))
        for i, port in enumerate(ports, 1)
    ]
    lb_port = free_port()
    balancer = haproxy(args.haproxy, folder / "haproxy.log", lb_port, ports)
    url = f"http://127.0.0.1:{lb_port}"
    rows = []
    try:
        for replica, port in zip(replicas, ports, strict=True):
            wait_ready(f"http://127.0.0.1:{port}", replica)
        wait_balanced(url, balancer, {"replica1", "replica2"})
        height, width = (int(v) for v in args.size.split("x"))
        clip = synthetic_clip(int(args.fps * args.seconds), height, width, seed=7)
        for per_replica in args.sessions:
            summaries = asyncio.run(
                _sessions(url.replace("http://", "ws://") + "/v1/stream", clip, args.fps, 2 * per_replica)
            )
            by_replica: dict[str, list[float]] = {}
            for summary in summaries:
                server = summary.connections[0].server or "?"
                by_replica.setdefault(server, []).append(summary.processed / summary.sent)
            rows.append(
                {
                    "sessions_per_replica": per_replica,
                    "sessions_by_replica": {k: len(v) for k, v in sorted(by_replica.items())},
                    "answered_fraction_min": round(min(min(v) for v in by_replica.values()), 3),
                    "answered_fraction_mean": round(sum(sum(v) for v in by_replica.values()) / len(summaries), 3),
                    "fps_per_session_mean": round(
                        sum(s.processed for s in summaries) / len(summaries) / args.seconds, 2
                    ),
                    "reconnects": sum(s.reconnects for s in summaries),
                }
            )
    finally:
        for process in (balancer, *replicas):
            process.stop()
    return rows


async def _sessions(url: str, clip: list[Any], fps: float, count: int) -> list[Any]:
    return await asyncio.gather(
        *(
            stream_source(Source(iter(clip), fps, "clip"), url, None, realtime=True, progress=False)
            for _ in range(count)
        )
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="most-nss-tiny")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process")
    parser.add_argument("--jobs", type=int, default=6, help="jobs per throughput run")
    parser.add_argument("--frames", type=int, default=48, help="frames per job clip")
    parser.add_argument("--job-size", default="64x96", help="HxW of the job clip")
    parser.add_argument("--heartbeat", type=float, nargs="+", default=[15.0], help="heartbeat timeouts to measure")
    parser.add_argument("--sessions", type=int, nargs="+", default=[1, 2, 4], help="sessions per replica to try")
    parser.add_argument("--fps", type=float, default=10.0, help="frame rate of each streaming session")
    parser.add_argument("--seconds", type=float, default=10.0, help="length of each streaming session")
    parser.add_argument("--size", default="240x320", help="HxW of the streamed frames")
    parser.add_argument("--skip", nargs="*", default=[], choices=("jobs", "redelivery", "sessions"))
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    redis_binary, args.haproxy = find_binary("redis-server"), find_binary("haproxy")
    if redis_binary is None or args.haproxy is None:
        print("needs redis-server and haproxy: apt-get install redis-server haproxy", file=sys.stderr)
        return 2
    cpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    model_name = next((line.split(":", 1)[1].strip() for line in cpu.splitlines() if "Model name" in line), "?")
    report: dict[str, Any] = {
        "command": " ".join(["python -m benchmarks.scaleout", *(argv if argv is not None else sys.argv[1:])]),
        "cpu": model_name,
        "machine": platform.machine(),
        "load_average_start": list(os.getloadavg()),
    }
    with tempfile.TemporaryDirectory(prefix="vident-scaleout-") as tmp:
        root = Path(tmp)
        height, width = (int(v) for v in args.job_size.split("x"))
        clip = write_clip(root / "clip.mp4", args.frames, height, width)
        with redis_server(redis_binary, root) as redis:
            if "jobs" not in args.skip:
                runs = [jobs_throughput(args, redis, n, clip, root / f"jobs-{n}") for n in (1, 2)]
                report["jobs"] = {
                    "runs": runs,
                    "two_over_one": round(runs[1]["frames_per_s"] / runs[0]["frames_per_s"], 3),
                }
                print(json.dumps(report["jobs"]), file=sys.stderr)
            if "redelivery" not in args.skip:
                longer = write_clip(root / "long.mp4", 4 * args.frames, height, width)
                report["redelivery"] = [
                    redelivery(args, redis, h, longer, root / f"redelivery-{h:g}") for h in args.heartbeat
                ]
                print(json.dumps(report["redelivery"]), file=sys.stderr)
        if "sessions" not in args.skip:
            report["sessions"] = sessions_per_replica(args, root / "sessions")
    report["load_average_end"] = list(os.getloadavg())
    text = json.dumps(report, indent=1)
    print(text)
    if args.json:
        args.json.write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
