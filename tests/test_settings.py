"""One settings class for the service, batch jobs and `vident worker`: the environment variable names,
the jobs section, knobs defined once, and the command-line flags that override them."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
from pydantic import ValidationError

from service.commands.common import checkpoint, checkpoint_overrides, frame_size, image_size, invalid_settings
from service.jobs.manager import JobManager
from service.settings import JobsSettings, Settings


def test_jobs_section_reads_the_vident_jobs_variables(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VIDENT_JOBS_DATA_DIR", str(tmp_path / "jobs"))
    monkeypatch.setenv("VIDENT_JOBS_BROKER", "redis://redis:6379/0")
    monkeypatch.setenv("VIDENT_JOBS_MAX_UPLOAD_MB", "0.5")
    monkeypatch.setenv("VIDENT_JOBS_HEARTBEAT_TIMEOUT_S", "3")
    monkeypatch.setenv("VIDENT_JOBS_WORKER_NAME", "w1")
    monkeypatch.setenv("VIDENT_MAX_SESSIONS", "3")  # a top-level name with underscores is not a section
    loaded = Settings(_env_file=None)
    jobs = loaded.jobs
    assert (jobs.data_dir, jobs.broker, jobs.max_upload_mb) == (tmp_path / "jobs", "redis://redis:6379/0", 0.5)
    assert (jobs.heartbeat_timeout_s, jobs.worker_name, loaded.max_sessions) == (3.0, "w1", 3)
    # a flag given as a partial section keeps the rest of the section from the environment
    flagged = Settings(jobs={"broker": "redis://other:6379/0"}, _env_file=None).jobs
    assert (flagged.broker, flagged.data_dir, flagged.worker_name) == ("redis://other:6379/0", tmp_path / "jobs", "w1")


def test_knobs_shared_with_jobs_are_defined_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    shared = {"model", "allowed_models", "checkpoints", "backend", "device", "precision", "max_batch"}
    assert not (shared | {"max_frame_pixels"}) & set(JobsSettings.model_fields)
    monkeypatch.setenv("VIDENT_MODEL", "r2-d4-tiny")
    monkeypatch.setenv("VIDENT_BACKEND", "torch")
    monkeypatch.setenv("VIDENT_MAX_FRAME_PIXELS", "4096")
    monkeypatch.setenv("VIDENT_CHECKPOINTS", json.dumps({"r2-d4-tiny": str(tmp_path / "w.safetensors")}))
    settings = Settings(jobs={"data_dir": tmp_path / "jobs"}, _env_file=None)
    manager = JobManager(settings)  # what the standalone jobs app and `vident worker` run with
    assert manager.settings.model == "r2-d4-tiny" and manager.settings.max_frame_pixels == 4096
    assert manager.settings.checkpoints == {"r2-d4-tiny": tmp_path / "w.safetensors"}
    engines = manager._own_engines
    assert (engines.backend, engines.precision, engines.checkpoints) == ("torch", "auto", settings.checkpoints)


@pytest.mark.parametrize(
    ("old", "new"),
    [("VIDENT_JOBS_BACKEND", "VIDENT_BACKEND"), ("VIDENT_JOBS_DEFAULT_MODEL", "VIDENT_MODEL"),
     ("VIDENT_JOBS_MODELS", "VIDENT_ALLOWED_MODELS"), ("VIDENT_JOBS_ENGINE_MAX_BATCH", "VIDENT_MAX_BATCH")],
)  # fmt: skip
def test_a_retired_jobs_variable_names_its_successor(old: str, new: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(old, '["most-nss"]' if old.endswith("MODELS") else "8" if "BATCH" in old else "torch")
    with pytest.raises(ValidationError) as raised:
        Settings(_env_file=None)
    assert f"{old} is now {new}" in invalid_settings(raised.value)


def test_errors_name_a_jobs_field_as_its_flag(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VIDENT_JOBS_BROKER", "http://127.0.0.1:6379")
    with pytest.raises(ValidationError) as raised:
        Settings(_env_file=None)
    assert invalid_settings(raised.value).startswith("broker: the job broker must be a URL like redis://")
    monkeypatch.setenv("VIDENT_JOBS_BROKER", "")
    monkeypatch.setenv("VIDENT_JOBS_MAX_FRAMES", "0")
    with pytest.raises(ValidationError) as raised:
        Settings(_env_file=None)
    assert invalid_settings(raised.value).startswith("max_frames: ")


def test_checkpoint_flags(tmp_path: Path) -> None:
    assert checkpoint("most-nss=/w/a.safetensors") == ("most-nss", Path("/w/a.safetensors"))
    assert checkpoint("/w/a.safetensors") == (None, Path("/w/a.safetensors"))
    assert checkpoint("runs/lr=3/w.safetensors") == (None, Path("runs/lr=3/w.safetensors"))
    with pytest.raises(argparse.ArgumentTypeError):
        checkpoint("most-nss=")
    settings = Settings(model="r2-d4-tiny", checkpoints={"most-nss": tmp_path / "env.safetensors"}, _env_file=None)
    flagged = checkpoint_overrides(settings, [(None, tmp_path / "a"), ("most-net", tmp_path / "b")])
    assert flagged.checkpoints == {
        "most-nss": tmp_path / "env.safetensors", "r2-d4-tiny": tmp_path / "a", "most-net": tmp_path / "b"
    }  # fmt: skip


def test_size_flags_share_the_syntax_and_differ_in_range() -> None:
    """Network sizes must be multiples of 8; rendered data only 16x16 or more (the stream loop pads)."""
    assert frame_size("320x416") == image_size("320X416") == (320, 416)
    assert image_size("270x481") == (270, 481)
    for bad in ("320x410", "0x16", "-8x16"):
        with pytest.raises(argparse.ArgumentTypeError, match="multiples of 8"):
            frame_size(bad)
    with pytest.raises(argparse.ArgumentTypeError, match="16x16"):
        image_size("15x64")
    for parse in (frame_size, image_size):
        for bad in ("320", "320x", "axb", "1x2x3"):
            with pytest.raises(argparse.ArgumentTypeError, match="must look like"):
                parse(bad)


def test_the_retired_single_checkpoint_variable_names_its_replacement(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VIDENT_CHECKPOINT", "/w/most-nss.safetensors")
    with pytest.raises(ValidationError, match="VIDENT_CHECKPOINTS"):
        Settings(_env_file=None)
