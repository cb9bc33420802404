"""``edgewire watch``: every edgewire message on a broker, decoded."""

from __future__ import annotations

import asyncio
import json
from typing import Annotated, Any

import typer

from edgewire.cli.common import BrokerOption, broker_settings, operator_session, out, run_until_signal
from edgewire.errors import EdgewireError


def watch(
    broker_url: BrokerOption = "mqtt://127.0.0.1:1883",
    topic: Annotated[list[str], typer.Option("--topic", "-t", help="filter(s) to subscribe to")] = ["#"],  # noqa: B006
    count: Annotated[int, typer.Option(help="stop after this many messages (0: never)")] = 0,
    as_json: Annotated[bool, typer.Option("--json", help="one JSON object per line")] = False,
) -> None:
    """Subscribe and print every edgewire message, decoded; malformed ones are shown as such."""
    from edgewire import envelopes, topics

    settings = broker_settings(broker_url)  # the login from the environment, as every command
    stop = asyncio.Event()

    async def run() -> None:
        seen = 0
        async with operator_session(settings, "watch") as s:
            for f in topic:
                await s.subscribe(f, qos=1)
            async for msg in s.messages():
                name, doc = _describe(str(msg.topic), bytes(msg.payload), envelopes, topics)
                if as_json:
                    # One compact object a line, flushed, so `watch --json | jq -c` or a log reader
                    # gets each message as it arrives.
                    line = json.dumps({"topic": str(msg.topic), "kind": name, "payload": doc}, default=str)
                    print(line, flush=True)
                else:
                    out.print(f"[bold]{msg.topic}[/] {name} {doc}", highlight=False)
                seen += 1
                if (count and seen >= count) or stop.is_set():
                    return

    async def main() -> None:
        task = asyncio.create_task(run())
        await asyncio.wait([task, asyncio.create_task(stop.wait())], return_when=asyncio.FIRST_COMPLETED)
        task.cancel()

    run_until_signal(main, stop.set)


def _describe(topic: str, payload: bytes, envelopes: Any, topics: Any) -> tuple[str, Any]:
    try:
        spec = topics.parse(topic).spec
    except EdgewireError:
        return "unknown-topic", f"{len(payload)} bytes"
    try:
        message = envelopes.decode(spec.payload, payload)
    except EdgewireError as exc:
        return f"{spec.payload.__name__} (rejected)", str(exc)
    doc = message.model_dump(mode="json")
    for key in ("payload", "data"):
        if key in doc:
            doc[key] = f"<{len(getattr(message, key))} bytes>"
    return spec.payload.__name__, doc
