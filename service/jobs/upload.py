"""The ``POST /v1/jobs`` body: a multipart upload streamed to disk, and its option fields.

The body is parsed as it arrives (python-multipart's push parser): the file part goes to disk chunk
by chunk with a size cap and never sits in memory; the other parts are small option fields. The
client's file name is only shown, never used as a path: the stored input is ``input<ext>``.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from python_multipart.multipart import MultipartParseError, MultipartParser, parse_options_header

_SUFFIX = re.compile(r"^\.[a-z0-9]{1,5}$")


class UploadTooLarge(Exception):
    """The file part passed the upload cap (answered with 413)."""


class MultipartUpload:
    """Streams one multipart/form-data body: the ``file`` part goes to disk chunk by chunk, with a size
    cap; the other parts are small option fields kept in memory (each at most 1 KiB)."""

    FIELD_LIMIT = 1024

    def __init__(self, boundary: bytes, target: Path, max_bytes: int) -> None:
        self.target = target
        self.max_bytes = max_bytes
        self.fields: dict[str, str] = {}
        self.filename: str | None = None
        self.file_bytes = 0
        self.complete = False
        self._file: Any = None
        self._header_field = b""
        self._header_value = b""
        self._part_name: str | None = None
        self._part_filename: str | None = None
        self._field_value = bytearray()
        self._parser = MultipartParser(
            boundary,
            {
                "on_part_begin": self._part_begin,
                "on_header_field": lambda d, s, e: setattr(self, "_header_field", self._header_field + d[s:e]),
                "on_header_value": lambda d, s, e: setattr(self, "_header_value", self._header_value + d[s:e]),
                "on_header_end": self._header_end,
                "on_part_data": self._part_data,
                "on_part_end": self._part_end,
                "on_end": lambda: setattr(self, "complete", True),
            },
        )

    def write(self, chunk: bytes) -> None:
        self._parser.write(chunk)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def _part_begin(self) -> None:
        self._part_name = self._part_filename = None
        self._field_value = bytearray()

    def _header_end(self) -> None:
        if self._header_field.lower() == b"content-disposition":
            _, params = parse_options_header(self._header_value)
            self._part_name = params.get(b"name", b"").decode("utf-8", "replace")
            if b"filename" in params:
                self._part_filename = params[b"filename"].decode("utf-8", "replace")
        self._header_field = self._header_value = b""

    def _part_data(self, data: bytes, start: int, end: int) -> None:
        if self._part_name == "file" and self._part_filename is not None:
            if self.filename is not None and self._file is None:
                raise MultipartParseError("send exactly one file part named 'file'")
            if self._file is None:
                self.filename = self._part_filename
                self._file = self.target.open("wb")
            self.file_bytes += end - start
            if self.file_bytes > self.max_bytes:
                raise UploadTooLarge()
            self._file.write(data[start:end])
        else:
            self._field_value += data[start:end]
            if len(self._field_value) > self.FIELD_LIMIT:
                raise MultipartParseError(f"form field {self._part_name!r} is longer than {self.FIELD_LIMIT} bytes")

    def _part_end(self) -> None:
        if self._part_name == "file" and self._part_filename is not None:
            if self._file is None:  # an empty file part
                self.filename = self._part_filename
                self.target.touch()
            self.close()
        elif self._part_name:
            self.fields[self._part_name] = self._field_value.decode("utf-8", "replace")


def parse_options(fields: dict[str, str], default_model: str, frame_limit: int) -> tuple[str, int | None, bool]:
    """(model, max_frames, frames) from the form fields, or ValueError saying which field is wrong."""
    unknown = set(fields) - {"model", "max_frames", "frames"}
    if unknown:
        raise ValueError(f"unknown form field(s): {', '.join(sorted(unknown))}; expected model, max_frames, frames")
    model = fields.get("model", "").strip() or default_model
    max_frames = None
    if fields.get("max_frames", "").strip():
        wanted = f"max_frames must be an integer from 1 to {frame_limit} (this server's limit)"
        try:
            max_frames = int(fields["max_frames"])
        except ValueError:
            raise ValueError(f"{wanted}, got {fields['max_frames'][:40]!r}") from None
        if not 1 <= max_frames <= frame_limit:  # also keeps it within SQLite's 64-bit integers
            raise ValueError(f"{wanted}, got {fields['max_frames'][:40]}")
    frames_text = fields.get("frames", "false").strip().lower()
    if frames_text not in ("true", "false", "1", "0", "yes", "no", ""):
        raise ValueError(f"frames must be true or false, got {fields['frames']!r}")
    return model, max_frames, frames_text in ("true", "1", "yes")


def input_suffix(filename: str) -> str:
    """Keep the extension (it helps FFmpeg guess raw formats) only when it is a plain short one."""
    suffix = Path(filename.replace("\\", "/")).suffix.lower()
    return suffix if _SUFFIX.fullmatch(suffix) else ".bin"
