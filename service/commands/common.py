"""Argument types and settings flags shared by several subcommands."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from service.settings import Settings

_SECTIONS = ("jobs",)  # nested sections of service.settings.Settings


def _pair(text: str) -> tuple[int, int]:
    """``HxW`` as two ints; the callers own the range."""
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"size must look like 320x416, got {text!r}") from None
    return h, w


def frame_size(text: str) -> tuple[int, int]:
    """``HxW`` for a network input: positive multiples of 8 (the networks' size multiple)."""
    h, w = _pair(text)
    if h <= 0 or w <= 0 or h % 8 or w % 8:
        raise argparse.ArgumentTypeError(f"size {text} must be positive multiples of 8")
    return h, w


def image_size(text: str) -> tuple[int, int]:
    """``HxW`` for rendered data: no multiple of 8 (the pipeline pads network inputs), and the
    renderer's own 16x16 minimum (``SynthConfig``), checked here too for an argparse error."""
    h, w = _pair(text)
    if h < 16 or w < 16:
        raise argparse.ArgumentTypeError(f"size {text} is too small (16x16 at least)")
    return h, w


def prefixes(text: str) -> tuple[str, ...]:
    """A comma-separated list of module prefixes, e.g. ``--train-only decoder.1,restoration_heads.1``."""
    return tuple(p for p in text.split(",") if p)


def _number(text: str) -> float:
    """``text`` as a float, NaN where it is none, so one range check refuses both."""
    try:
        return float(text)
    except ValueError:
        return float("nan")


def share(text: str) -> float:
    """A probability in [0, 1], e.g. ``--recipe-share 0.75``."""
    value = _number(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a share within [0, 1], got {text!r}")
    return value


def weight(text: str) -> float:
    """A loss weight >= 0, e.g. ``--colour-loss 1``."""
    value = _number(text)
    if not value >= 0.0:
        raise argparse.ArgumentTypeError(f"expected a weight >= 0, got {text!r}")
    return value


def add_settings_flags(parser: argparse.ArgumentParser, flags: dict[str, type], env_prefix: str) -> None:
    """One flag per settings field (``max_sessions`` -> ``--max-sessions``, ``idle_timeout_s`` -> ``--idle-timeout``),
    default None so that a flag left out keeps the environment's (``env_prefix`` + NAME) or the default value."""
    for name, kind in flags.items():
        flag = "--" + name.replace("_", "-").removesuffix("-s")
        parser.add_argument(flag, dest=name, type=kind, default=None, help=f"(env {env_prefix}{name.upper()})")


def settings_overrides(args: argparse.Namespace, flags: dict[str, type]) -> dict[str, object]:
    """The settings fields given as flags (see :func:`add_settings_flags`)."""
    return {name: getattr(args, name) for name in flags if getattr(args, name) is not None}


def add_checkpoint_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--checkpoint", action="append", type=checkpoint, default=[], metavar="[MODEL=]PATH",
        help="weights for MODEL, or for the default model without MODEL= (repeatable; env VIDENT_CHECKPOINTS as "
        "JSON: {\"most-nss\": \"/w/most-nss.safetensors\"})",
    )  # fmt: skip


def checkpoint(text: str) -> tuple[str | None, Path]:
    """``MODEL=PATH`` or ``PATH`` (weights for the default model, which is only known once settings are read).
    A name holds no ``/``, so ``/runs/lr=3/w.safetensors`` is a path, not a model."""
    model, sep, path = text.partition("=")
    if not sep or "/" in model or "\\" in model:
        return None, Path(text)
    if not model or not path:
        raise argparse.ArgumentTypeError(f"expected MODEL=PATH or PATH, got {text!r}")
    return model, Path(path)


def checkpoint_overrides(settings: Settings, checkpoints: list[tuple[str | None, Path]]) -> Settings:
    """``settings`` with the ``--checkpoint`` flags added to ``checkpoints`` (a flag wins over the environment)."""
    if not checkpoints:
        return settings
    given = {model or settings.model: path for model, path in checkpoints}
    return settings.model_copy(update={"checkpoints": {**settings.checkpoints, **given}})


def configure_logging(level: str) -> None:
    """The log format of the long-running commands (``serve``, ``worker``)."""
    import logging

    logging.basicConfig(level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def invalid_settings(exc: Exception) -> str:
    """A pydantic ``ValidationError`` in one line a user can act on: ``field: what is wrong`` for each field."""
    errors = getattr(exc, "errors", None)
    if errors is None:
        return str(exc)
    parts = []
    for error in errors():
        loc = error["loc"]
        if len(loc) > 1 and loc[0] in _SECTIONS:
            loc = loc[1:]  # a section's fields are named as their flags are: ``broker``, not ``jobs.broker``
        field = ".".join(map(str, loc)) or "settings"
        parts.append(f"{field}: {error['msg'].removeprefix('Value error, ')}")  # pydantic's prefix says nothing
    return "; ".join(parts)
