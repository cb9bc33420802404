"""Where frames come from: an image folder, a video file or camera, or an MQTT input topic.

A source is an async iterator of :class:`Frame`. Sources hand over encoded bytes or a path
when they have them, so decoding happens on the inference thread, not on the event loop. The
pipeline reads them through :func:`chunks`: a source that has many frames ready at once (a
folder read at full speed, a backlog of frames sent over MQTT) hands them over as one list,
which costs the event loop one step per chunk instead of one per frame.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterable, AsyncIterator
from pathlib import Path

import msgspec
import numpy as np

from edgewire.config import SourceSettings
from edgewire.errors import SourceError

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"}
#: Files sent up as they are; the other image files are re-encoded as JPEG for the wire.
WIRE_SUFFIXES = {".jpg", ".jpeg", ".png"}


class Frame(msgspec.Struct):
    """One frame as a source hands it over: a Struct, made in a third of a dataclass's time
    (a folder read at full speed makes thousands a second on the event loop)."""

    seq: int
    ref: str
    ts: float
    path: Path | None = None
    data: bytes | None = None
    image: np.ndarray | None = None
    content_type: str = "image/jpeg"

    def encoded(self) -> bytes:
        """The frame as image bytes, for escalation; encodes decoded frames as JPEG."""
        if self.data is not None:
            return self.data
        if self.path is not None:
            if self.path.suffix.lower() in WIRE_SUFFIXES:
                return self.path.read_bytes()
            import cv2  # a BMP, WebP or TIFF file goes up as JPEG, the wire's format

            image = cv2.imread(str(self.path), cv2.IMREAD_COLOR)
            if image is None:
                raise SourceError(f"frame {self.ref}: {self.path} cannot be read")
            return _jpeg(image, self.ref)
        if self.image is not None:
            return _jpeg(self.image, self.ref)
        raise SourceError(f"frame {self.ref} has no image data")


def _jpeg(image: np.ndarray, ref: str) -> bytes:
    import cv2

    ok, buf = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, 90])
    if not ok:
        raise SourceError(f"frame {ref} cannot be encoded as JPEG")
    return buf.tobytes()


class Pacer:
    """Plays a source at a fixed frame rate; 0 means as fast as it is pulled."""

    def __init__(self, fps: float) -> None:
        self.period = 1.0 / fps if fps > 0 else 0.0
        self._next = time.monotonic()

    @property
    def paced(self) -> bool:
        return self.period > 0

    async def wait(self) -> None:
        if not self.period:
            return
        self._next += self.period
        delay = self._next - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        else:
            self._next = time.monotonic()


class FolderSource:
    def __init__(self, settings: SourceSettings) -> None:
        assert settings.path is not None
        folder = Path(settings.path)
        if not folder.is_dir():
            raise SourceError(f"image folder not found: {folder} (source.path)")
        self.files = sorted(
            p for p in folder.glob(settings.pattern) if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()
        )
        if not self.files:
            raise SourceError(
                f"no images matching '{settings.pattern}' in {folder} (looked for {', '.join(sorted(IMAGE_SUFFIXES))})"
            )
        self.settings = settings
        # What each frame of a file carries, worked out once rather than per frame and per loop.
        self._entries = [
            (path, path.name, "image/png" if path.suffix.lower() == ".png" else "image/jpeg") for path in self.files
        ]
        #: Sequence number of the next frame :meth:`take` hands out.
        self._next = 0

    async def __aiter__(self) -> AsyncIterator[Frame]:
        pacer = Pacer(self.settings.fps)
        paced = pacer.paced
        now = time.time
        seq = 0
        while True:
            for path, name, ctype in self._entries:
                if paced:
                    await pacer.wait()
                yield Frame(seq, name, now(), path, None, None, ctype)
                seq += 1
                if not seq & 63:
                    await asyncio.sleep(0)  # let the rest of the loop breathe at full speed
            if not self.settings.loop:
                return

    @property
    def instant(self) -> bool:
        """Read at full speed, every frame is there at once: the pipeline takes frames with
        :meth:`take` whenever it has room for work, with no reader to wake for them."""
        return self.settings.fps <= 0

    def take(self, most: int) -> list[Frame]:
        """The next frames, up to ``most``, without waiting (one read time for all of them);
        empty once a folder that is not looped is done. Shares its place with :meth:`chunks`."""
        entries, count, seq = self._entries, len(self._entries), self._next
        n = most if self.settings.loop else min(most, count - seq)
        if n <= 0:
            return []
        self._next = seq + n
        ts = time.time()
        frames = []
        for s in range(seq, seq + n):
            path, name, ctype = entries[s % count]
            frames.append(Frame(s, name, ts, path, None, None, ctype))
        return frames

    async def chunks(self, most: int) -> AsyncIterator[list[Frame]]:
        """The same frames as iterating, up to ``most`` at a time when not paced."""
        if not self.instant:
            async for frame in self:
                yield [frame]
            return
        breath = self._next
        while chunk := self.take(most):
            yield chunk
            if self._next - breath >= 64:
                breath = self._next
                await asyncio.sleep(0)  # let the rest of the loop breathe at full speed


class VideoSource:
    """A video file, a camera index or a GStreamer pipeline, read through OpenCV."""

    def __init__(self, settings: SourceSettings) -> None:
        import cv2

        self.settings = settings
        if settings.kind == "video":
            assert settings.path is not None
            if not Path(settings.path).is_file():
                raise SourceError(f"video file not found: {settings.path} (source.path)")
            self._target: int | str = str(settings.path)
            self._api = cv2.CAP_ANY
        else:
            device = settings.device
            assert device is not None
            self._target = int(device) if isinstance(device, int) or str(device).isdigit() else str(device)
            self._api = cv2.CAP_GSTREAMER if isinstance(self._target, str) else cv2.CAP_ANY
        self._cap = cv2.VideoCapture(self._target, self._api)
        if not self._cap.isOpened():
            raise SourceError(f"cannot open {settings.kind} {self._target!r}: OpenCV could not read it")

    async def __aiter__(self) -> AsyncIterator[Frame]:
        import cv2

        pacer = Pacer(self.settings.fps)
        seq = 0
        try:
            while True:
                ok, image = await asyncio.to_thread(self._cap.read)
                if not ok:
                    if self.settings.loop and self.settings.kind == "video":
                        self._cap.set(cv2.CAP_PROP_POS_FRAMES, 0)
                        ok, image = await asyncio.to_thread(self._cap.read)
                    if not ok:
                        return
                await pacer.wait()
                yield Frame(seq=seq, ref=f"{self.settings.kind}:{seq}", ts=time.time(), image=image)
                seq += 1
        finally:
            self._cap.release()


class QueueSource:
    """Frames handed in by someone else: the agent feeds it from its ``input`` topic."""

    def __init__(self, maxsize: int = 256) -> None:
        self.queue: asyncio.Queue[Frame | None] = asyncio.Queue(maxsize)
        self._seq = 0

    def offer(self, ref: str, data: bytes, ts: float, content_type: str) -> bool:
        """Queue a frame; False when the device is already too far behind (dropped)."""
        try:
            self.queue.put_nowait(Frame(self._seq, ref, ts, data=data, content_type=content_type))
        except asyncio.QueueFull:
            return False
        self._seq += 1
        return True

    def close(self) -> None:
        """End the stream after the frames already queued; a full backlog loses its newest frame
        rather than the end-of-stream marker, so a consumer never waits forever."""
        if self.queue.full():
            with contextlib.suppress(asyncio.QueueEmpty):
                self._drop_newest()
        self.queue.put_nowait(None)

    def _drop_newest(self) -> None:
        items = []
        while not self.queue.empty():
            items.append(self.queue.get_nowait())
        for item in items[:-1]:
            self.queue.put_nowait(item)

    async def __aiter__(self) -> AsyncIterator[Frame]:
        while (frame := await self.queue.get()) is not None:
            yield frame

    async def chunks(self, most: int) -> AsyncIterator[list[Frame]]:
        """Whatever is queued, up to ``most`` frames at a time."""
        queue = self.queue
        while (frame := await queue.get()) is not None:
            chunk = [frame]
            while len(chunk) < most and not queue.empty():
                if (frame := queue.get_nowait()) is None:
                    yield chunk
                    return
                chunk.append(frame)
            yield chunk


Source = FolderSource | VideoSource | QueueSource


def chunks(source: AsyncIterable[Frame], most: int) -> AsyncIterator[list[Frame]]:
    """A source's frames as lists of at most ``most``: its own ``chunks`` when it has one,
    else one frame a list (any async iterable of frames is a source)."""
    read = getattr(source, "chunks", None)
    return read(most) if read is not None else _one_at_a_time(source)


async def _one_at_a_time(source: AsyncIterable[Frame]) -> AsyncIterator[list[Frame]]:
    async for frame in source:
        yield [frame]


def open_source(settings: SourceSettings) -> Source:
    if settings.kind == "folder":
        return FolderSource(settings)
    if settings.kind in ("video", "camera"):
        return VideoSource(settings)
    return QueueSource()
