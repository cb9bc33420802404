"""Decode workers: the same tensors as the inline path, reasons for bad payloads, restarts."""

from __future__ import annotations

import asyncio
import os
import signal

import numpy as np
import pytest

from edgewire.cloud_bridge.decoder import NOT_AN_IMAGE, DecodePool, DecoderUnavailable, NotDecodable
from edgewire.demo.models import DemoArtifacts
from edgewire.modelmeta import InputSpec
from edgewire.preprocess import Preprocessor, decode

from .conftest import until

GRAY = InputSpec(name="image", shape=(-1, 1, 8, 8), color="gray", resize="center_crop")
RGB = InputSpec(
    name="x", shape=(-1, 16, 12, 3), layout="NHWC", color="rgb", resize="letterbox", mean=(0.5,), std=(0.25,)
)


def gone(pid: int) -> bool:
    """No such process, not even a zombie waiting to be reaped."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def inline(spec: InputSpec, payload: bytes) -> np.ndarray:
    pre = Preprocessor(spec)
    image = decode(payload, pre.gray)
    assert image is not None
    return pre.batch([image])


async def test_worker_gives_the_inline_tensors(demo: DemoArtifacts) -> None:
    jpegs = [p.read_bytes() for p in sorted(demo.frames_dir.glob("*.jpg"))[:20]]
    async with DecodePool(1) as pool:
        gray, rgb = pool.spec_id(GRAY), pool.spec_id(RGB)
        assert pool.spec_id(GRAY) == gray
        # One burst: every call made in this pass of the loop, two specs each, plus garbage.
        calls = [pool.decode(j, (gray, rgb)) for j in jpegs] + [pool.decode(b"not an image", (gray,))]
        outcomes = await asyncio.gather(*calls, return_exceptions=True)
        for payload, got in zip(jpegs, outcomes, strict=False):
            assert not isinstance(got, BaseException)
            assert got[0].dtype == np.float32 and got[0].shape == (1, 1, 8, 8)
            assert np.array_equal(got[0], inline(GRAY, payload))
            assert got[1].shape == (1, 16, 12, 3)
            assert np.array_equal(got[1], inline(RGB, payload))
        bad = outcomes[-1]
        assert isinstance(bad, NotDecodable) and str(bad) == NOT_AN_IMAGE
        with pytest.raises(NotDecodable, match="not a decodable image"):
            await pool.decode(b"", (gray,))
        # A later call, alone, still right.
        (alone,) = await pool.decode(jpegs[3], (gray,))
        assert np.array_equal(alone, inline(GRAY, jpegs[3]))


async def test_killed_worker_fails_its_burst_and_is_replaced(demo: DemoArtifacts) -> None:
    jpeg = sorted(demo.frames_dir.glob("*.jpg"))[0].read_bytes()
    async with DecodePool(1) as pool:
        sid = pool.spec_id(GRAY)
        (pid,) = pool.pids()
        # A burst big enough to still be decoding when the worker is killed.
        calls = [pool.decode(jpeg, (sid,)) for _ in range(400)]
        await asyncio.sleep(0)  # the burst leaves at the end of the pass
        os.kill(pid, signal.SIGKILL)
        outcomes = await asyncio.wait_for(asyncio.gather(*calls, return_exceptions=True), 10)
        assert all(isinstance(o, DecoderUnavailable) for o in outcomes)
        assert "decode worker died" in str(outcomes[0])
        assert await until(lambda: pool.pids() not in ([], [pid]), 10)
        (again,) = await asyncio.wait_for(pool.decode(jpeg, (sid,)), 20)
        assert np.array_equal(again, inline(GRAY, jpeg))
        assert pool.restarts == 1
    assert pool.pids() == []


async def test_closed_pool_answers_unavailable_and_leaves_no_process(demo: DemoArtifacts) -> None:
    pool = DecodePool(2)
    await pool.start()
    pids = pool.pids()
    assert len(pids) == 2
    await pool.close()
    assert all(gone(pid) for pid in pids)
    with pytest.raises(DecoderUnavailable):
        await pool.decode(b"x", (1,))


# ---- the bridge with a decode worker, end to end (broker, Triton) ------------------------------

pytest.importorskip("pytriton")
pytest.importorskip("tritonclient.grpc")

from edgewire.cloud_bridge.bridge import Bridge  # noqa: E402
from edgewire.cloud_bridge.dispatch import Dispatcher  # noqa: E402
from edgewire.cloud_bridge.rules import default_rules  # noqa: E402
from edgewire.cloud_bridge.triton_server import EmbeddedTriton  # noqa: E402
from edgewire.config import BrokerSettings  # noqa: E402

from .conftest import Mosquitto  # noqa: E402
from .test_bridge_e2e import BrokerHandle, ResultReader, request  # noqa: E402


async def test_bridge_with_a_decode_worker_answers_end_to_end(
    triton: EmbeddedTriton,
    demo: DemoArtifacts,
    mosquitto: Mosquitto,
) -> None:
    handle = BrokerHandle("mosquitto", "127.0.0.1", mosquitto.port)
    jpegs = [p.read_bytes() for p in sorted(demo.frames_dir.glob("*.jpg"))[:8]]
    dispatcher = Dispatcher([f"grpc://{triton.grpc_url}"])
    bridge = Bridge(
        "bridge-dw",
        BrokerSettings(url=handle.url, reconnect_min_s=0.05, reconnect_max_s=0.5),
        dispatcher,
        default_rules("digits-cloud"),
        decode_workers=1,
    )
    bridge.inline_decode_max_inflight = 0  # every request through the worker, however few in flight
    task = asyncio.create_task(bridge.run())
    try:
        await asyncio.wait_for(bridge.ready.wait(), 30)
        assert bridge.decoder is not None
        async with ResultReader(handle, "cam-w") as dev:
            for i, jpeg in enumerate(jpegs):
                await dev.send(request("cam-w", f"w-{i}", jpeg))
            await dev.send(request("cam-w", "junk", b"not an image"))
            results = {r.trace_id: r for r in await dev.wait(len(jpegs) + 1)}
            assert all(results[f"w-{i}"].status == "ok" for i in range(len(jpegs)))
            assert results["w-0"].model == "digits-cloud" and results["w-0"].prediction is not None
            assert results["junk"].status == "rejected" and NOT_AN_IMAGE in (results["junk"].reason or "")
            # The worker dies: the bridge starts another and goes on answering.
            (pid,) = bridge.decoder.pids()
            os.kill(pid, signal.SIGKILL)
            assert await until(lambda: bridge.decoder.pids() not in ([], [pid]), 15)
            await dev.send(request("cam-w", "after", jpegs[0]))
            results = {r.trace_id: r for r in await dev.wait(len(jpegs) + 2)}
            assert results["after"].status == "ok"
            assert results["after"].prediction == results["w-0"].prediction
            assert bridge.decoder.items_sent == len(jpegs) + 2 and bridge.decoder.restarts == 1
        pids = bridge.decoder.pids()
    finally:
        bridge.stop()
        await asyncio.wait_for(task, 30)
        await dispatcher.close()
    assert all(gone(pid) for pid in pids)  # stopped with the bridge, and reaped
