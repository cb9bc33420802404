"""Image sizes read from headers, and frames that declare too many pixels refused unread."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edgewire.image_header import image_size
from edgewire.preprocess import MAX_PIXELS, ImageRejected, decode


def _jpeg(width: int, height: int, progressive: bool = False) -> bytes:
    image = np.random.default_rng(0).integers(0, 255, (height, width, 3), dtype=np.uint8)
    params = [cv2.IMWRITE_JPEG_PROGRESSIVE, 1] if progressive else []
    ok, buf = cv2.imencode(".jpg", image, params)
    assert ok
    return buf.tobytes()


def _png(width: int, height: int) -> bytes:
    ok, buf = cv2.imencode(".png", np.zeros((height, width), dtype=np.uint8))
    assert ok
    return buf.tobytes()


def _claiming(data: bytes, width: int, height: int) -> bytes:
    """The same bytes with the header's size rewritten: what an attacker sends."""
    out = bytearray(data)
    if out[:4] == b"\x89PNG":
        out[16:20], out[20:24] = width.to_bytes(4, "big"), height.to_bytes(4, "big")
        return bytes(out)
    pos = 2
    while out[pos + 1] not in (0xC0, 0xC1, 0xC2):
        pos += 2 + int.from_bytes(out[pos + 2 : pos + 4], "big")
    out[pos + 5 : pos + 7], out[pos + 7 : pos + 9] = height.to_bytes(2, "big"), width.to_bytes(2, "big")
    return bytes(out)


@pytest.mark.parametrize("width,height", [(1, 1), (8, 8), (320, 240), (17, 1023)])
def test_sizes_are_read_from_jpeg_and_png_headers(width: int, height: int) -> None:
    assert image_size(_jpeg(width, height)) == (width, height)
    assert image_size(_jpeg(width, height, progressive=True)) == (width, height)
    assert image_size(_png(width, height)) == (width, height)


@pytest.mark.parametrize("data", [b"", b"\xff\xd8", b"not an image", b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff\xda\x00\x02"])
def test_no_size_from_what_is_not_a_whole_header(data: bytes) -> None:
    assert image_size(data) is None


def test_a_cut_jpeg_has_no_size() -> None:
    data = _jpeg(64, 48)
    sof = data.index(b"\xff\xc0")
    assert image_size(data[: sof + 6]) is None
    assert image_size(data[: sof + 9]) == (64, 48)


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=256))
def test_any_bytes_give_a_size_or_none_never_an_error(data: bytes) -> None:
    for candidate in (data, b"\xff\xd8" + data, b"\x89PNG\r\n\x1a\n" + data):
        size = image_size(candidate)
        assert size is None or (len(size) == 2 and all(0 <= v < 2**32 for v in size))


@pytest.mark.parametrize("kind", ["jpeg", "png"])
def test_a_frame_declaring_huge_dimensions_is_refused_before_decoding(kind: str) -> None:
    # A few kilobytes claiming 65500 x 65500 (JPEG) or 32000 x 32000 (PNG): OpenCV raised from
    # deep inside inference on the first, and allocated about 1 GB for the second.
    small = _jpeg(32, 32) if kind == "jpeg" else _png(32, 32)
    bomb = _claiming(small, 65500, 65500) if kind == "jpeg" else _claiming(small, 32000, 32000)
    assert len(bomb) < 16 * 1024
    with pytest.raises(ImageRejected, match="more than the"):
        decode(bomb)


def test_limits_and_broken_streams() -> None:
    assert decode(_png(64, 64), max_pixels=64 * 64) is not None
    with pytest.raises(ImageRejected):
        decode(_png(64, 64), max_pixels=64 * 64 - 1)
    assert MAX_PIXELS >= 3840 * 2160  # a 4K camera frame passes
    data = _jpeg(64, 48)
    assert decode(data[: len(data) // 3]) is None or decode(data[: len(data) // 3]).shape == (48, 64, 3)
    assert decode(b"GIF89a not supported") is None
