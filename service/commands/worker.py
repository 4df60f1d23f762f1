"""``vident worker --broker redis://HOST:6379/0``: runs batch jobs taken from the shared queue (docs/jobs.md).

Flags override ``VIDENT_JOBS_*`` environment variables (``VIDENT_JOBS_DATA_DIR`` must be the folder every API
replica and worker mounts). Start one worker per GPU; SIGTERM or Ctrl-C stops it gracefully: running jobs go
back to the queue for another worker.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from pathlib import Path

from service.commands.common import add_settings_flags, configure_logging, invalid_settings, settings_overrides

# flag -> JobSettings field; a flag left out keeps the environment's (or the default) value
_FLAGS = {
    "broker": str,
    "data_dir": Path,
    "worker_name": str,
    "concurrent_jobs": int,
    "backend": str,
    "device": str,
    "precision": str,
    "heartbeat_timeout_s": float,
    "max_attempts": int,
}


def run(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from service.jobs import JobSettings, JobsUnavailable

    configure_logging(args.log_level)
    overrides = settings_overrides(args, _FLAGS)
    if args.checkpoint:
        overrides["checkpoints"] = dict(args.checkpoint)
    try:
        settings = JobSettings(**overrides)
    except ValidationError as exc:
        print(f"vident worker: {invalid_settings(exc)}", file=sys.stderr)
        return 2
    if not settings.broker:
        print("vident worker: give the queue's URL with --broker or VIDENT_JOBS_BROKER", file=sys.stderr)
        return 2
    from service.jobs_queue import JobWorker

    try:
        worker = JobWorker(settings)
        worker.start()
    except JobsUnavailable as exc:  # Redis down or not there: say so and stop, a supervisor restarts us
        print(f"vident worker: {exc}", file=sys.stderr)
        return 1
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    print(f"vident worker {worker.name}: jobs from the queue, files in {worker.root}", flush=True)
    stop.wait()
    worker.stop()
    return 0


def _checkpoint(text: str) -> tuple[str, Path]:
    model, sep, path = text.partition("=")
    if not sep or not model or not path:
        raise argparse.ArgumentTypeError(f"expected MODEL=PATH, got {text!r}")
    return model, Path(path)


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("worker", help="run batch jobs from a shared queue (Redis): scale jobs across machines")
    add_settings_flags(p, _FLAGS, "VIDENT_JOBS_")
    p.add_argument(
        "--checkpoint", action="append", type=_checkpoint, default=[], metavar="MODEL=PATH",
        help="weights for a model (repeatable; env VIDENT_JOBS_CHECKPOINTS as JSON)",
    )  # fmt: skip
    p.add_argument("--log-level", default="info")
    p.set_defaults(func=run)
