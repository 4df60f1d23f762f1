"""Peak memory of the streaming server: per model, runtime and frame size, and under hostile input.

``sizes``: for every (model, runtime, frame size) a fresh ``vident serve`` (a subprocess, so peaks
never mix) loads the model the way it always does (start-up warm-up included), and one WebSocket
session streams ``--frames`` JPEG frames of that size through it in lockstep. The figure is the
server's resident-memory high-water mark (``VmHWM``, kept by the kernel, so no sample can miss the
peak). ``largest`` stands for the admitted frame with the largest network input under the default
``max_frame_pixels`` and ``max_frame_side`` (frames are padded to multiples of 8, so a long thin
frame pads to a little more than 1920 x 1088). A graph exported for ONNX Runtime or OpenVINO is
put in the export cache by a separate process first, as it is on any server after its first start.

``hostile``: a fresh server with the default settings gets a 4096 x 4096 PNG and JPEG and an
8000 x 8000 JPEG over the WebSocket, and two batch jobs: a video whose frames are 8000 x 8000 and
one whose third frame is. Every one must be refused with the documented answer, the server must
go on serving, and its peak RSS must stay within the budget: the highest peak of the same model
and runtime in a ``sizes`` report that has its ``largest`` point, or ``--budget-mib``.

    python -m benchmarks.memory sizes --models most-nss --backends openvino --sizes 320x416,largest --json sizes.json
    python -m benchmarks.memory hostile --model most-nss --budget-json sizes.json
    python -m benchmarks.memory table sizes.json other-sizes.json
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import math
import multiprocessing
import os
import platform
import subprocess
import sys
import threading
import time
from fractions import Fraction
from pathlib import Path

import av
import cv2
import httpx
import numpy as np

from benchmarks.make_sample import synthetic_clip
from benchmarks.stream_load import RssSampler, peak_rss_mib, rss_mib, served
from models import create_model
from models.spec import ModelSpec
from service.client import Result, ServerError, StreamClient, encode_frame
from service.pipeline import Geometry
from service.settings import DEFAULT_MAX_FRAME_PIXELS, Settings

LARGEST = "largest"
# A point stops (and is reported as stopped) when the machine's available memory falls below this:
# other work on the host must not be pushed into the OOM killer by a benchmark.
KEEP_AVAILABLE_MIB = 3072


def largest_admitted(max_pixels: int, max_side: int) -> tuple[int, int]:
    """(height, width) of the admitted frame whose padded network input is largest."""
    best = (0, 0, 0)
    for width in range(1, max_side + 1):
        height = min(max_side, max_pixels // width)
        if height < 1:
            break
        padded_h, padded_w = Geometry(height, width).padded
        best = max(best, (padded_h * padded_w, height, width))
    return best[1], best[2]


def parse_size(text: str) -> tuple[int, int]:
    if text == LARGEST:
        return largest_admitted(DEFAULT_MAX_FRAME_PIXELS, Settings.model_fields["max_frame_side"].default)
    height, width = (int(v) for v in text.split("x"))
    return height, width


def available_mib() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no MemAvailable in /proc/meminfo")


class MemoryGuard:
    """Kills ``process`` when the host's available memory drops under ``keep_mib`` (checked every 0.2 s)."""

    def __init__(self, process: subprocess.Popen, keep_mib: float) -> None:
        self.process = process
        self.keep_mib = keep_mib
        self.tripped = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="memory-guard", daemon=True)

    def __enter__(self) -> MemoryGuard:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(0.2):
            if available_mib() < self.keep_mib:
                self.tripped = True
                self.process.kill()
                return


def _prepare(model: str, backend: str) -> None:
    """Loads a backend once in a throw-away process: exports land in the cache before any measurement."""
    from service.backends.factory import create_backend

    create_backend(model, backend, "cpu", "auto").close()


def prepare_export_cache(model: str, backend: str) -> None:
    if backend == "torch":
        return
    child = multiprocessing.get_context("spawn").Process(target=_prepare, args=(model, backend))
    child.start()
    child.join()
    if child.exitcode != 0:
        raise RuntimeError(f"preparing {model} on {backend} failed (exit code {child.exitcode})")


async def stream_lockstep(
    url: str, frames: list[bytes], pid: int
) -> tuple[dict[str, object], list[float], list[float]]:
    """One session: each frame is sent once the previous result is in. Returns hello's backend, the
    seconds per frame (round trip) and the server's peak RSS after each frame (does a later frame,
    with the state carried, need more than the first?)."""
    seconds, peaks = [], []
    async with StreamClient(url) as client:
        messages = client.messages()
        for data in frames:
            start = time.perf_counter()
            await client.send_frame(data)
            async for message in messages:
                if isinstance(message, ServerError):
                    raise RuntimeError(f"the server refused a frame: {message}")
                if isinstance(message, Result):
                    break
            seconds.append(time.perf_counter() - start)
            peaks.append(round(peak_rss_mib(pid), 1))
        await client.close()
        async for _ in messages:  # results of nothing pending, then bye, then the close
            pass
    return dict(client.hello["backend"]), seconds, peaks  # type: ignore[arg-type]


def measure_point(
    model: str, backend: str, size: tuple[int, int], frames: list[bytes], timeout: float, keep_mib: float
) -> dict[str, object]:
    height, width = size
    point: dict[str, object] = {"model": model, "backend": backend, "size": f"{height}x{width}"}
    point["network_size"] = "x".join(map(str, Geometry(height, width).padded))
    with served({"MODEL": model, "BACKEND": backend, "PRECISION": "auto", "MAX_SESSIONS": "1"}) as (server, base):
        url = base.replace("http://", "ws://") + "/v1/stream"
        point["idle_rss_mib"] = round(rss_mib(server.pid), 1)
        point["startup_peak_rss_mib"] = round(peak_rss_mib(server.pid), 1)
        with MemoryGuard(server, keep_mib) as guard:
            try:
                streamed = stream_lockstep(url, frames, server.pid)
                runtime, seconds, peaks = asyncio.run(asyncio.wait_for(streamed, timeout))
            except (TimeoutError, asyncio.TimeoutError):
                point["skipped"] = f"{len(frames)} frames took longer than {timeout:.0f} s"
            except Exception as exc:  # noqa: BLE001 - one point's failure is reported, the others still run
                point["skipped"] = "host memory ran low: server killed" if guard.tripped else f"failed: {exc}"
            else:
                point["runtime"] = f"{runtime['name']} {runtime['precision']}"
                point["seconds_per_frame"] = [round(s, 2) for s in seconds]
                point["peak_rss_mib_after_each_frame"] = peaks
        if server.poll() is None:
            point["peak_rss_mib"] = round(peak_rss_mib(server.pid), 1)
            point["rss_after_mib"] = round(rss_mib(server.pid), 1)
    return point


@functools.cache
def _spec(model: str) -> ModelSpec:
    return create_model(model).spec  # type: ignore[return-value]


def state_mib(model: str, network_size: str) -> float:
    """The recurrent state one session holds between frames at ``network_size`` (HxW): every session
    open at that size holds this much besides the model's working memory."""
    height, width = (int(v) for v in network_size.split("x"))
    return sum(math.prod(s.tensor.shape(1, height, width)) * 4 for s in _spec(model).states) / 2**20


def sizes_markdown(points: list[dict[str, object]]) -> str:
    lines = [
        "| model | runtime | frame HxW | network HxW | RSS idle (MiB) | peak RSS (MiB) | peak - idle "
        "| state per session (MiB) | s/frame (shared CPU) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for p in points:
        state = f"{state_mib(str(p['model']), str(p['network_size'])):.0f}"
        if "skipped" in p:  # the peak so far is a lower bound
            so_far = f"at least {p['peak_rss_mib']}; " if "peak_rss_mib" in p else ""
            lines.append(f"| {p['model']} | {p['backend']} | {p['size']} | {p['network_size']} | "
                         f"{p.get('idle_rss_mib', '')} | {so_far}skipped: {p['skipped']} | | {state} | |")  # fmt: skip
            continue
        per_frame = p["seconds_per_frame"]
        lines.append(
            f"| {p['model']} | {p['runtime']} | {p['size']} | {p['network_size']} | {p['idle_rss_mib']} | "
            f"{p['peak_rss_mib']} | {p['peak_rss_mib'] - p['idle_rss_mib']:.1f} | {state} | "  # type: ignore[operator]
            f"{min(per_frame):.2f} |"  # type: ignore[call-overload]
        )
    return "\n".join(lines)


def run_sizes(args: argparse.Namespace) -> dict[str, object]:
    sizes = [(text, parse_size(text)) for text in args.sizes.split(",")]
    clips = {}
    for text, (height, width) in sizes:
        clip = synthetic_clip(args.frames, height, width, seed=5)
        clips[text] = [encode_frame(frame, "jpeg", 90) for frame in clip]
    points = []
    for model in args.models.split(","):
        for backend in args.backends.split(","):
            prepare_export_cache(model, backend)
            for text, size in sizes:
                point = measure_point(model, backend, size, clips[text], args.point_timeout, args.keep_available_mib)
                point["size_name"] = text
                print(json.dumps(point), flush=True)
                points.append(point)
    return {"points": points, "markdown": sizes_markdown(points)}


# --- hostile input ------------------------------------------------------------------------------------------------


def _image(height: int, width: int) -> np.ndarray:
    """Smooth random colour fields at ``height`` x ``width``: real pixels (a frame that decodes), cheap to
    make at any size and compressible, so a 4096 x 4096 PNG fits in one WebSocket message."""
    coarse = np.random.default_rng(9).integers(0, 256, (24, 32, 3), dtype=np.uint8)
    return cv2.resize(coarse, (width, height), interpolation=cv2.INTER_LINEAR)


def _png(rgb: np.ndarray) -> bytes:
    ok, buf = cv2.imencode(".png", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_PNG_COMPRESSION, 3])
    assert ok
    return buf.tobytes()


def mjpeg_video(path: Path, sizes: list[tuple[int, int]]) -> Path:
    """An MJPEG AVI with one frame per (height, width) in ``sizes``. Each MJPEG packet is a whole JPEG
    with its own size, so the stream header declares the first frame's size and a later frame can be
    larger: the case where only the per-frame check protects the server."""
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mjpeg", rate=30)
        stream.height, stream.width = sizes[0]
        stream.pix_fmt = "yuvj420p"
        for index, (height, width) in enumerate(sizes):
            packet = av.Packet(encode_frame(_image(height, width), "jpeg", 90))
            packet.stream, packet.pts, packet.dts, packet.time_base = stream, index, index, Fraction(1, 30)
            container.mux(packet)
    return path


async def _ws_answers(url: str, messages: list[bytes]) -> list[dict[str, object]]:
    """Sends each message in its own turn; returns the server's answer to each (an error or a result header)."""
    answers = []
    async with StreamClient(url) as client:
        replies = client.messages()
        for data in messages:
            await client.send_frame(data)
            async for message in replies:
                if isinstance(message, ServerError):
                    answers.append({"code": message.code, "message": str(message)})
                    break
                if isinstance(message, Result):
                    answers.append(message.header)
                    break
    return answers


def _wait_job(client: httpx.Client, job_id: str, timeout: float) -> dict[str, object]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = client.get(f"/v1/jobs/{job_id}").json()
        if job["state"] in ("done", "failed"):
            return job
        time.sleep(0.5)
    raise TimeoutError(f"job {job_id} did not finish in {timeout:.0f} s")


def run_hostile(args: argparse.Namespace, work: Path) -> dict[str, object]:
    settings = Settings(_env_file=None)
    big_png, big_jpeg = _png(_image(4096, 4096)), encode_frame(_image(4096, 4096), "jpeg", 90)
    huge_jpeg = encode_frame(_image(8000, 8000), "jpeg", 90)
    normal = encode_frame(_image(320, 416), "jpeg", 90)
    for name, data in (("4096x4096 PNG", big_png), ("4096x4096 JPEG", big_jpeg), ("8000x8000 JPEG", huge_jpeg)):
        if len(data) > settings.max_message_bytes:  # it would test the message limit, not the pixel budget
            raise RuntimeError(f"the {name} is {len(data)} bytes, above max_message_bytes")
    huge_video = mjpeg_video(work / "huge.avi", [(8000, 8000)] * 2)
    late_video = mjpeg_video(work / "late.avi", [(320, 416), (320, 416), (8000, 8000), (320, 416)])
    server_settings = {"MODEL": args.model, "BACKEND": args.backend, "PRECISION": "auto"}
    checks: dict[str, object] = {}
    with served(server_settings) as (server, base):
        url = base.replace("http://", "ws://") + "/v1/stream"
        idle = rss_mib(server.pid)
        startup_peak = peak_rss_mib(server.pid)
        with RssSampler(server.pid, 0.2) as sampler, httpx.Client(base_url=base, timeout=600) as http:
            loaded = next(m for m in http.get("/v1/models").json()["models"] if m["name"] == args.model)
            answers = asyncio.run(_ws_answers(url, [big_png, big_jpeg, huge_jpeg, normal]))
            for name, answer in zip(("4096x4096 PNG", "4096x4096 JPEG", "8000x8000 JPEG"), answers, strict=False):
                checks[f"WS {name}"] = answer.get("code"), answer.get("message")
            checks["WS 320x416 JPEG afterwards"] = answers[3].get("type"), answers[3].get("index")
            response = http.post("/v1/jobs", files={"file": ("huge.avi", huge_video.read_bytes())})
            checks["job 8000x8000 video"] = response.status_code, response.json().get("detail")
            response = http.post("/v1/jobs", files={"file": ("late.avi", late_video.read_bytes())})
            job = _wait_job(http, response.json()["id"], 600) if response.status_code == 202 else response.json()
            checks["job with an 8000x8000 third frame"] = response.status_code, job.get("state"), job.get("error")
            health = http.get("/healthz").json()
        # VmHWM is the kernel's high-water mark, but it is updated lazily: a sample can read a little above it
        peak = max(peak_rss_mib(server.pid), float(sampler.summary()["peak"]))  # type: ignore[arg-type]
        after = rss_mib(server.pid)
    expected = {
        "WS 4096x4096 PNG": lambda c: c[0] == "frame_too_large" and "max_frame_pixels" in c[1],
        "WS 4096x4096 JPEG": lambda c: c[0] == "frame_too_large" and "max_frame_pixels" in c[1],
        "WS 8000x8000 JPEG": lambda c: c[0] == "frame_too_large" and "max_frame_side" in c[1],
        "WS 320x416 JPEG afterwards": lambda c: c == ("result", 0),
        "job 8000x8000 video": lambda c: c[0] == 400 and "max_frame_pixels" in c[1],
        "job with an 8000x8000 third frame": lambda c: c[:2] == (202, "failed") and "8000x8000" in c[2],
    }
    answered = {name: expected[name](checks[name]) for name in expected}
    report = {
        "model": args.model,
        "backend": args.backend,
        "runtime": f"{loaded['backend']} {loaded['precision']}",
        "inputs_bytes": {
            "4096x4096 PNG": len(big_png),
            "4096x4096 JPEG": len(big_jpeg),
            "8000x8000 JPEG": len(huge_jpeg),
            "8000x8000 video": huge_video.stat().st_size,
            "video with an 8000x8000 frame": late_video.stat().st_size,
        },
        "checks": {name: {"answer": checks[name], "as_documented": answered[name]} for name in expected},
        "healthz_after": health,
        "rss_mib": {
            "before": round(idle, 1),
            "startup_peak": round(startup_peak, 1),
            "sampled": sampler.summary(),
            "peak": round(peak, 1),
            "after": round(after, 1),
        },
    }
    return report


def budget_from(path: Path, model: str, runtime: str) -> float:
    """The highest peak RSS of ``model`` on ``runtime`` ("openvino fp32") over the points of a ``sizes``
    report, which must include the ``largest`` one: the most any admitted frame was measured to cost
    (usually the ``largest`` point, but a runtime may allocate more for another shape)."""
    points = json.loads(path.read_text())["points"]
    peaks = [p["peak_rss_mib"] for p in points if p["model"] == model and p.get("runtime") == runtime
             and "skipped" not in p]  # fmt: skip
    if not any(p.get("size_name") == LARGEST for p in points if p["model"] == model and p.get("runtime") == runtime):
        raise LookupError(f"{path} has no {LARGEST} point for {model} on {runtime}")
    return float(max(peaks))


def host() -> dict[str, object]:
    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), platform.processor())  # fmt: skip
    return {
        "cpu": cpu,
        "cpus": os.cpu_count(),
        "memory_available_mib": round(available_mib()),
        "load_average_1m": round(os.getloadavg()[0], 2),  # other work on the host
        "python": platform.python_version(),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    sizes = commands.add_parser("sizes", help="peak RSS per model, runtime and frame size")
    sizes.add_argument("--models", default="most-nss,most-net,r2-d4")
    sizes.add_argument("--backends", default="torch,onnxruntime,openvino")
    sizes.add_argument("--sizes", default=f"320x416,480x640,1080x1920,{LARGEST}", help=f"HxW list; {LARGEST!r}: "
                       "the admitted frame with the largest network input")  # fmt: skip
    sizes.add_argument("--frames", type=int, default=2, help="frames streamed per point (the second carries state)")
    sizes.add_argument("--point-timeout", type=float, default=900.0, help="seconds; a slower point is skipped")
    sizes.add_argument("--keep-available-mib", type=float, default=KEEP_AVAILABLE_MIB)
    hostile = commands.add_parser("hostile", help="oversized frames and videos against a server's memory budget")
    hostile.add_argument("--model", default="most-nss")
    hostile.add_argument("--backend", default="auto")
    budget = hostile.add_mutually_exclusive_group(required=True)
    budget.add_argument("--budget-mib", type=float, help="the peak RSS allowed")
    budget.add_argument("--budget-json", type=Path, help=f"a 'sizes' report with a {LARGEST} point: its highest peak")
    for sub in (sizes, hostile):
        sub.add_argument("--json", type=Path, default=None)
    table = commands.add_parser("table", help="one markdown table from 'sizes' reports (by model, runtime, size)")
    table.add_argument("reports", type=Path, nargs="+")
    args = parser.parse_args()
    if args.command == "table":
        points = [p for path in args.reports for p in json.loads(path.read_text())["points"]]
        points.sort(key=lambda p: (p["model"], p["backend"], math.prod(parse_size(p["size"]))))
        print(sizes_markdown(points))
        return 0
    started = time.monotonic()
    report: dict[str, object] = {"host_at_start": host()}
    failed = False
    if args.command == "sizes":
        report.update(run_sizes(args))
    else:
        import tempfile

        with tempfile.TemporaryDirectory(prefix="vident-hostile-") as work:
            report.update(run_hostile(args, Path(work)))
        limit = args.budget_mib
        if limit is None:
            limit = budget_from(args.budget_json, args.model, str(report["runtime"]))
        peak = report["rss_mib"]["peak"]  # type: ignore[index]
        report["budget_mib"] = limit
        report["within_budget"] = peak <= limit
        failed = not report["within_budget"] or not all(c["as_documented"] for c in report["checks"].values())  # type: ignore[union-attr]
    report["host_at_end"] = host()
    report["minutes"] = round((time.monotonic() - started) / 60, 1)
    report["command"] = " ".join(["python -m benchmarks.memory", *sys.argv[1:]])
    print(json.dumps({k: v for k, v in report.items() if k != "markdown"}, indent=1))
    if "markdown" in report:
        print(report["markdown"])
    if args.json:
        args.json.write_text(json.dumps(report, indent=1) + "\n")
    if failed:
        print("FAILED: an answer differs from the documented one or the peak RSS is over the budget", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
