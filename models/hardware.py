"""What this machine's CPU is and can do, read once from the OS (Linux /proc/cpuinfo)."""

from __future__ import annotations

import platform
from functools import cache
from pathlib import Path


@cache
def _cpuinfo() -> str:
    try:
        return Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""


def cpu_model() -> str:
    for line in _cpuinfo().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def cpu_has_bf16() -> bool:
    """Native bf16 arithmetic: AMX or AVX512-BF16 (the flags bf16 autocast and OpenVINO bf16 pay off with)."""
    flags = _cpuinfo()
    return any(flag in flags for flag in (" amx_bf16", " avx512_bf16"))
