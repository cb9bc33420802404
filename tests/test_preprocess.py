"""Frames to tensors, driven only by the model's declared input spec."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from edgewire.modelmeta import InputSpec
from edgewire.preprocess import Preprocessor, decode, read, sharpness

# A BGR pixel whose three channels differ, so a swapped channel order shows.
BGR = (10, 120, 230)
MEAN = (0.25, 0.5, 0.125)
STD = (0.5, 0.25, 2.0)


def spec(**kw: object) -> InputSpec:
    kw.setdefault("name", "x")
    return InputSpec(**kw)


def bgr_image(h: int, w: int, bgr: tuple[int, int, int] = BGR) -> np.ndarray:
    img = np.empty((h, w, 3), np.uint8)
    img[:] = bgr
    return img


def expected(value: float, scale: float, mean: float, std: float) -> np.float32:
    return np.float32((value * scale - mean) / std)


# ---- shapes, layouts, dtypes ------------------------------------------------------------


@pytest.mark.parametrize(
    ("shape", "layout", "color", "out_shape"),
    [
        ((-1, 1, 8, 6), "NCHW", "gray", (3, 1, 8, 6)),
        ((-1, 8, 6, 1), "NHWC", "gray", (3, 8, 6, 1)),
        ((-1, 3, 16, 12), "NCHW", "bgr", (3, 3, 16, 12)),
        ((-1, 16, 12, 3), "NHWC", "bgr", (3, 16, 12, 3)),
        ((-1, 3, 16, 12), "NCHW", "rgb", (3, 3, 16, 12)),
        ((-1, 16, 12, 3), "NHWC", "rgb", (3, 16, 12, 3)),
    ],
)
@pytest.mark.parametrize("resize", ["stretch", "center_crop", "letterbox"])
def test_batch_shape_and_dtype(
    shape: tuple[int, int, int, int], layout: str, color: str, out_shape: tuple[int, ...], resize: str
) -> None:
    channels = 1 if color == "gray" else 3
    pre = Preprocessor(spec(shape=shape, layout=layout, color=color, resize=resize, mean=MEAN[:channels]))
    # Frames of different sizes and kinds (colour, gray) in one batch.
    images = [bgr_image(48, 64), np.full((30, 90), 77, np.uint8), bgr_image(100, 40)]
    out = pre.batch(images)
    assert out.shape == out_shape
    assert out.dtype == np.float32
    assert out.flags["C_CONTIGUOUS"]
    assert pre.gray == (color == "gray")


def test_channel_count_must_match_colour() -> None:
    with pytest.raises(ValueError, match="1 channels but color 'bgr'"):
        Preprocessor(spec(shape=(-1, 1, 8, 8), color="bgr"))
    with pytest.raises(ValueError, match="3 channels but color 'gray'"):
        Preprocessor(spec(shape=(-1, 8, 8, 3), layout="NHWC", color="gray"))


# ---- values -------------------------------------------------------------------------------


@pytest.mark.parametrize("resize", ["stretch", "center_crop", "letterbox"])
@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
def test_values_bgr(resize: str, layout: str) -> None:
    shape = (-1, 3, 8, 8) if layout == "NCHW" else (-1, 8, 8, 3)
    s = spec(shape=shape, layout=layout, color="bgr", resize=resize, scale=1 / 255, mean=MEAN, std=STD)
    out = Preprocessor(s).batch([bgr_image(40, 40)])  # square: no letterbox padding
    chw = out[0] if layout == "NCHW" else out[0].transpose(2, 0, 1)
    for c in range(3):
        np.testing.assert_allclose(chw[c], expected(BGR[c], 1 / 255, MEAN[c], STD[c]), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
def test_values_rgb_swap_channels(layout: str) -> None:
    shape = (-1, 3, 8, 8) if layout == "NCHW" else (-1, 8, 8, 3)
    s = spec(shape=shape, layout=layout, color="rgb", scale=1.0, mean=MEAN, std=STD)
    out = Preprocessor(s).batch([bgr_image(20, 20)])
    chw = out[0] if layout == "NCHW" else out[0].transpose(2, 0, 1)
    rgb = BGR[::-1]
    for c in range(3):
        np.testing.assert_allclose(chw[c], expected(rgb[c], 1.0, MEAN[c], STD[c]), rtol=1e-5, atol=1e-6)


def test_values_gray_from_gray_and_from_colour() -> None:
    s = spec(shape=(-1, 1, 4, 4), color="gray", scale=1 / 255, mean=(0.5,), std=(0.25,))
    pre = Preprocessor(s)
    gray_in = np.full((12, 12), 200, np.uint8)
    colour_in = bgr_image(12, 12, (200, 200, 200))  # a gray colour converts to the same level
    out = pre.batch([gray_in, colour_in])
    np.testing.assert_allclose(out, expected(200, 1 / 255, 0.5, 0.25), rtol=1e-5, atol=1e-6)


def test_gray_frame_into_colour_model_is_replicated() -> None:
    s = spec(shape=(-1, 3, 4, 4), color="bgr", scale=1.0, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
    out = Preprocessor(s).batch([np.full((10, 10), 42, np.uint8)])
    np.testing.assert_array_equal(out, np.full((1, 3, 4, 4), 42.0, np.float32))


def test_scalar_mean_and_std_apply_to_every_channel() -> None:
    s = spec(shape=(-1, 3, 4, 4), color="bgr", scale=2.0, mean=(10.0,), std=(4.0,))
    out = Preprocessor(s).batch([bgr_image(8, 8)])
    for c in range(3):
        np.testing.assert_allclose(out[0, c], expected(BGR[c], 2.0, 10.0, 4.0), rtol=1e-5, atol=1e-6)


def test_batch_does_not_modify_its_input() -> None:
    img = bgr_image(16, 16)
    copy = img.copy()
    Preprocessor(spec(shape=(-1, 3, 8, 8), color="bgr", mean=MEAN, std=STD)).batch([img])
    np.testing.assert_array_equal(img, copy)


# ---- geometry ---------------------------------------------------------------------------


def thirds(h: int, w: int, axis: int, outer: int = 0, middle: int = 255) -> np.ndarray:
    """A gray image whose outer thirds (along ``axis``) are ``outer`` and middle third ``middle``."""
    img = np.full((h, w), outer, np.uint8)
    n = img.shape[axis]
    index = [slice(None), slice(None)]
    index[axis] = slice(n // 3, 2 * n // 3)
    img[tuple(index)] = middle
    return img


def gray_pre(resize: str, h: int, w: int) -> Preprocessor:
    return Preprocessor(spec(shape=(-1, 1, h, w), color="gray", resize=resize, scale=1 / 255))


def test_center_crop_of_a_wide_image_takes_the_middle() -> None:
    img = thirds(30, 90, axis=1)  # 0 | 255 | 0, left to right
    cropped = gray_pre("center_crop", 10, 10).batch([img])
    np.testing.assert_allclose(cropped, np.ones((1, 1, 10, 10), np.float32), rtol=1e-6)
    # Stretching the same frame keeps the dark sides: the crop is what removed them.
    stretched = gray_pre("stretch", 10, 10).batch([img])
    assert stretched[0, 0, :, 0].max() == 0.0 and stretched[0, 0, :, -1].max() == 0.0
    assert stretched[0, 0, :, 5].min() == pytest.approx(1.0)


def test_center_crop_of_a_tall_image_takes_the_middle() -> None:
    img = thirds(90, 30, axis=0)
    cropped = gray_pre("center_crop", 10, 10).batch([img])
    np.testing.assert_allclose(cropped, np.ones((1, 1, 10, 10), np.float32), rtol=1e-6)


def test_center_crop_honours_a_non_square_input() -> None:
    # Target 20x10 (2:1) from a 120x30 (4:1) frame: keep the middle 60 columns.
    img = np.zeros((30, 120), np.uint8)
    img[:, 30:90] = 255
    out = gray_pre("center_crop", 10, 20).batch([img])
    assert out.shape == (1, 1, 10, 20)
    np.testing.assert_allclose(out, 1.0, rtol=1e-6)


def test_letterbox_pads_a_wide_image_top_and_bottom() -> None:
    s = spec(shape=(-1, 1, 16, 16), color="gray", resize="letterbox", scale=1 / 255, mean=(0.5,), std=(0.5,))
    out = Preprocessor(s).batch([np.full((50, 100), 255, np.uint8)])[0, 0]
    # 100x50 scaled by 0.16 is 16x8, centred: rows 4..11 are the image, the rest is padding.
    pad, content = expected(0, 1 / 255, 0.5, 0.5), expected(255, 1 / 255, 0.5, 0.5)
    np.testing.assert_allclose(out[4:12], content, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(out[:4], pad, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(out[12:], pad, rtol=1e-5, atol=1e-6)


def test_letterbox_pads_a_tall_colour_image_left_and_right() -> None:
    s = spec(shape=(-1, 16, 16, 3), layout="NHWC", color="bgr", resize="letterbox", scale=1.0, mean=(0.0,))
    out = Preprocessor(s).batch([bgr_image(100, 50)])[0]
    np.testing.assert_array_equal(out[:, 4:12], np.broadcast_to(np.float32(BGR), (16, 8, 3)))
    assert not out[:, :4].any() and not out[:, 12:].any()


def test_letterbox_of_matching_aspect_has_no_padding() -> None:
    out = gray_pre("letterbox", 8, 8).batch([np.full((32, 32), 255, np.uint8)])
    np.testing.assert_allclose(out, 1.0, rtol=1e-6)


# ---- decoding -----------------------------------------------------------------------------


@pytest.mark.parametrize("garbage", [b"", b"not an image", b"\xff\xd8\xff\xe0 truncated jpeg", bytes(range(256))])
def test_decode_returns_none_for_garbage(garbage: bytes) -> None:
    assert decode(garbage) is None
    assert decode(garbage, gray=True) is None


def test_decode_real_jpeg() -> None:
    ok, buf = cv2.imencode(".jpg", bgr_image(24, 32), [cv2.IMWRITE_JPEG_QUALITY, 95])
    assert ok
    colour = decode(buf.tobytes())
    assert isinstance(colour, np.ndarray)
    assert colour.shape == (24, 32, 3) and colour.dtype == np.uint8
    np.testing.assert_allclose(colour.reshape(-1, 3).mean(axis=0), BGR, atol=4)
    gray = decode(buf.tobytes(), gray=True)
    assert isinstance(gray, np.ndarray) and gray.shape == (24, 32)


def test_decode_png_is_lossless() -> None:
    img = np.random.default_rng(1).integers(0, 256, (9, 11, 3), dtype=np.uint8)
    ok, buf = cv2.imencode(".png", img)
    assert ok
    np.testing.assert_array_equal(decode(buf.tobytes()), img)


def test_read_file_and_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "f.png"
    assert cv2.imwrite(str(path), bgr_image(5, 7))
    assert read(str(path)).shape == (5, 7, 3)
    assert read(str(path), gray=True).shape == (5, 7)
    assert read(str(tmp_path / "missing.png")) is None


def test_sharpness_of_8_bit_frames_is_the_float_laplacian_variance_exactly() -> None:
    rng = np.random.default_rng(3)
    noise = rng.integers(0, 256, (240, 320), dtype=np.uint8)
    edge = np.zeros((64, 64), np.uint8)
    edge[:, 32:] = 255  # the largest Laplacian an 8-bit frame can have
    for gray in (noise, edge, cv2.GaussianBlur(noise, (9, 9), 3), np.full((5, 5), 7, np.uint8)):
        _, std = cv2.meanStdDev(cv2.Laplacian(gray, cv2.CV_32F))
        assert sharpness(gray) == float(std[0, 0]) ** 2
    assert sharpness(cv2.cvtColor(noise, cv2.COLOR_GRAY2BGR)) == sharpness(noise)
    assert sharpness(edge) > sharpness(cv2.GaussianBlur(edge, (9, 9), 3)) > 0
