"""The demo page end to end in headless Chromium (Debian's chromium + chromedriver, driven by Selenium).

A real uvicorn server with a tiny model; the page loads, streams the shipped sample clip, and shows
results. Without Chromium the test skips, except in CI (CI=true), where it must run.
"""

from __future__ import annotations

import io
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from fastapi import FastAPI
from PIL import Image
from real_servers import one_torch_thread  # noqa: F401  (autouse: the page times its frames)

from models.layers import warp_by_homography
from service.app import create_app, serve_in_thread
from service.settings import Settings

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
TINY = "most-nss-tiny"


def _browser_missing() -> str | None:
    missing = [p for p in (CHROMIUM, CHROMEDRIVER) if not os.access(p, os.X_OK)]
    try:
        import selenium  # noqa: F401
    except ImportError:
        missing.append("the selenium package")
    return ", ".join(missing) or None


@pytest.fixture(scope="module")
def driver(tmp_path_factory: pytest.TempPathFactory) -> Iterator[object]:
    missing = _browser_missing()
    if missing:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"CI must run the browser test, but {missing} is missing (.ci/run apt-installs chromium)")
        pytest.skip(f"headless browser test needs {missing} (apt-get install chromium chromium-driver)")
    os.environ.setdefault("SE_OFFLINE", "true")  # Selenium Manager must never try to download a driver
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    profile = tmp_path_factory.mktemp("chromium-profile")
    for flag in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-dev-shm-usage",
        "--use-fake-device-for-media-stream",  # a synthetic webcam, for the webcam source
        "--use-fake-ui-for-media-stream",
        "--window-size=1400,1100",
        f"--user-data-dir={profile}",
    ):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    browser = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        yield browser
    finally:
        browser.quit()


def _wait(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


@pytest.fixture(scope="module")
def server() -> Iterator[tuple[FastAPI, str]]:
    app = create_app(Settings(model=TINY, backend="torch", _env_file=None))
    with serve_in_thread(app) as url:
        yield app, url


def test_demo_page_streams_the_sample_clip(driver, server: tuple[FastAPI, str], tmp_path: Path) -> None:
    from selenium.webdriver.common.by import By

    app, url = server
    driver.get(url + "/")
    text = lambda element_id: driver.find_element(By.ID, element_id).text  # noqa: E731
    _wait(lambda: text("status") == "ready", 30, "the page to initialise")
    assert "RANDOM weights" in text("warning")
    assert TINY in text("server")
    driver.find_element(By.ID, "start").click()
    _wait(lambda: int(text("processed")) >= 8, 90, f"8 processed frames (status: {text('status')!r})")
    assert text("errors") == "0", driver.find_element(By.ID, "log").text
    assert float(text("fps")) > 0 and float(text("latency")) > 0
    views = driver.execute_script(
        """return ['input', 'restored', 'overlay', 'warped'].map((id) => {
             const c = document.getElementById(id);
             const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
             let sum = 0, sq = 0, n = 0;
             for (let k = 0; k < d.length; k += 4) { const v = d[k + 1]; sum += v; sq += v * v; n++; }
             const mean = sum / n;
             return [id, c.width, c.height, mean, Math.sqrt(sq / n - mean * mean)];
           });"""
    )
    for name, width, height, _mean, spread in views:
        assert (width, height) == (320, 240), name
        assert spread > 2, f"{name} canvas is blank"
    screenshot = driver.get_screenshot_as_png()
    (tmp_path / "demo.png").write_bytes(screenshot)
    if os.environ.get("VIDENT_SCREENSHOT"):
        Path(os.environ["VIDENT_SCREENSHOT"]).write_bytes(screenshot)
    shot = np.asarray(Image.open(io.BytesIO(screenshot)).convert("RGB"), np.float64)
    assert shot.std() > 20, "the screenshot is blank"
    driver.find_element(By.ID, "stop").click()
    _wait(lambda: app.state.sessions.count == 0, 20, "the session to close after Stop")
    # The page polls /readyz while the server warms its model up; those 503s are the protocol, not errors.
    severe = [e for e in driver.get_log("browser") if e["level"] == "SEVERE" and "/readyz" not in e["message"]]
    assert not severe, severe


def test_page_warp_matches_the_python_warp(driver, server: tuple[FastAPI, str]) -> None:
    """The page's canvas warp is the exact projective warp of models.layers (inverse map, bilinear, zeros)."""
    if not driver.current_url.startswith(server[1]):
        driver.get(server[1] + "/")
    rng = np.random.default_rng(3)
    height, width = 24, 32
    image = rng.integers(0, 256, (height, width, 3)).astype(np.uint8)
    homography = np.array([[1.05, 0.08, -2.0], [-0.06, 0.97, 1.5], [0.002, -0.001, 1.0]])
    rgba = np.concatenate([image, np.full((height, width, 1), 255, np.uint8)], axis=2)
    warped = driver.execute_script(
        """const [data, w, h, H] = arguments;
           const src = new ImageData(new Uint8ClampedArray(data), w, h);
           return Array.from(window.vident.warpHomography(src, H, w, h).data);""",
        rgba.reshape(-1).tolist(),
        width,
        height,
        homography.tolist(),
    )
    page = np.array(warped, np.float64).reshape(height, width, 4)[..., :3]
    tensor = torch.from_numpy(image.transpose(2, 0, 1)[None].astype(np.float64))
    expected = warp_by_homography(tensor, torch.from_numpy(homography)[None])[0].numpy().transpose(1, 2, 0)
    assert np.abs(page - expected).max() <= 0.5 + 1e-3  # rounded bytes vs the float32 reference
    assert np.abs(expected - image).mean() > 10  # the warp really moved things


def test_webcam_source_streams(driver, server: tuple[FastAPI, str]) -> None:
    """The webcam path (video element -> canvas -> JPEG) with Chromium's synthetic camera."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.select import Select

    app, url = server
    driver.get(url + "/")
    text = lambda element_id: driver.find_element(By.ID, element_id).text  # noqa: E731
    _wait(lambda: text("status") == "ready", 30, "the page to initialise")
    Select(driver.find_element(By.ID, "source")).select_by_value("webcam")
    driver.find_element(By.ID, "start").click()
    _wait(lambda: int(text("processed")) >= 3, 60, f"3 processed webcam frames (status: {text('status')!r})")
    assert text("errors") == "0", driver.find_element(By.ID, "log").text
    width, height = driver.execute_script("const c = document.getElementById('restored'); return [c.width, c.height];")
    assert width == 320 and 200 <= height <= 320  # scaled to the chosen width, camera aspect kept
    driver.find_element(By.ID, "stop").click()
    _wait(lambda: app.state.sessions.count == 0, 20, "the session to close after Stop")


def test_local_video_file_source_streams(driver, server: tuple[FastAPI, str], tmp_path: Path) -> None:
    """The local-file path: a VP8 WebM picked in the file input plays in a video element and streams."""
    import av
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.select import Select

    from benchmarks.make_sample import synthetic_clip

    video = tmp_path / "clip.webm"
    with av.open(str(video), "w") as container:
        stream = container.add_stream("libvpx", rate=10)
        stream.width, stream.height, stream.pix_fmt = 160, 120, "yuv420p"
        for frame in synthetic_clip(20, 120, 160, seed=4):
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())
    app, url = server
    driver.get(url + "/")
    text = lambda element_id: driver.find_element(By.ID, element_id).text  # noqa: E731
    _wait(lambda: text("status") == "ready", 30, "the page to initialise")
    Select(driver.find_element(By.ID, "source")).select_by_value("file")
    driver.find_element(By.ID, "file").send_keys(str(video))
    driver.find_element(By.ID, "start").click()
    _wait(lambda: int(text("processed")) >= 3, 60, f"3 processed file frames (status: {text('status')!r})")
    assert text("errors") == "0", driver.find_element(By.ID, "log").text
    size = driver.execute_script("const c = document.getElementById('restored'); return [c.width, c.height];")
    assert size == [160, 120]  # smaller than the chosen width: sent at its own size
    driver.find_element(By.ID, "stop").click()
    _wait(lambda: app.state.sessions.count == 0, 20, "the session to close after Stop")
