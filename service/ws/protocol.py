"""What ``/v1/stream`` messages may say (docs/protocol.md): control messages, ``config``, ``hello``, codes.

Everything here is pure: it reads a client's text or the server's state and returns a value or raises
:class:`ProtocolError`, whose ``code`` is the machine-readable name in the error message; sockets and
tasks are :mod:`service.ws.endpoint`'s.
"""

from __future__ import annotations

import json
import re
from dataclasses import replace

from service.engine import LoadedModel
from service.session import Session, SessionConfig
from service.settings import Settings

PROTOCOL_VERSION = 1

# WebSocket close codes (RFC 6455 section 7.4; 4000-4999 are ours). docs/protocol.md lists them.
CLOSE_NORMAL = 1000
CLOSE_GOING_AWAY = 1001
CLOSE_POLICY = 1008  # missing or wrong API key, or an Origin not in cors_origins
CLOSE_TOO_BIG = 1009  # message larger than max_message_bytes
CLOSE_INTERNAL = 1011
CLOSE_TRY_LATER = 1013  # max_sessions reached
CLOSE_UNKNOWN_MODEL = 4404
CLOSE_IDLE = 4408  # no message for idle_timeout_s
CLOSE_SEND_TIMEOUT = 4429  # the client did not take a message for send_timeout_s (it stopped reading)
CLOSE_MODEL_FAILED = 4500  # the model could not be loaded

_CONFIG_KEYS = ("output_format", "jpeg_quality", "outputs", "input_format", "width", "height")
# Control messages are a few hundred bytes; these bounds hold before json.loads, whose C parser
# recurses once per nesting level (``[`` x 100000 would end in a RecursionError, not a JSON error).
MAX_CONTROL_BYTES = 65536
MAX_CONTROL_DEPTH = 32
_JSON_STRING = re.compile(r'"(?:[^"\\]|\\.)*"', re.DOTALL)
_NOT_A_BRACKET = re.compile(r"[^\[\]{}]")


class ProtocolError(Exception):
    """A problem with what the client sent; ``code`` is the machine-readable name in the error message."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def parse_control(text: str) -> object:
    """A control message's JSON value, or ProtocolError; size and nesting are bounded before parsing."""
    if len(text) > MAX_CONTROL_BYTES or len(text.encode()) > MAX_CONTROL_BYTES:  # characters <= bytes
        raise ProtocolError("control_too_large", f"control messages are at most {MAX_CONTROL_BYTES} bytes of UTF-8")
    depth = deepest = 0
    for bracket in _NOT_A_BRACKET.sub("", _JSON_STRING.sub("", text)):  # brackets outside strings
        depth += 1 if bracket in "[{" else -1
        deepest = max(deepest, depth)
        if deepest > MAX_CONTROL_DEPTH:
            raise ProtocolError(
                "control_too_large", f"control messages may nest at most {MAX_CONTROL_DEPTH} levels deep"
            )
    try:
        return json.loads(text)
    except ValueError:
        raise ProtocolError("not_json", f"text messages must be JSON control messages; got {text[:40]!r}") from None


def _choice(message: dict[str, object], key: str, choices: tuple[str, ...]) -> str:
    value = message[key]
    if value not in choices:
        raise ProtocolError("bad_config", f"{key} must be one of {list(choices)}, not {value!r}")
    return str(value)


def _integer(message: dict[str, object], key: str, largest: int) -> int:
    value = message[key]
    if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= largest:
        raise ProtocolError("bad_config", f"{key} must be an integer 1..{largest}, not {value!r}")
    return value


def apply_config(
    config: SessionConfig, message: dict[str, object], image_outputs: tuple[str, ...], settings: Settings
) -> SessionConfig:
    """A new SessionConfig with the message's fields applied, or ProtocolError('bad_config', ...)."""
    unknown = sorted(set(message) - {"type", *_CONFIG_KEYS})
    if unknown:
        raise ProtocolError("bad_config", f"unknown config field(s) {unknown}; known: {list(_CONFIG_KEYS)}")
    new = replace(config)
    if "output_format" in message:
        new.image_format = _choice(message, "output_format", ("jpeg", "png"))  # type: ignore[assignment]
    if "jpeg_quality" in message:
        new.jpeg_quality = _integer(message, "jpeg_quality", 100)
    if "outputs" in message:
        outputs = message["outputs"]
        if not isinstance(outputs, list) or any(o not in image_outputs for o in outputs) or "restored" not in outputs:
            raise ProtocolError(
                "bad_config", f"outputs must be a list from {list(image_outputs)} including 'restored', not {outputs!r}"
            )
        new.outputs = tuple(dict.fromkeys(outputs))
    for key in ("width", "height"):
        if key in message:
            setattr(new, key, None if message[key] is None else _integer(message, key, settings.max_frame_side))
    if "input_format" in message:
        new.input_format = _choice(message, "input_format", ("encoded", "rgb24"))  # type: ignore[assignment]
    if new.input_format == "rgb24":
        if new.width is None or new.height is None:
            raise ProtocolError("bad_config", "input_format 'rgb24' needs width and height")
        if new.width * new.height * 3 > settings.max_message_bytes:
            limit = settings.max_message_bytes
            raise ProtocolError("bad_config", f"{new.width}x{new.height} RGB24 frames exceed max_message_bytes {limit}")
        if new.width * new.height > settings.max_frame_pixels:
            limit = settings.max_frame_pixels
            raise ProtocolError("bad_config", f"{new.width}x{new.height} RGB24 frames exceed max_frame_pixels {limit}")
    return new


def hello_message(session: Session, loaded: LoadedModel, settings: Settings) -> dict[str, object]:
    spec = loaded.engine.backend.spec
    return {
        "type": "hello",
        "protocol": PROTOCOL_VERSION,
        "session": session.id,
        "model": session.model,
        "backend": {"name": loaded.info.name, "device": loaded.info.device, "precision": loaded.info.precision},
        "random_weights": loaded.random_weights,
        "image_outputs": [o.name for o in spec.outputs if o.kind == "map"],
        "homography": any(o.kind == "homography" for o in spec.outputs),
        "config": session.config.as_dict(),
        "limits": {
            "max_message_bytes": settings.max_message_bytes,
            "max_frame_side": settings.max_frame_side,
            "max_frame_pixels": settings.max_frame_pixels,
            "idle_timeout_s": settings.idle_timeout_s,
            "send_timeout_s": settings.send_timeout_s,
            "fps_cap": settings.fps_cap,
            "max_sessions": settings.max_sessions,
        },
    }
