"""The ``edgewire`` command: one entry point for devices, brokers, models and operators.

Each command group lives in its own module of this package; this one only assembles them.
"""

from __future__ import annotations

import logging
from typing import Annotated

import typer

from edgewire.cli import broker, cloud, demo, device, discover, flash, keys, model, monitor, trace, watch
from edgewire.cli import config as remote_config

app = typer.Typer(help="edgewire: MQTT-first AI inference for fleets of edge devices.", no_args_is_help=True)


@app.callback()
def _main(
    log_level: Annotated[str, typer.Option("--log-level", help="debug, info, warning or error")] = "warning",
) -> None:
    logging.basicConfig(
        level=getattr(logging, log_level.upper(), logging.WARNING),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


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
