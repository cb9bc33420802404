"""Frame sources: image folders, video files, and frames handed in over MQTT."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterable
from pathlib import Path

import cv2
import numpy as np
import pytest

from edgewire.config import SourceSettings
from edgewire.edge.sources import FolderSource, Frame, QueueSource, VideoSource, chunks, open_source
from edgewire.errors import SourceError

# Written in this order on purpose: the source must sort, not trust the directory listing.
NAMES = ["c.png", "a.jpg", "b.png"]


async def take(source: AsyncIterable[Frame], limit: int = 1000, timeout: float = 10.0) -> list[Frame]:
    """At most ``limit`` frames, failing instead of hanging if the source never ends."""

    async def collect() -> list[Frame]:
        frames: list[Frame] = []
        async for frame in source:
            frames.append(frame)
            if len(frames) >= limit:
                break
        return frames

    return await asyncio.wait_for(collect(), timeout)


def image_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "frames"
    folder.mkdir()
    for i, name in enumerate(NAMES):
        assert cv2.imwrite(str(folder / name), np.full((8, 8, 3), 40 * i, np.uint8))
    (folder / "notes.txt").write_text("not an image")
    (folder / "d.png").mkdir()  # a folder with an image name is not a frame
    return folder


def folder_source(path: Path, **kw: object) -> FolderSource:
    return FolderSource(SourceSettings(kind="folder", path=path, **kw))


# ---- folders ---------------------------------------------------------------------------------


async def test_folder_yields_sorted_frames_once_and_stops(tmp_path: Path) -> None:
    folder = image_folder(tmp_path)
    frames = await take(folder_source(folder))
    assert [f.ref for f in frames] == sorted(NAMES)
    assert [f.seq for f in frames] == [0, 1, 2]
    assert [f.path for f in frames] == [folder / n for n in sorted(NAMES)]
    assert [f.content_type for f in frames] == ["image/jpeg", "image/png", "image/png"]
    assert all(f.data is None and f.image is None for f in frames)
    assert frames[0].encoded() == (folder / "a.jpg").read_bytes()


async def test_folder_loop_repeats_with_growing_seq(tmp_path: Path) -> None:
    n = len(NAMES)
    frames = await take(folder_source(image_folder(tmp_path), loop=True), limit=2 * n + 1)
    assert len(frames) == 2 * n + 1
    assert [f.seq for f in frames] == list(range(2 * n + 1))
    assert [f.ref for f in frames] == sorted(NAMES) * 2 + [sorted(NAMES)[0]]


async def test_folder_pattern_filters(tmp_path: Path) -> None:
    frames = await take(folder_source(image_folder(tmp_path), pattern="*.png"))
    assert [f.ref for f in frames] == ["b.png", "c.png"]


async def test_folder_fps_paces_frames(tmp_path: Path) -> None:
    started = time.monotonic()
    frames = await take(folder_source(image_folder(tmp_path), fps=50.0))
    assert len(frames) == 3
    assert time.monotonic() - started >= 0.05  # three periods of 20 ms, with slack


def test_empty_folder(tmp_path: Path) -> None:
    with pytest.raises(SourceError, match="no images matching"):
        folder_source(tmp_path)


def test_folder_with_no_matching_images(tmp_path: Path) -> None:
    (tmp_path / "readme.txt").write_text("x")
    (tmp_path / "scan.pdf").write_bytes(b"%PDF-1.4")
    with pytest.raises(SourceError, match=r"no images matching '\*'"):
        folder_source(tmp_path)
    assert cv2.imwrite(str(tmp_path / "only.jpg"), np.zeros((4, 4), np.uint8))
    with pytest.raises(SourceError, match=r"no images matching '\*\.png'"):
        folder_source(tmp_path, pattern="*.png")
    assert len(folder_source(tmp_path).files) == 1


def test_missing_folder(tmp_path: Path) -> None:
    missing = tmp_path / "missing"
    with pytest.raises(SourceError, match="image folder not found") as info:
        folder_source(missing)
    assert str(missing) in str(info.value)


def test_file_given_as_folder(tmp_path: Path) -> None:
    path = tmp_path / "one.png"
    cv2.imwrite(str(path), np.zeros((4, 4), np.uint8))
    with pytest.raises(SourceError, match="image folder not found"):
        folder_source(path)


# ---- video -----------------------------------------------------------------------------------

LEVELS = [0, 60, 120, 180, 240]


@pytest.fixture
def video(tmp_path: Path) -> Path:
    path = tmp_path / "clip.avi"
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 10.0, (64, 48))
    if not writer.isOpened():
        pytest.skip("this OpenCV build cannot write MJPG/AVI")
    for level in LEVELS:
        writer.write(np.full((48, 64, 3), level, np.uint8))
    writer.release()
    probe = cv2.VideoCapture(str(path))
    readable = probe.isOpened()
    probe.release()
    if not readable:
        pytest.skip("this OpenCV build cannot read back MJPG/AVI")
    return path


async def test_video_yields_its_frames(video: Path) -> None:
    frames = await take(VideoSource(SourceSettings(kind="video", path=video)))
    assert len(frames) == len(LEVELS)
    assert [f.seq for f in frames] == list(range(len(LEVELS)))
    assert [f.ref for f in frames] == [f"video:{i}" for i in range(len(LEVELS))]
    for frame, level in zip(frames, LEVELS, strict=True):
        assert frame.image is not None and frame.image.shape == (48, 64, 3)
        assert abs(float(frame.image.mean()) - level) < 4
        assert frame.path is None and frame.data is None
    # A decoded frame re-encodes as JPEG for escalation.
    again = cv2.imdecode(np.frombuffer(frames[2].encoded(), np.uint8), cv2.IMREAD_COLOR)
    assert again.shape == (48, 64, 3)


async def test_video_loop_starts_over(video: Path) -> None:
    n = len(LEVELS)
    frames = await take(VideoSource(SourceSettings(kind="video", path=video, loop=True)), limit=n + 2)
    assert [f.seq for f in frames] == list(range(n + 2))
    assert abs(float(frames[n].image.mean()) - LEVELS[0]) < 4
    assert abs(float(frames[n + 1].image.mean()) - LEVELS[1]) < 4


def test_missing_video_file(tmp_path: Path) -> None:
    missing = tmp_path / "missing.mp4"
    with pytest.raises(SourceError, match="video file not found") as info:
        VideoSource(SourceSettings(kind="video", path=missing))
    assert str(missing) in str(info.value)


def test_open_source_picks_the_kind(tmp_path: Path, video: Path) -> None:
    folder = image_folder(tmp_path)
    assert isinstance(open_source(SourceSettings(kind="folder", path=folder)), FolderSource)
    assert isinstance(open_source(SourceSettings(kind="video", path=video)), VideoSource)
    assert isinstance(open_source(SourceSettings(kind="mqtt")), QueueSource)
    with pytest.raises(SourceError):
        open_source(SourceSettings(kind="video", path=tmp_path / "nope.avi"))


# ---- frames handed in ------------------------------------------------------------------------


async def test_queue_source_yields_offered_frames_until_closed() -> None:
    source = QueueSource(maxsize=8)
    assert source.offer("f-1", b"one", 1.0, "image/jpeg")
    assert source.offer("f-2", b"two", 2.0, "image/png")
    source.close()
    frames = await take(source)
    assert [(f.seq, f.ref, f.data, f.ts, f.content_type) for f in frames] == [
        (0, "f-1", b"one", 1.0, "image/jpeg"),
        (1, "f-2", b"two", 2.0, "image/png"),
    ]
    assert frames[1].encoded() == b"two"


async def test_queue_source_waits_for_frames_offered_later() -> None:
    source = QueueSource()
    consumer = asyncio.create_task(take(source, timeout=5))
    await asyncio.sleep(0.01)
    assert not consumer.done()
    source.offer("late", b"x", 0.0, "image/jpeg")
    source.close()
    frames = await consumer
    assert [f.ref for f in frames] == ["late"]


async def test_full_backlog_drops_and_does_not_spend_a_seq() -> None:
    source = QueueSource(maxsize=2)
    assert source.offer("a", b"a", 0.0, "image/jpeg")
    assert source.offer("b", b"b", 0.0, "image/jpeg")
    assert source.offer("c", b"c", 0.0, "image/jpeg") is False
    assert source.queue.qsize() == 2
    first = await asyncio.wait_for(source.queue.get(), 1)
    assert first is not None and first.ref == "a"
    assert source.offer("d", b"d", 0.0, "image/jpeg")
    queued = [source.queue.get_nowait() for _ in range(2)]
    assert [(f.seq, f.ref) for f in queued] == [(1, "b"), (2, "d")]


async def test_closing_an_empty_queue_source_ends_iteration() -> None:
    source = QueueSource()
    source.close()
    assert await take(source, timeout=1) == []


def test_frame_without_any_data_cannot_be_encoded() -> None:
    with pytest.raises(SourceError, match="no image data"):
        Frame(seq=0, ref="empty", ts=0.0).encoded()


# ---- chunks, as the pipeline reads a source --------------------------------------------------


async def collect_chunks(source: object, most: int, limit: int = 1000) -> list[list[Frame]]:
    async def run() -> list[list[Frame]]:
        out: list[list[Frame]] = []
        async for chunk in chunks(source, most):  # type: ignore[arg-type]
            out.append(chunk)
            if sum(map(len, out)) >= limit:
                break
        return out

    return await asyncio.wait_for(run(), 10)


async def test_folder_chunks_are_the_frames_of_iteration_in_lists_of_at_most_most(tmp_path: Path) -> None:
    folder = image_folder(tmp_path)
    one_by_one = await take(folder_source(folder, loop=True), limit=7)
    chunked = await collect_chunks(folder_source(folder, loop=True), 2, limit=7)
    assert [len(c) for c in chunked] == [2, 2, 2, 2]
    flat = [f for c in chunked for f in c][:7]
    fields = [(f.seq, f.ref, f.path, f.content_type, f.data, f.image) for f in flat]
    assert fields == [(f.seq, f.ref, f.path, f.content_type, f.data, f.image) for f in one_by_one]


async def test_folder_chunks_stop_at_the_end_of_a_folder_not_looped(tmp_path: Path) -> None:
    chunked = await collect_chunks(folder_source(image_folder(tmp_path)), 2)
    assert [[f.seq for f in c] for c in chunked] == [[0, 1], [2]]


async def test_paced_folder_chunks_hold_one_frame(tmp_path: Path) -> None:
    chunked = await collect_chunks(folder_source(image_folder(tmp_path), fps=200.0), 16)
    assert [len(c) for c in chunked] == [1, 1, 1]


async def test_queue_source_chunks_take_what_is_queued_and_stop_at_close() -> None:
    source = QueueSource(maxsize=8)
    for ref in "abcde":
        assert source.offer(ref, ref.encode(), 0.0, "image/jpeg")
    source.close()
    chunked = await collect_chunks(source, 3)
    assert [[f.ref for f in c] for c in chunked] == [["a", "b", "c"], ["d", "e"]]


async def test_any_async_iterable_of_frames_is_read_one_frame_a_chunk() -> None:
    class Plain:
        async def __aiter__(self):  # type: ignore[no-untyped-def]
            for seq in range(3):
                yield Frame(seq=seq, ref=f"p{seq}", ts=0.0, data=b"x")

    chunked = await collect_chunks(Plain(), 16)
    assert [[f.ref for f in c] for c in chunked] == [["p0"], ["p1"], ["p2"]]


def test_folder_take_hands_out_frames_at_once_and_ends_with_an_unlooped_folder(tmp_path: Path) -> None:
    source = folder_source(image_folder(tmp_path))
    assert source.instant
    first, rest, after = source.take(2), source.take(5), source.take(5)
    assert [f.seq for f in first] == [0, 1] and [f.seq for f in rest] == [2]
    assert after == []
    assert [f.ref for f in first + rest] == sorted(p.name for p in source.files)


def test_looped_folder_take_wraps_and_a_paced_folder_is_not_instant(tmp_path: Path) -> None:
    folder = image_folder(tmp_path)
    looped = folder_source(folder, loop=True)
    frames = looped.take(7)
    assert [f.seq for f in frames] == list(range(7))
    assert [f.ref for f in frames[3:6]] == [f.ref for f in frames[:3]]
    assert not folder_source(folder, fps=30.0).instant
