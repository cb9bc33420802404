"""The ``edgewire`` command: one entry point for devices, brokers, models and operators.

Each command group lives in its own module of this package; this one only assembles them.
"""

from __future__ import annotations

from typing import Annotated

import typer

from edgewire import logs
from edgewire.cli import broker, cloud, demo, device, discover, flash, keys, model, monitor, sim, trace, watch
from edgewire.cli import config as remote_config

app = typer.Typer(help="edgewire: MQTT-first AI inference for fleets of edge devices.", no_args_is_help=True)


@app.callback()
def _main(
    log_level: Annotated[str, typer.Option("--log-level", help="debug, info, warning or error")] = "warning",
    log_format: Annotated[
        str, typer.Option("--log-format", help="text, or json: one object a line with device_id, trace_id, model")
    ] = "text",
) -> None:
    if log_format not in ("text", "json"):
        raise typer.BadParameter("use text or json", param_hint="--log-format")
    logs.configure(log_level, log_format)


app.command()(broker.broker)
app.add_typer(device.edge_app, name="edge")
app.command()(cloud.bridge)
app.command()(cloud.cloud)
app.add_typer(demo.models_app, name="models")
app.command()(watch.watch)
app.command()(trace.trace)
app.command()(monitor.monitor)
app.command()(discover.discover)
app.add_typer(remote_config.config_app, name="config")
app.command()(flash.flash)
app.add_typer(keys.keys_app, name="keys")
app.command()(model.distributor)
app.add_typer(model.model_app, name="model")
app.command()(demo.demo)
app.command("eval")(demo.evaluate)
app.command()(sim.sim)
