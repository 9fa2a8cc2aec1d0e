"""Raw frame layouts on the pipes to and from ffmpeg (`-f rawvideo`)."""

from __future__ import annotations

PIX_FMTS = ("bgr24", "yuv420p")
"""The raw pixel formats the service decodes to and encodes from."""


def yuv420p_frame_bytes(width: int, height: int) -> int:
    """Bytes of one yuv420p frame: the Y plane, then U and V planes of ceil(width / 2) x
    ceil(height / 2) (odd sides round up)."""
    return width * height + 2 * ((width + 1) // 2) * ((height + 1) // 2)


def frame_bytes(pix_fmt: str, width: int, height: int) -> int:
    """Bytes of one raw frame of `pix_fmt` (one of `PIX_FMTS`)."""
    if pix_fmt not in PIX_FMTS:
        raise ValueError(f"pix_fmt must be one of {PIX_FMTS}, not {pix_fmt!r}")
    return yuv420p_frame_bytes(width, height) if pix_fmt == "yuv420p" else width * height * 3
