"""Frames in and out of ``/v1/stream``: binary messages -> RGB arrays, results -> JPEG/PNG parts.

Decoding checks sizes from the image header before any pixel is decoded, because a few KB of PNG or
JPEG can declare gigabytes of pixels; what is wrong with a frame is a :class:`ProtocolError`, so the
session answers with an error and goes on. These functions run on worker threads, never on the
event loop.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import cv2
import numpy as np
from PIL import Image, UnidentifiedImageError

from service.session import ClientResult, SessionConfig, resize
from service.ws.protocol import ProtocolError

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
JPEG_SIGNATURE = b"\xff\xd8\xff"
_PIL_MODES = ("RGB", "RGBA", "L", "LA", "P", "1", "CMYK", "YCbCr")  # what converts to RGB without guessing


def check_frame_size(width: int, height: int, max_side: int, max_pixels: int) -> None:
    """ProtocolError('frame_too_large') for a size over the limits; called with header sizes, before
    any pixel is decoded, because a few KB of PNG or JPEG can declare gigabytes of pixels."""
    if width > max_side or height > max_side:
        raise ProtocolError("frame_too_large", f"{width}x{height} exceeds max_frame_side {max_side}")
    if width * height > max_pixels:
        raise ProtocolError(
            "frame_too_large", f"{width}x{height} = {width * height} pixels exceeds max_frame_pixels {max_pixels}"
        )


def decode_frame(data: bytes, config: SessionConfig, max_side: int, max_pixels: int) -> np.ndarray:
    """A binary frame message -> uint8 (h, w, 3) RGB, or ProtocolError naming what is wrong."""
    if config.input_format == "rgb24":
        assert config.width is not None and config.height is not None
        expected = config.width * config.height * 3
        if len(data) != expected:
            raise ProtocolError(
                "bad_raw_size",
                f"raw RGB24 frame must be {config.width}x{config.height}x3 = {expected} bytes, got {len(data)}",
            )
        return np.frombuffer(data, np.uint8).reshape(config.height, config.width, 3).copy()
    if not (data.startswith(PNG_SIGNATURE) or data.startswith(JPEG_SIGNATURE)):
        raise ProtocolError("bad_image", f"not a JPEG or PNG image (starts with {data[:8].hex() or 'nothing'})")
    kind = "PNG" if data.startswith(PNG_SIGNATURE) else "JPEG"
    try:
        with Image.open(io.BytesIO(data), formats=("JPEG", "PNG")) as image:  # reads the header only
            check_frame_size(image.width, image.height, max_side, max_pixels)
            if image.mode not in _PIL_MODES:
                raise ProtocolError("bad_image", f"unsupported {image.format} pixel mode {image.mode}; send 8-bit RGB")
            if kind == "PNG":
                return _decode_png(data)
            image.load()  # decodes; a truncated or corrupt file raises here
            rgb = image if image.mode == "RGB" else image.convert("RGB")
            return np.asarray(rgb, dtype=np.uint8).copy()
    except ProtocolError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:  # a header beyond Pillow's limit
        raise ProtocolError("frame_too_large", f"{exc}; max_frame_pixels is {max_pixels}") from None
    except (OSError, SyntaxError, ValueError, UnidentifiedImageError) as exc:
        raise ProtocolError("bad_image", f"truncated or corrupt {kind}: {exc}") from None


def _decode_png(data: bytes) -> np.ndarray:
    """PNG pixels through libpng (OpenCV), which refuses image data that ends before the last row.
    Pillow's PNG decoder accepts a complete file whose compressed data stops early and leaves the
    missing rows black, so a frame cut short by a client would come back partly black."""
    flags = cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION  # palette, grey, alpha -> BGR, as sent
    pixels = cv2.imdecode(np.frombuffer(data, np.uint8), flags)
    if pixels is None:
        raise ProtocolError("bad_image", "truncated or corrupt PNG: its image data is incomplete or damaged")
    return cv2.cvtColor(pixels, cv2.COLOR_BGR2RGB)


def encode_image(image: np.ndarray, image_format: str, quality: int) -> bytes:
    """uint8 RGB (h, w, 3) or grey (h, w) -> JPEG or PNG bytes (PNG: fast, lossless)."""
    pixels = image if image.ndim == 2 else cv2.cvtColor(image, cv2.COLOR_RGB2BGR)
    if image_format == "jpeg":
        ok, buf = cv2.imencode(".jpg", pixels, [cv2.IMWRITE_JPEG_QUALITY, quality])
    else:
        ok, buf = cv2.imencode(".png", pixels, [cv2.IMWRITE_PNG_COMPRESSION, 1])
    if not ok:
        raise RuntimeError(f"could not encode a {image.shape} image as {image_format}")
    return buf.tobytes()


@dataclass
class EncodedPart:
    name: str
    format: str
    data: bytes
    height: int
    width: int
    channels: int

    def describe(self) -> dict[str, object]:
        return {
            "name": self.name,
            "format": self.format,
            "bytes": len(self.data),
            "width": self.width,
            "height": self.height,
            "channels": self.channels,
        }


def encode_result(result: ClientResult, config: SessionConfig) -> list[EncodedPart]:
    """The images a client asked for, at the size it sent, in ``config.outputs`` order (masks always PNG)."""
    parts = []
    height, width = result.size
    for name in config.outputs:
        image = result.images.get(name)
        if image is None:
            continue
        image = resize(image, height, width)
        image_format = "png" if image.ndim == 2 else config.image_format
        data = encode_image(image, image_format, config.jpeg_quality)
        parts.append(EncodedPart(name, image_format, data, height, width, 1 if image.ndim == 2 else 3))
    return parts
