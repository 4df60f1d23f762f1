"""Argument types and settings flags shared by several subcommands."""

from __future__ import annotations

import argparse


def frame_size(text: str) -> tuple[int, int]:
    """``HxW`` for a network input: positive multiples of 8 (the networks' size multiple)."""
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"size must look like 320x416, got {text!r}") from None
    if h <= 0 or w <= 0 or h % 8 or w % 8:
        raise argparse.ArgumentTypeError(f"size {text} must be positive multiples of 8")
    return h, w


def add_settings_flags(parser: argparse.ArgumentParser, flags: dict[str, type], env_prefix: str) -> None:
    """One flag per settings field (``max_sessions`` -> ``--max-sessions``, ``idle_timeout_s`` -> ``--idle-timeout``),
    default None so that a flag left out keeps the environment's (``env_prefix`` + NAME) or the default value."""
    for name, kind in flags.items():
        flag = "--" + name.replace("_", "-").removesuffix("-s")
        parser.add_argument(flag, dest=name, type=kind, default=None, help=f"(env {env_prefix}{name.upper()})")


def settings_overrides(args: argparse.Namespace, flags: dict[str, type]) -> dict[str, object]:
    """The settings fields given as flags (see :func:`add_settings_flags`)."""
    return {name: getattr(args, name) for name in flags if getattr(args, name) is not None}


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
        field = ".".join(map(str, error["loc"])) or "settings"
        parts.append(f"{field}: {error['msg'].removeprefix('Value error, ')}")  # pydantic's prefix says nothing
    return "; ".join(parts)
