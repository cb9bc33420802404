"""The embedded broker as operators run it: `edgewire broker`, clean start and stop, mDNS."""

from __future__ import annotations

import json
import shlex
import signal
import subprocess
import sys
import textwrap

import aiomqtt
import pytest

from edgewire.broker.embedded import BrokerError, EmbeddedBroker

from .conftest import NETNS_SETUP, free_port, netns_available, wait_port


def test_broker_command_serves_and_stops_cleanly() -> None:
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "edgewire.cli", "broker", "--allow-anonymous", "--port", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        wait_port(port)
        script = textwrap.dedent(
            f"""
            import asyncio, aiomqtt
            async def main():
                async with aiomqtt.Client("127.0.0.1", {port}, identifier="a") as a:
                    await a.publish("presence/x", b"hello", qos=1, retain=True)
                async with aiomqtt.Client("127.0.0.1", {port}, identifier="b") as b:
                    await b.subscribe("presence/+")
                    async for m in b.messages:
                        print(m.topic, m.payload.decode(), m.retain)
                        return
            asyncio.run(asyncio.wait_for(main(), 10))
            """
        )
        out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=30)
        assert out.stdout.split() == ["presence/x", "hello", "True"], out.stderr
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0
        _, err = proc.communicate()
        assert f"broker listening on mqtt://127.0.0.1:{port}" in err.decode()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


async def test_port_in_use_is_a_clear_error() -> None:
    port = free_port()
    async with EmbeddedBroker("127.0.0.1", port, allow_anonymous=True):
        with pytest.raises(BrokerError, match=f"cannot listen on 127.0.0.1:{port}"):
            await EmbeddedBroker("127.0.0.1", port, allow_anonymous=True).start()


async def test_amqtt_refuses_mqtt5_and_sessions_fall_back() -> None:
    from edgewire.session import MqttSession

    port = free_port()
    async with EmbeddedBroker("127.0.0.1", port, allow_anonymous=True):
        with pytest.raises(aiomqtt.MqttError):
            async with aiomqtt.Client("127.0.0.1", port, protocol=aiomqtt.ProtocolVersion.V5, timeout=5):
                pass
        async with MqttSession("fallback", "127.0.0.1", port) as session:
            await session.wait_connected(10)
            assert session.protocol == "3.1.1"


async def test_sessions_speak_mqtt5_to_mosquitto(mosquitto) -> None:  # type: ignore[no-untyped-def]
    from edgewire.session import MqttSession

    async with MqttSession("v5", "127.0.0.1", mosquitto.port) as session:
        await session.wait_connected(10)
        assert session.protocol == "5"


@pytest.mark.skipif(not netns_available(), reason="needs unshare -n (root) and iproute2")
def test_broker_is_advertised_on_mdns_inside_a_private_namespace() -> None:
    port = 18830
    script = textwrap.dedent(
        f"""
        import asyncio, json, subprocess, sys, socket, time
        from edgewire.mdns import MQTT_SERVICE, browse
        args = ["broker", "--allow-anonymous", "--port", "{port}", "--mdns"]
        proc = subprocess.Popen([sys.executable, "-m", "edgewire.cli", *args],
                                stderr=subprocess.PIPE)
        try:
            found = asyncio.run(browse(MQTT_SERVICE, timeout=4, interfaces=["127.0.0.1"]))
        finally:
            proc.terminate()
            proc.wait(10)
        print(json.dumps([{{"host": s.host, "port": s.port, "props": s.properties}} for s in found]))
        """
    )
    cmd = f"{NETNS_SETUP}; exec {shlex.quote(sys.executable)} -c {shlex.quote(script)}"
    out = subprocess.run(["unshare", "-n", "sh", "-c", cmd], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    found = json.loads(out.stdout.strip().splitlines()[-1])
    assert found == [{"host": "127.0.0.1", "port": port, "props": {"edgewire": "1"}}]


async def test_a_client_gets_the_retained_messages_of_its_own_subscriptions_only() -> None:
    """amqtt 0.12 offers a connecting client every retained message that any client's filter
    matches; the embedded broker serves each client only its own subscriptions' (edgewire.broker.guard)."""
    port = free_port()
    async with EmbeddedBroker("127.0.0.1", port, allow_anonymous=True):
        async with aiomqtt.Client("127.0.0.1", port, identifier="watcher") as watcher:
            await watcher.subscribe("presence/+", qos=1)
            async with aiomqtt.Client("127.0.0.1", port, identifier="cam-a") as a:
                await a.publish("presence/cam-a", b"online", qos=1, retain=True)
            async with aiomqtt.Client("127.0.0.1", port, identifier="cam-b") as b:
                await b.subscribe("result/cam-b", qos=1)
                await b.publish("result/cam-b", b"mine", qos=1)
                got = []
                async for message in b.messages:
                    got.append((str(message.topic), bytes(message.payload)))
                    if message.topic.matches("result/cam-b"):
                        break
            assert got == [("result/cam-b", b"mine")]
            # Its own subscription's retained message still comes.
            async with aiomqtt.Client("127.0.0.1", port, identifier="cam-c") as c:
                await c.subscribe("presence/+", qos=1)
                message = await anext(aiter(c.messages))
                assert (str(message.topic), bytes(message.payload), message.retain) == (
                    "presence/cam-a",
                    b"online",
                    True,
                )
