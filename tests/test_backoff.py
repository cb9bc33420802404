"""Reconnect backoff: capped exponential with full jitter, and a fleet that a broker restart
drops comes back spread over the first window instead of in one burst."""

from __future__ import annotations

import asyncio
import random
import time
from pathlib import Path

import pytest

from edgewire import mqtt_fastpath
from edgewire.backoff import Backoff
from edgewire.config import BrokerSettings, parse_yaml_model
from edgewire.errors import ConfigError
from edgewire.session import MqttSession

from .conftest import Mosquitto, until


def test_every_delay_lies_between_zero_and_a_ceiling_that_doubles_up_to_the_cap() -> None:
    backoff = Backoff(0.5, 8.0, random.Random(7))
    ceilings = [backoff.ceiling(n) for n in range(8)]
    assert ceilings == [0.5, 1.0, 2.0, 4.0, 8.0, 8.0, 8.0, 8.0]
    for attempt in range(200):
        delay = backoff.next_delay()
        assert 0.0 <= delay <= backoff.ceiling(attempt)
    assert backoff.attempt == 200
    assert backoff.ceiling(10**6) == 8.0  # retrying for weeks: still capped, no overflow
    backoff.reset()
    assert backoff.attempt == 0


def test_the_first_retry_is_spread_over_the_whole_window_not_bunched() -> None:
    """Full jitter: the draws cover [0, base] roughly evenly (each fifth of it gets some)."""
    rng = random.Random(11)
    firsts = [Backoff(2.0, 30.0, rng).next_delay() for _ in range(1000)]
    assert min(firsts) >= 0.0 and max(firsts) <= 2.0
    fifths = [sum(1 for d in firsts if i * 0.4 <= d < (i + 1) * 0.4) for i in range(5)]
    assert all(count > 120 for count in fifths), fifths


def test_the_cap_below_the_window_is_refused_in_config() -> None:
    with pytest.raises(ConfigError, match="reconnect_max_s"):
        parse_yaml_model("reconnect_min_s: 5\nreconnect_max_s: 1\n", BrokerSettings, source=Path("broker.yaml"))
    with pytest.raises(ValueError):
        Backoff(0.0, 1.0)


@pytest.mark.parametrize("path", ["fast", "plain"])
async def test_sessions_dropped_by_a_broker_kill_all_return_spread_over_the_window(
    tmp_path: Path, path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SIGKILL the broker under 30 sessions and start it again on the same port at once: every
    session comes back, and their reconnects are spread over the first window (on both of the
    session's paths)."""
    if path == "plain":
        monkeypatch.setenv(mqtt_fastpath.ENV_SWITCH, "0")
    else:
        monkeypatch.delenv(mqtt_fastpath.ENV_SWITCH, raising=False)
    window_s = 2.0
    broker = Mosquitto(tmp_path)
    await asyncio.to_thread(broker.start)
    sessions = [
        MqttSession(f"storm-{i}", "127.0.0.1", broker.port, reconnect_min_s=window_s, reconnect_max_s=4.0)
        for i in range(30)
    ]
    try:
        for session in sessions:
            await session.__aenter__()
        for session in sessions:
            await session.wait_connected(20)
            assert session.fast_path is (path == "fast")
        assert broker.proc is not None
        broker.proc.kill()
        broker.proc.wait()
        await until(lambda: not any(s.connected for s in sessions), 20)
        restarted = Mosquitto(tmp_path, port=broker.port)
        await asyncio.to_thread(restarted.start)
        broker = restarted
        back_at: dict[str, float] = {}

        def record() -> bool:
            for s in sessions:
                if s.connected and s.client_id not in back_at:
                    back_at[s.client_id] = time.monotonic()
            return len(back_at) == len(sessions)

        assert await until(record, 60, step=0.01), f"{len(back_at)} of {len(sessions)} came back"
        assert all(s.connects == 2 for s in sessions)
        spread = max(back_at.values()) - min(back_at.values())
        # 30 uniform draws over 2 s all within 0.5 s of each other: odds below 1e-15.
        assert spread > 0.5, f"reconnects bunched within {spread:.3f}s"
    finally:
        for session in sessions:
            await session.close()
        broker.stop()
