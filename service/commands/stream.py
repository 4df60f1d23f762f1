"""``vident stream SOURCE --url ws://HOST:PORT/v1/stream --out DIR``: a client for the streaming service.

SOURCE is a video file, a folder of PNG/JPEG frames or a camera index (0, 1, ...). Results go to
DIR: restored/, teeth_mask/ (models with masks), homographies.json and summary.json. When the server goes
away mid-stream (behind a load balancer: its replica died), the client reconnects with back-off, starts a new
stream on the replica it reaches, and reports the frames lost with the old one (``lost``, ``reconnects``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path


def run(args: argparse.Namespace) -> int:
    from service.client import Reconnect, ServerError, open_source, stream_source

    try:
        source = open_source(args.source, args.fps)
    except (FileNotFoundError, ValueError) as exc:  # ValueError: service.video.VideoError, said in words
        print(f"vident stream: {exc}", file=sys.stderr)
        return 2
    print(f"streaming {source.description} to {args.url} ({'realtime' if args.realtime else 'fast'})", file=sys.stderr)
    try:
        summary = asyncio.run(
            stream_source(
                source,
                args.url,
                args.out,
                realtime=args.realtime,
                max_frames=args.max_frames,
                frame_format=args.send_format,
                model=args.model,
                api_key=args.api_key,
                output_format=args.format,
                jpeg_quality=args.quality,
                reconnect=_reconnect(args.reconnect, Reconnect),
            )
        )
    except (OSError, ServerError) as exc:
        print(f"vident stream: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(summary.as_dict()))
    return 0 if not summary.errors else 1


def _reconnect(attempts: int | None, policy: type) -> object:
    if attempts is None:
        return policy()
    return policy(attempts=attempts) if attempts > 0 else None


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("stream", help="stream a video, frame folder or camera to a vident server")
    p.add_argument("source", help="video file, folder of PNG/JPEG frames, or camera index")
    p.add_argument("--url", default="ws://127.0.0.1:8000/v1/stream", help="server WebSocket URL")
    p.add_argument("--out", type=Path, default=None, help="folder for restored frames, masks, homographies.json")
    p.add_argument("--model", default=None, help="model name (default: the server's)")
    p.add_argument("--api-key", default=None)
    pace = p.add_mutually_exclusive_group()
    pace.add_argument("--realtime", action="store_true", help="send at the source frame rate (server drops stale)")
    pace.add_argument("--fast", action="store_true", help="as fast as the server answers, no drops (default)")
    p.add_argument("--fps", type=float, default=None, help="source frame rate (default: from the file, or 25)")
    p.add_argument("--max-frames", type=int, default=None)
    p.add_argument("--format", choices=("jpeg", "png"), default="png", help="restored frame format (default png)")
    p.add_argument("--quality", type=int, default=90, help="JPEG quality of restored frames")
    p.add_argument("--send-format", choices=("jpeg", "png"), default="jpeg", help="how decoded frames are sent")
    p.add_argument(
        "--reconnect", type=int, default=None, metavar="N",
        help="when the server goes away, connect again up to N times in a row with back-off "
        "(default: service.client.Reconnect's; 0: stop at the first break)",
    )  # fmt: skip
    p.set_defaults(func=run)
