"""``edgewire edge``: the device agent."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape

from edgewire.cli.common import console, fail, out, run_until_signal
from edgewire.errors import EdgewireError

edge_app = typer.Typer(help="Run the device agent.", no_args_is_help=True)


def _result_line(r: Any, truth: int | None = None) -> str:
    mark = ""
    if truth is not None and r.prediction is not None:
        mark = " [green]✓[/]" if r.prediction.label == str(truth) else f" [red]✗ (truth {truth})[/]"
    hard = f" [yellow]hard: {', '.join(r.reasons)}[/]" if r.reasons else ""
    if r.prediction is not None:
        answer = f"{escape(r.prediction.label)} ({r.prediction.confidence:.2f})"
    else:
        answer = f"{len(r.detections or [])} objects"
    return (
        f"{r.device_id} #{r.seq:<5} {escape(r.source_ref):<16} → {answer} "
        f"{r.state.lower()} {r.latency_ms:6.1f} ms{hard}{mark}"
    )


@edge_app.command("run")
def edge_run(
    config: Annotated[Path, typer.Option("--config", "-c", help="device configuration file (YAML)")],
    print_results: Annotated[bool, typer.Option("--print/--quiet", help="print every result")] = False,
) -> None:
    """Run a device agent from its configuration until its source ends or it is interrupted."""
    from edgewire.config import load_device_config
    from edgewire.edge.agent import EdgeAgent
    from edgewire.edge.remote_config import boot_config
    from edgewire.edge.state import DeviceState
    from edgewire.metrics import serve

    try:
        file_cfg = load_device_config(config)
        state = DeviceState.beside(config)
        cfg = boot_config(file_cfg, state)  # over-the-air settings accepted before, restart ones included
        hook = (lambda r: out.print(_result_line(r), highlight=False)) if print_results else None
        agent = EdgeAgent(cfg, on_result=hook, boot_config=file_cfg, state=state)
    except EdgewireError as exc:
        raise fail(exc) from None
    if cfg.metrics_port is not None:
        serve(cfg.metrics_port, cfg.metrics_host)
    console.print(
        f"device {cfg.device_id}: model {agent.meta.name} {agent.meta.version}, broker {cfg.broker.url}, "
        f"mode {agent.mode}" + (" (no cloud configured)" if agent.mode == "local-only" else "")
    )
    summary = run_until_signal(agent.run, agent.stop)
    console.print(
        f"done: {summary.completed} frames in {summary.elapsed_s:.2f} s ({summary.fps:.0f} fps), "
        f"{summary.hard} hard, {summary.failed} failed, {summary.rejected} messages rejected"
    )
