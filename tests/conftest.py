"""Shared fixtures: deterministic torch, small threads so parallel test runs do not thrash 2 cores."""

from __future__ import annotations

import sys
import threading
import traceback
from collections.abc import Iterator

import numpy as np
import pytest
import torch

torch.set_num_threads(2)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    """A failed test's report lists the process's threads and where each one is: a stalled server
    (a result that never came, an idle timeout instead of an answer) shows what held it."""
    report = yield
    if report.failed and call.when == "call":
        frames = sys._current_frames()
        lines = []
        for thread in threading.enumerate():
            frame = frames.get(thread.ident or -1)
            stack = "".join(traceback.format_stack(frame, limit=6)) if frame is not None else "  (no frame)\n"
            lines.append(f"{thread.name} (daemon={thread.daemon}):\n{stack}")
        report.sections.append(("threads at failure", f"{len(lines)} threads\n" + "\n".join(lines)))
    return report


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)
    np.random.seed(0)


@pytest.fixture(scope="module", autouse=True)
def _jobs_data_in_tmp(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Apps built in tests mount batch jobs too (service.jobs): each test module gets its own jobs
    folder (a folder is locked by the server using it) instead of the user's data folder."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("VIDENT_JOBS_DATA_DIR", str(tmp_path_factory.mktemp("jobs")))
        patch.setenv("VIDENT_WARMUP_SIZE", "64x96")  # the start-up warm-up runs, at a size tests can afford
        yield


@pytest.fixture(autouse=True)
def _jobs_data_per_test(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """An app a test builds gets a jobs folder of its own: a module-scoped app keeps the module's folder
    locked, and a second app on it would start with batch jobs disabled ("in use by another server")."""
    monkeypatch.setenv("VIDENT_JOBS_DATA_DIR", str(tmp_path_factory.mktemp("jobs")))
