"""Argument types shared by several subcommands."""

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
