"""``vident worker --broker redis://HOST:6379/0``: runs batch jobs taken from the shared queue (docs/jobs.md).

Flags override ``VIDENT_*`` environment variables: the jobs section's ``VIDENT_JOBS_*``
(``VIDENT_JOBS_DATA_DIR`` must be the folder every API replica and worker mounts) and the runtime's
``VIDENT_BACKEND``, ``VIDENT_DEVICE``, ... Start one worker per GPU; SIGTERM or Ctrl-C stops it
gracefully: running jobs go back to the queue for another worker.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from pathlib import Path

from service.commands.common import (
    add_checkpoint_flag,
    add_settings_flags,
    checkpoint_overrides,
    configure_logging,
    invalid_settings,
    settings_overrides,
)

# flag -> Settings.jobs field; a flag left out keeps the environment's (or the default) value
_JOBS_FLAGS = {
    "broker": str,
    "data_dir": Path,
    "worker_name": str,
    "concurrent_jobs": int,
    "heartbeat_timeout_s": float,
    "max_attempts": int,
}
# flag -> Settings field: the runtime the worker's own engines use
_FLAGS = {
    "backend": str,
    "device": str,
    "precision": str,
    "max_batch": int,
}


def run(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from service.jobs.store import JobsUnavailable
    from service.settings import Settings

    configure_logging(args.log_level)
    try:
        settings = Settings(**settings_overrides(args, _FLAGS), jobs=settings_overrides(args, _JOBS_FLAGS))
        settings = checkpoint_overrides(settings, args.checkpoint)
    except ValidationError as exc:
        print(f"vident worker: {invalid_settings(exc)}", file=sys.stderr)
        return 2
    if not settings.jobs.broker:
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


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("worker", help="run batch jobs from a shared queue (Redis): scale jobs across machines")
    add_settings_flags(p, _JOBS_FLAGS, "VIDENT_JOBS_")
    add_settings_flags(p, _FLAGS, "VIDENT_")
    add_checkpoint_flag(p)
    p.add_argument("--log-level", default="info")
    p.set_defaults(func=run)
