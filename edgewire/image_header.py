"""An encoded image's width and height, read from its header before anything is decoded.

A few kilobytes of JPEG or PNG can declare 65500 x 65500 pixels: decoding it would allocate
gigabytes (a decompression bomb), or make OpenCV raise from deep inside inference. Reading the
header costs microseconds and lets the device and the bridge refuse such a frame first.
"""

from __future__ import annotations

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
#: JPEG start-of-frame markers, which carry the frame's size (not DHT C4, JPG C8 or DAC CC).
_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}
#: JPEG markers that stand alone, with no length field after them.
_STANDALONE = {0x01, *range(0xD0, 0xD9)}


def image_size(data: bytes | bytearray | memoryview) -> tuple[int, int] | None:
    """(width, height) declared by a JPEG or PNG header; None when the bytes are neither, or the
    header is cut short or malformed."""
    view = memoryview(data)
    if len(view) >= 24 and view[:8] == _PNG_SIGNATURE and view[12:16] == b"IHDR":
        return int.from_bytes(view[16:20], "big"), int.from_bytes(view[20:24], "big")
    if len(view) >= 4 and view[0] == 0xFF and view[1] == 0xD8:
        return _jpeg_size(view)
    return None


def _jpeg_size(view: memoryview) -> tuple[int, int] | None:
    pos, end = 2, len(view)
    while pos + 4 <= end:
        if view[pos] != 0xFF:
            return None
        marker = view[pos + 1]
        if marker == 0xFF:  # fill byte before a marker
            pos += 1
            continue
        if marker in _STANDALONE:
            pos += 2
            continue
        if marker == 0xDA:  # start of scan before any frame header
            return None
        length = (view[pos + 2] << 8) | view[pos + 3]
        if length < 2:
            return None
        if marker in _SOF:
            if pos + 9 > end:
                return None
            height = (view[pos + 5] << 8) | view[pos + 6]
            width = (view[pos + 7] << 8) | view[pos + 8]
            return width, height
        pos += 2 + length
    return None
