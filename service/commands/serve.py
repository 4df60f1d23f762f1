"""``vident serve``: the streaming service (HTTP + WebSocket) under uvicorn.

Flags override ``VIDENT_*`` environment variables, which override the defaults in
:class:`service.settings.Settings`.
"""

from __future__ import annotations

import argparse
import logging

# flag -> Settings field; a flag left out keeps the environment's (or the default) value
_FLAGS = {
    "host": str,
    "port": int,
    "model": str,
    "checkpoint": str,
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

    from service.app import create_app
    from service.settings import Settings

    overrides = {name: getattr(args, name) for name in _FLAGS if getattr(args, name) is not None}
    settings = Settings(**overrides)
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
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
    for name, kind in _FLAGS.items():
        flag = "--" + name.replace("_", "-").removesuffix("-s")
        p.add_argument(flag, dest=name, type=kind, default=None, help=f"(env VIDENT_{name.upper()})")
    p.set_defaults(func=run)
