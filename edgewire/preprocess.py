"""Frames to tensors, driven only by the model's declared input (see edgewire.modelmeta).

Shared by the device (before its local engine) and the bridge (before Triton).

This runs on the inference thread, never on the event loop: OpenCV releases the GIL while it
decodes and resizes, so a device with two cores decodes one batch while the loop publishes the
previous one.
"""

from __future__ import annotations

import cv2
import numpy as np

from edgewire.detection import Geometry, fit_geometry
from edgewire.errors import DecodeError
from edgewire.image_header import image_size
from edgewire.modelmeta import InputSpec

#: Pixels a received image may declare (about 8K x 4K). A larger one is refused from its header,
#: before any decoding: a few kilobytes can otherwise claim gigabytes of pixels.
MAX_PIXELS = 8192 * 4096


class ImageRejected(DecodeError):
    """Image bytes refused before decoding: too many pixels declared, or no size to be read."""


def decode(data: bytes, gray: bool = False, *, max_pixels: int = MAX_PIXELS) -> np.ndarray | None:
    """Encoded image bytes (JPEG or PNG) to a BGR (or gray) array; None when the bytes are not a
    decodable image. Raises ImageRejected when the header declares more than ``max_pixels``."""
    buf = np.frombuffer(data, dtype=np.uint8)
    if buf.size == 0:
        return None
    size = image_size(data)
    if size is None:
        return None  # neither JPEG nor PNG, or a header cut short: nothing safe to decode
    width, height = size
    if width * height > max_pixels:
        raise ImageRejected(f"image declares {width}x{height} pixels, more than the {max_pixels} allowed")
    try:
        return cv2.imdecode(buf, cv2.IMREAD_GRAYSCALE if gray else cv2.IMREAD_COLOR)
    except cv2.error:  # a header OpenCV itself refuses, or a stream corrupt past the header
        return None


def read(path: str, gray: bool = False) -> np.ndarray | None:
    """Read and decode an image file; a gray model gets a gray decode (JPEG skips colour work).
    The device's own files are trusted for size; a file OpenCV cannot read gives None."""
    try:
        return cv2.imread(path, cv2.IMREAD_GRAYSCALE if gray else cv2.IMREAD_COLOR)
    except cv2.error:
        return None


def sharpness(image: np.ndarray) -> float:
    """Variance of the Laplacian: low on blurred or defocused frames."""
    gray = image if image.ndim == 2 else cv2.cvtColor(image, cv2.COLOR_BGR2GRAY)
    # The 3x3 Laplacian of 8-bit pixels lies within +-1020, exact in 16-bit integers: the same
    # variance as in float, at a fraction of the memory traffic. Other depths keep float.
    depth = cv2.CV_16S if gray.dtype == np.uint8 else cv2.CV_32F
    _, std = cv2.meanStdDev(cv2.Laplacian(gray, depth))
    return float(std[0, 0]) ** 2


class Preprocessor:
    """Turns decoded frames into one input batch for the model."""

    def __init__(self, spec: InputSpec) -> None:
        self.spec = spec
        #: Decode straight to gray when that is all the model looks at.
        self.gray = spec.color == "gray"
        self._size = (spec.width, spec.height)
        channels = spec.channels
        self._mean = np.asarray(spec.mean, dtype=np.float32)
        self._std = np.asarray(spec.std, dtype=np.float32)
        if channels != (1 if spec.color == "gray" else 3):
            raise ValueError(f"input declares {channels} channels but color '{spec.color}'")
        # Fold scale/mean/std into one multiply-add: (x * scale - mean) / std.
        self._mul = (spec.scale / self._std).astype(np.float32)
        self._add = (-self._mean / self._std).astype(np.float32)

    def resize(self, image: np.ndarray) -> np.ndarray:
        spec = self.spec
        if spec.color == "gray" and image.ndim == 3:
            image = cv2.cvtColor(image, cv2.COLOR_BGR2GRAY)
        elif spec.color == "rgb" and image.ndim == 3:
            image = cv2.cvtColor(image, cv2.COLOR_BGR2RGB)
        elif spec.color != "gray" and image.ndim == 2:
            image = cv2.cvtColor(image, cv2.COLOR_GRAY2BGR)
        h, w = image.shape[:2]
        if spec.resize == "center_crop":
            target = spec.width / spec.height
            if w / h > target:
                cw = round(h * target)
                x0 = (w - cw) // 2
                image = image[:, x0 : x0 + cw]
            else:
                ch = round(w / target)
                y0 = (h - ch) // 2
                image = image[y0 : y0 + ch, :]
        elif spec.resize == "letterbox":
            g = fit_geometry(w, h, spec.width, spec.height, "letterbox")
            resized = cv2.resize(image, (g.new_w, g.new_h), interpolation=cv2.INTER_AREA)
            left, top = int(g.pad_x), int(g.pad_y)
            right, bottom = spec.width - g.new_w - left, spec.height - g.new_h - top
            border = (spec.pad_value,) * 3
            return cv2.copyMakeBorder(resized, top, bottom, left, right, cv2.BORDER_CONSTANT, value=border)
        return cv2.resize(image, self._size, interpolation=cv2.INTER_AREA)

    def geometry(self, image: np.ndarray) -> Geometry:
        """Where ``image`` lands in the input (a detector's boxes are brought back by it).
        Exact for stretch and letterbox; for center_crop within a pixel (the crop is taken
        before the resize here)."""
        h, w = image.shape[:2]
        return fit_geometry(w, h, self.spec.width, self.spec.height, self.spec.resize)

    def batch(self, images: list[np.ndarray]) -> np.ndarray:
        """Stack resized frames into the model's layout and value range."""
        stacked = np.stack([self.resize(img) for img in images]).astype(np.float32)
        if stacked.ndim == 3:  # gray: N,H,W -> N,H,W,1
            stacked = stacked[..., None]
        stacked *= self._mul
        stacked += self._add
        if self.spec.layout == "NCHW":
            stacked = np.ascontiguousarray(stacked.transpose(0, 3, 1, 2))
        return stacked
