"""JPEG decode and preprocessing in a child process, a burst at a time.

The bridge's event loop is its bottleneck, and decoding plus preprocessing is about a quarter
of what it spends per request; a thread does not help (OpenCV's work is short and the GIL is
not), a second process does. Requests taken in one pass of the event loop are queued and sent
to the worker as one message at the end of that pass; the worker answers the burst with one
message holding one float32 array per preprocessing spec (a row per request) and, per request,
its rows or why it failed. The parent reads replies through the event loop (a Unix socket
pair under an asyncio protocol), so nothing on the loop ever blocks on the worker.

Robustness: a worker that dies (or stops answering for ``answer_timeout_s``) is killed and
started again; the requests it held fail at once with :class:`DecoderUnavailable`, never hang.
``close()`` shuts the workers down (end of file on their socket, then a kill if they linger).

Workers are fresh interpreters (``python -m edgewire.cloud_bridge.decoder``, the socket passed
as an inherited descriptor), never forks: the bridge runs asyncio and gRPC threads, which a fork
would copy in whatever state they were in. This is multiprocessing's "spawn" without its
re-import of the parent's main module (a CLI, a test runner), which the worker does not need
and which fails outright for a main script without a ``__name__`` guard.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import logging
import pickle
import signal
import socket
import struct
import subprocess
import sys
import time
from typing import Any

import numpy as np

from edgewire.errors import EdgewireError
from edgewire.modelmeta import InputSpec

log = logging.getLogger(__name__)

_HEADER = struct.Struct("!Q")
NOT_AN_IMAGE = "payload is not a decodable image"


class DecoderUnavailable(EdgewireError):
    """The decode worker could not answer (it died, was restarted, or the pool is closed)."""


class NotDecodable(EdgewireError):
    """This payload could not be decoded or preprocessed; the reason is the message."""


# ---- the worker (child process) ---------------------------------------------------------


def _recv_exactly(sock: socket.socket, n: int) -> bytes | None:
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        k = sock.recv_into(view[got:])
        if k == 0:
            return None
        got += k
    return bytes(buf)


class Stage:
    """One preprocessing spec in the worker: the inline path's :class:`Preprocessor`, split in
    two so that each frame is resized right after it is decoded (while it is still in cache)
    and the burst is then stacked and scaled in one pass, by ``Preprocessor.batch`` itself."""

    def __init__(self, spec: InputSpec) -> None:
        from edgewire.preprocess import Preprocessor

        self.pre = Preprocessor(spec)
        self.gray = self.pre.gray
        self.resize = self.pre.resize
        self._stack = copy.copy(self.pre)
        self._stack.resize = _already_resized  # type: ignore[method-assign]

    def batch(self, resized: list[np.ndarray]) -> np.ndarray:
        return self._stack.batch(resized)


def _already_resized(image: np.ndarray) -> np.ndarray:
    return image


def decode_burst(
    stages: dict[int, Stage], items: list[tuple[bytes, tuple[int, ...]]]
) -> tuple[dict[int, np.ndarray], list[tuple[int, ...] | str]]:
    """Decode and preprocess ``items`` (payload, spec ids): one array per spec id with a row per
    item that uses it, and per item either its row in each of its specs' arrays or a reason."""
    from edgewire.preprocess import decode

    frames: dict[int, list[np.ndarray]] = {}  # spec id -> resized frames, in row order
    outcome: list[tuple[int, ...] | str] = []
    for payload, sids in items:
        decoded: dict[bool, np.ndarray | None] = {}
        mine = []
        try:
            for sid in sids:
                stage = stages[sid]
                if stage.gray not in decoded:
                    decoded[stage.gray] = decode(payload, stage.gray)
                image = decoded[stage.gray]
                if image is None or image.size == 0:
                    raise NotDecodable(NOT_AN_IMAGE)
                mine.append(stage.resize(image))
        except NotDecodable as exc:
            outcome.append(str(exc))
            continue
        except Exception as exc:
            outcome.append(f"{NOT_AN_IMAGE}: {exc}")
            continue
        rows = []
        for sid, frame in zip(sids, mine, strict=True):
            got = frames.setdefault(sid, [])
            rows.append(len(got))
            got.append(frame)
        outcome.append(tuple(rows))
    arrays = {sid: stages[sid].batch(resized) for sid, resized in frames.items()}
    return arrays, outcome


def _worker_main(fd: int) -> None:
    """The child: read bursts until end of file, answer each with one message."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides when this stops
    sock = socket.socket(fileno=fd)
    import cv2

    cv2.setNumThreads(1)  # a burst of small frames: threads cost more than they give
    stages: dict[int, Stage] = {}
    with sock:
        while True:
            header = _recv_exactly(sock, _HEADER.size)
            if header is None:
                return
            body = _recv_exactly(sock, _HEADER.unpack(header)[0])
            if body is None:
                return
            burst_id, new_specs, items = pickle.loads(body)
            for sid, spec in new_specs.items():
                stages[sid] = Stage(InputSpec.model_validate(spec))
            arrays, outcome = decode_burst(stages, items)
            reply = pickle.dumps((burst_id, arrays, outcome), protocol=5)
            sock.sendall(_HEADER.pack(len(reply)) + reply)


# ---- the parent side ----------------------------------------------------------------------

_Item = tuple[bytes, tuple[int, ...], "asyncio.Future[list[np.ndarray]]"]


class _Worker(asyncio.Protocol):
    """One child process and the parent's end of its socket pair."""

    def __init__(self, pool: DecodePool, slot: int) -> None:
        self.pool = pool
        self.slot = slot
        self.proc: Any = None
        self.transport: asyncio.Transport | None = None
        self.started = time.monotonic()
        self.pending: dict[int, tuple[float, list[_Item]]] = {}  # burst id -> (sent at, items)
        self.load = 0  # items sent and not answered
        self.sent_specs: set[int] = set()
        self._buf = bytearray()
        self._lost = False

    async def start(self) -> None:
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            fd = child.fileno()
            # Popen returns once the child has exec'd (a few ms): no wait on the worker itself.
            self.proc = subprocess.Popen(  # noqa: ASYNC220
                [sys.executable, "-m", __name__, str(fd)], pass_fds=(fd,), stdin=subprocess.DEVNULL
            )
        except BaseException:
            parent.close()
            raise
        finally:
            child.close()  # the child holds its own copy: its death is our end of file
        self.started = time.monotonic()
        loop = asyncio.get_running_loop()
        await loop.create_unix_connection(lambda: self, sock=parent)

    # asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        buf = self._buf
        buf += data
        while len(buf) >= _HEADER.size:
            (n,) = _HEADER.unpack_from(buf)
            end = _HEADER.size + n
            if len(buf) < end:
                return
            body = bytes(memoryview(buf)[_HEADER.size : end])
            del buf[:end]
            self._answer(body)

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost = True
        self.transport = None
        self.pool._lost(self, exc)  # noqa: SLF001 - a pool's worker reports its own loss to it

    # ---

    def send(self, burst_id: int, items: list[_Item], specs: dict[int, dict[str, Any]]) -> None:
        assert self.transport is not None
        new = {sid: specs[sid] for sid in {sid for _, sids, _ in items for sid in sids} - self.sent_specs}
        self.sent_specs.update(new)
        body = pickle.dumps((burst_id, new, [(payload, sids) for payload, sids, _ in items]), protocol=5)
        self.pending[burst_id] = (time.monotonic(), items)
        self.load += len(items)
        self.transport.write(_HEADER.pack(len(body)) + body)

    def _answer(self, body: bytes) -> None:
        burst_id, arrays, outcome = pickle.loads(body)
        entry = self.pending.pop(burst_id, None)
        if entry is None:
            return
        items = entry[1]
        self.load -= len(items)
        for (_, sids, fut), result in zip(items, outcome, strict=True):
            if fut.done():
                continue
            if isinstance(result, str):
                fut.set_exception(NotDecodable(result))
            else:
                fut.set_result([arrays[sid][row : row + 1] for sid, row in zip(sids, result, strict=True)])

    def fail_all(self, reason: str) -> None:
        pending, self.pending = self.pending, {}
        self.load = 0
        for _, items in pending.values():
            for _, _, fut in items:
                if not fut.done():
                    fut.set_exception(DecoderUnavailable(reason))

    def oldest(self) -> float | None:
        return min((sent for sent, _ in self.pending.values()), default=None)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.kill()


class DecodePool:
    """Decode and preprocess request payloads in ``workers`` child processes.

    ``await pool.decode(payload, spec_ids)`` returns one (1, ...) float32 array per spec id,
    exactly what :class:`edgewire.preprocess.Preprocessor` gives inline; it raises
    :class:`NotDecodable` for a payload that is not an image and :class:`DecoderUnavailable`
    when the worker holding it died. Calls made in the same pass of the event loop leave as
    one burst (split at ``max_burst``).
    """

    def __init__(
        self,
        workers: int = 1,
        *,
        max_burst: int = 256,
        answer_timeout_s: float = 10.0,
    ) -> None:
        if workers < 1:
            raise ValueError("a decode pool needs at least one worker")
        self.workers = workers
        self.max_burst = max_burst
        self.answer_timeout_s = answer_timeout_s
        self._slots: list[_Worker | None] = [None] * workers
        self._specs: dict[int, dict[str, Any]] = {}
        self._spec_ids: dict[InputSpec, int] = {}
        self._queue: list[_Item] = []
        self._flush_soon = False
        self._burst_ids = 0
        self._closing = False
        self._restarts: list[asyncio.Task[None]] = []
        self._backoff = [0.0] * workers
        self._dead: list[Any] = []  # processes to reap
        self._watch: asyncio.TimerHandle | None = None
        self.restarts = 0
        self.items_sent = 0  # payloads handed to a worker

    # ---- lifecycle

    async def start(self) -> None:
        """Start the workers and wait until each has answered once (its imports are done)."""
        loop = asyncio.get_running_loop()
        pings = []
        for slot in range(self.workers):
            worker = await self._start_slot(slot)
            ping: asyncio.Future[list[np.ndarray]] = loop.create_future()
            self._burst_ids += 1
            worker.send(self._burst_ids, [(b"", (), ping)], self._specs)  # no specs: nothing to decode
            pings.append(ping)
        await asyncio.wait_for(asyncio.gather(*pings), 60)

    async def _start_slot(self, slot: int) -> _Worker:
        worker = _Worker(self, slot)
        self._slots[slot] = worker
        try:
            await worker.start()
        except BaseException:
            self._slots[slot] = None
            raise
        return worker

    async def close(self) -> None:
        """Answer nothing more: fail what is pending, stop the workers (kill any that linger)."""
        self._closing = True
        if self._watch is not None:
            self._watch.cancel()
            self._watch = None
        for task in self._restarts:
            task.cancel()
        for task in self._restarts:
            with contextlib.suppress(BaseException):
                await task
        self._fail_queue("decoder is closed")
        procs = list(self._dead)
        for slot, worker in enumerate(self._slots):
            self._slots[slot] = None
            if worker is None:
                continue
            worker.fail_all("decoder is closed")
            if worker.transport is not None:
                worker.transport.close()  # end of file: the worker returns
            if worker.proc is not None:
                procs.append(worker.proc)
        self._dead = []
        for proc in procs:
            try:
                await asyncio.to_thread(proc.wait, 5)
            except subprocess.TimeoutExpired:
                proc.kill()
                await asyncio.to_thread(proc.wait, 5)

    async def __aenter__(self) -> DecodePool:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def pids(self) -> list[int]:
        return [w.proc.pid for w in self._slots if w is not None and w.proc is not None]

    # ---- requests

    def spec_id(self, spec: InputSpec) -> int:
        sid = self._spec_ids.get(spec)
        if sid is None:
            sid = self._spec_ids[spec] = len(self._spec_ids) + 1
            self._specs[sid] = spec.model_dump(mode="json")
        return sid

    def decode(self, payload: bytes, spec_ids: tuple[int, ...]) -> asyncio.Future[list[np.ndarray]]:
        """One array per spec id for ``payload`` (a future: await it)."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[list[np.ndarray]] = loop.create_future()
        if self._closing:
            fut.set_exception(DecoderUnavailable("decoder is closed"))
            return fut
        self._queue.append((payload, spec_ids, fut))
        if not self._flush_soon:
            # At the end of this pass of the event loop: everything taken in the pass together.
            self._flush_soon = True
            loop.call_soon(self._flush)
        return fut

    def _flush(self) -> None:
        self._flush_soon = False
        queue, self._queue = self._queue, []
        while queue:
            burst, queue = queue[: self.max_burst], queue[self.max_burst :]
            live = [w for w in self._slots if w is not None and w.transport is not None]
            if not live:
                for _, _, fut in burst:
                    if not fut.done():
                        fut.set_exception(DecoderUnavailable("decode worker is restarting"))
                continue
            worker = min(live, key=lambda w: w.load)
            self._burst_ids += 1
            self.items_sent += len(burst)
            try:
                worker.send(self._burst_ids, burst, self._specs)
            except Exception as exc:  # e.g. an unpicklable payload: those requests fail, not the pool
                for _, _, fut in burst:
                    if not fut.done():
                        fut.set_exception(DecoderUnavailable(f"decode worker unreachable: {exc}"))
        if self._watch is None and not self._closing:
            self._watch = asyncio.get_running_loop().call_later(1.0, self._check)

    def _check(self) -> None:
        """Kill a worker that holds a burst for longer than ``answer_timeout_s``."""
        self._watch = None
        now = time.monotonic()
        busy = False
        for worker in self._slots:
            if worker is None:
                continue
            oldest = worker.oldest()
            if oldest is None:
                continue
            busy = True
            if now - oldest > self.answer_timeout_s:
                log.warning("decode worker %s gave no answer in %.0f s: killing it", worker.slot, self.answer_timeout_s)
                worker.kill()
        if busy and not self._closing:
            self._watch = asyncio.get_running_loop().call_later(1.0, self._check)

    def _fail_queue(self, reason: str) -> None:
        queue, self._queue = self._queue, []
        for _, _, fut in queue:
            if not fut.done():
                fut.set_exception(DecoderUnavailable(reason))

    # ---- worker loss and restart

    def _lost(self, worker: _Worker, exc: Exception | None) -> None:
        if self._slots[worker.slot] is not worker:
            return
        code = worker.proc.poll() if worker.proc is not None else None
        reason = "decode worker died" + (f" (exit code {code})" if code is not None else "")
        worker.fail_all(reason)
        if worker.proc is not None:
            self._dead.append(worker.proc)
        self._reap()
        self._slots[worker.slot] = None
        if self._closing:
            return
        log.warning("%s: starting it again", reason)
        lived = time.monotonic() - worker.started
        slot = worker.slot
        self._backoff[slot] = 0.0 if lived > 5.0 else min(max(self._backoff[slot] * 2, 0.1), 5.0)
        task = asyncio.ensure_future(self._restart(slot, self._backoff[slot]))
        self._restarts.append(task)
        task.add_done_callback(self._restarts.remove)

    async def _restart(self, slot: int, delay: float) -> None:
        if delay:
            await asyncio.sleep(delay)
        if self._closing or self._slots[slot] is not None:
            return
        try:
            await self._start_slot(slot)
            self.restarts += 1
        except Exception:
            log.exception("decode worker %s could not be started again", slot)
            self._backoff[slot] = min(max(self._backoff[slot] * 2, 0.1), 5.0)
            task = asyncio.ensure_future(self._restart(slot, self._backoff[slot]))
            self._restarts.append(task)
            task.add_done_callback(self._restarts.remove)

    def _reap(self) -> None:
        alive = []
        for proc in self._dead:
            if proc.poll() is None:
                alive.append(proc)
        self._dead = alive


if __name__ == "__main__":
    _worker_main(int(sys.argv[1]))
