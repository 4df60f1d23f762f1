"""A real server process killed mid-job: on restart the job runs again from the beginning and its files
are those of an uninterrupted run."""

from __future__ import annotations

import io
import json
import os
import socket
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import httpx
import numpy as np
from PIL import Image
from test_process import nontrivial_model, reference
from test_video import moving_frames, write_clip

from models.checkpoints import load_model, save_checkpoint
from service.backends.torch import TorchBackend
from service.video import read_video_frames

MODEL = "most-nss-tiny"
FRAMES = 100


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(data_dir: Path, weights: Path) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    env = {
        **os.environ,
        "VIDENT_JOBS_DATA_DIR": str(data_dir),
        "VIDENT_CHECKPOINTS": json.dumps({MODEL: str(weights)}),
        "VIDENT_MODEL": MODEL,
        "VIDENT_BACKEND": "torch",
        "OMP_NUM_THREADS": "2",  # the test's own reference runs with 2 torch threads too
    }
    command = [sys.executable, "-m", "uvicorn", "--factory", "service.jobs.routes:create_standalone_app"]
    process = subprocess.Popen(
        [*command, "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 240  # generous: CI machines can be slow to import torch
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"server exited: {process.stderr.read().decode()[-2000:]}")  # type: ignore[union-attr]
        try:
            if httpx.get(f"{url}/v1/jobs", timeout=1).status_code == 200:
                return process, url
        except httpx.TransportError:
            time.sleep(0.1)
    process.kill()
    raise AssertionError("server did not start within 240 s")


def test_job_survives_a_server_crash(tmp_path: Path) -> None:
    weights = save_checkpoint(nontrivial_model(MODEL), tmp_path / "weights.safetensors")
    clip = write_clip(tmp_path / "clip.mp4", moving_frames(FRAMES))
    data_dir = tmp_path / "data"
    server, url = start_server(data_dir, weights)
    try:
        files = {"file": ("clip.mp4", clip.read_bytes())}
        job_id = httpx.post(f"{url}/v1/jobs", files=files, data={"frames": "true"}, timeout=30).json()["id"]
        deadline = time.monotonic() + 240  # generous: CI machines can be slow to import torch
        while time.monotonic() < deadline:
            job = httpx.get(f"{url}/v1/jobs/{job_id}", timeout=5).json()
            if job["state"] == "running" and job["frames_done"] > 0:
                break
            time.sleep(0.02)
        server.kill()  # SIGKILL: no shutdown code runs, as in a crash or power loss
        server.wait(10)
        assert job["state"] == "running" and 0 < job["frames_done"] < FRAMES, job
    finally:
        server.kill()
    server, url = start_server(data_dir, weights)
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            job = httpx.get(f"{url}/v1/jobs/{job_id}", timeout=5).json()
            if job["state"] in ("done", "failed"):
                break
            time.sleep(0.1)
        assert (job["state"], job["restarted"], job["attempts"]) == ("done", True, 2), job
        assert (job["frames_done"], job["frames_total"]) == (FRAMES, FRAMES)
        restored = httpx.get(f"{url}/v1/jobs/{job_id}/files/restored.mp4", timeout=30).content
        homographies = httpx.get(f"{url}/v1/jobs/{job_id}/files/homographies.json", timeout=30).json()
        archive = zipfile.ZipFile(io.BytesIO(httpx.get(f"{url}/v1/jobs/{job_id}/files/frames.zip", timeout=30).content))
    finally:
        server.terminate()
        server.wait(30)
    (tmp_path / "restored.mp4").write_bytes(restored)
    info, frames = read_video_frames(tmp_path / "restored.mp4")
    in_info, decoded = read_video_frames(clip)
    assert (len(frames), info.fps, info.duration_s) == (FRAMES, in_info.fps, in_info.duration_s)
    expected = reference(TorchBackend(load_model(MODEL, weights)[0]), [f.rgb for f in decoded])
    np.testing.assert_allclose(homographies["homographies"], [r.homography for r in expected], atol=1e-9)
    assert len([n for n in archive.namelist() if n.startswith("restored/")]) == FRAMES
    for i in (0, FRAMES // 2, FRAMES - 1):
        png = np.asarray(Image.open(io.BytesIO(archive.read(f"restored/{i:06d}.png"))))
        assert np.array_equal(png, expected[i].restored), f"frame {i}"
