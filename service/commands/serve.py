"""``vident serve``: the streaming service (HTTP + WebSocket) under uvicorn.

Flags override ``VIDENT_*`` environment variables, which override the defaults in
:class:`service.settings.Settings`.
"""

from __future__ import annotations

import argparse
import sys

from service.commands.common import (
    add_checkpoint_flag,
    add_settings_flags,
    checkpoint_overrides,
    configure_logging,
    invalid_settings,
    settings_overrides,
)

# flag -> Settings field; a flag left out keeps the environment's (or the default) value
_FLAGS = {
    "host": str,
    "port": int,
    "model": str,
    "backend": str,
    "device": str,
    "precision": str,
    "max_sessions": int,
    "max_batch": int,
    "warmup_size": str,
    "max_frame_pixels": int,
    "idle_timeout_s": float,
    "send_timeout_s": float,
    "fps_cap": float,
    "api_key": str,
    "log_level": str,
}


def run(args: argparse.Namespace) -> int:
    import uvicorn
    from pydantic import ValidationError

    from service.app import create_app
    from service.settings import Settings

    # Every VIDENT_* variable, VIDENT_JOBS_* included, is read here, so that a wrong value (a broker URL that
    # is not one) stops the command with its reason before anything loads; --jobs-broker sends batch jobs to
    # the shared queue (docs/jobs.md).
    try:
        settings = Settings(
            **settings_overrides(args, _FLAGS), **({"jobs": {"broker": args.jobs_broker}} if args.jobs_broker else {})
        )
        settings = checkpoint_overrides(settings, args.checkpoint)
    except ValidationError as exc:
        print(f"vident serve: {invalid_settings(exc)}", file=sys.stderr)
        return 2
    configure_logging(settings.log_level)
    app = create_app(settings)
    shown = "127.0.0.1" if settings.host in ("0.0.0.0", "::") else settings.host
    print(
        f"vident: model {settings.model} ({settings.backend}, {settings.device})\n"
        f"  demo page  http://{shown}:{settings.port}/\n"
        f"  WebSocket  ws://{shown}:{settings.port}/v1/stream   API docs http://{shown}:{settings.port}/docs",
        flush=True,
    )
    # uvicorn's own frame limit sits just above ours, so the app answers oversize frames with a JSON error first.
    uvicorn.run(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        ws_max_size=settings.max_message_bytes + 65536,
    )
    return 0


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("serve", help="run the streaming service: browser demo at /, WebSocket /v1/stream")
    add_settings_flags(p, _FLAGS, "VIDENT_")
    add_checkpoint_flag(p)
    p.add_argument(
        "--jobs-broker", default=None, metavar="URL",
        help="redis://HOST:6379/0: enqueue batch jobs for `vident worker` processes (env VIDENT_JOBS_BROKER)",
    )  # fmt: skip
    p.set_defaults(func=run)
