"""``edgewire demo``, ``edgewire models`` and ``edgewire eval``: the demo system and its models."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Annotated

import numpy as np
import typer
from rich.console import Console

from edgewire.cli.common import console, fail, out
from edgewire.demo.run import DEFAULT_CLOUD_DEADLINE_MS
from edgewire.errors import EdgewireError

models_app = typer.Typer(help="Build the demo's model artefacts.", no_args_is_help=True)


@models_app.command("demo")
def models_demo(
    out_dir: Annotated[Path, typer.Option("--out", help="folder for models/ and frames/")] = Path("demo-data"),
    image_format: Annotated[str, typer.Option("--format", help="jpg or png")] = "jpg",
) -> None:
    """Train the demo edge and cloud models, the digit detector and its crop classifier on
    scikit-learn's digits, and write the held-out frames (the detect models are reused while their
    code and libraries are unchanged)."""
    from edgewire.demo.crop_classifier import build_crop_classifier
    from edgewire.demo.detector import build_detector
    from edgewire.demo.models import build_demo

    arts = build_demo(out_dir, image_format=image_format, progress=lambda m: console.print(f"… {m}"))
    out.print(f"edge model   {arts.edge_model}  accuracy {arts.edge_accuracy:.3f}")
    out.print(f"cloud model  {arts.cloud_model}  accuracy {arts.cloud_accuracy:.3f}")
    out.print(f"frames       {arts.frames_dir}")
    console.print("… the detect demo's detector and crop classifier (cached by content)")
    for kind, built in (
        ("detector", build_detector(arts.edge_model.parent)),
        ("crops", build_crop_classifier(arts.edge_model.parent)),
    ):
        how = "reused" if built.cached else f"trained in {built.train_seconds:.1f} s"
        out.print(f"{kind:<12} {built.path}  {how}")


def demo(
    out_dir: Annotated[Path, typer.Option("--out", help="where demo models and frames are kept")] = Path("demo-data"),
    devices: Annotated[int, typer.Option(help="simulated devices")] = 2,
    seconds: Annotated[float, typer.Option(help="run this long, looping the frames (0: play them once)")] = 0.0,
    fps: Annotated[float, typer.Option(help="frames per second each camera plays")] = 30.0,
    cloud: Annotated[bool, typer.Option("--cloud/--no-cloud", help="start Triton and the bridge")] = True,
    cloud_deadline_ms: Annotated[
        int, typer.Option(min=1, help="how long a device waits for the cloud before its own answer stands")
    ] = DEFAULT_CLOUD_DEADLINE_MS,
    as_json: Annotated[bool, typer.Option("--json", help="no live view; end with one JSON summary line")] = False,
    task: Annotated[
        str,
        typer.Option(
            help="classify: devices classify single digits; detect: a device detects digits in camera sequences "
            "and the cloud relabels the uncertain ones (scored by mAP@0.5)"
        ),
    ] = "classify",
) -> None:
    """Embedded broker, embedded cloud (Triton + bridge) and N devices playing the demo digits."""
    if task == "detect":
        _demo_detect(out_dir, as_json)
        return
    if task != "classify":
        raise fail(ValueError(f"--task must be classify or detect, not {task!r}"))
    from edgewire.demo.run import run_demo

    # Piped or logged output has no terminal to fit: give it room rather than wrap at 80 columns.
    view = out if out.is_terminal else Console(width=160)
    try:
        summary = asyncio.run(
            run_demo(
                out_dir,
                devices=devices,
                seconds=seconds,
                fps=fps,
                cloud=cloud,
                cloud_deadline_ms=cloud_deadline_ms,
                console=view,
                quiet=as_json,
            )
        )
    except EdgewireError as exc:
        raise fail(exc) from None
    if as_json:
        print(json.dumps(summary))


def _demo_detect(out_dir: Path, as_json: bool) -> None:
    from edgewire.demo.detect_run import run_detect_demo, summary_text

    say = None if as_json else (lambda m: console.print(m, highlight=False))
    try:
        summary = asyncio.run(run_detect_demo(out_dir, say=say))
    except EdgewireError as exc:
        raise fail(exc) from None
    if as_json:
        print(json.dumps(summary))
    else:
        out.print(summary_text(summary), highlight=False, soft_wrap=True)


def evaluate(
    data: Annotated[Path, typer.Option("--data", help="demo folder (models/ and frames/)")] = Path("demo-data"),
    lo: Annotated[float, typer.Option("--from", help="lowest min_confidence threshold")] = 0.3,
    hi: Annotated[float, typer.Option("--to", help="highest threshold")] = 0.99,
    step: Annotated[float, typer.Option(help="threshold step")] = 0.05,
    budget: Annotated[float, typer.Option(help="largest escalation rate you can afford (0-1)")] = 0.2,
    as_json: Annotated[bool, typer.Option("--json", help="print JSON instead of a table")] = False,
) -> None:
    """Replay the labelled demo set through the judge at many thresholds: accuracy vs escalation and bytes."""
    from rich.table import Table

    from edgewire.demo.evaluate import replay
    from edgewire.demo.models import build_demo, label_of

    arts = build_demo(data)
    frames = sorted(p for p in arts.frames_dir.iterdir() if p.suffix in (".jpg", ".png"))
    result = replay(frames, label_of, arts.edge_model, arts.cloud_model)
    thresholds = [round(t, 4) for t in np.arange(lo, hi + 1e-9, step)]
    rows = result.table(thresholds)
    best = result.best_within(budget, thresholds)
    if as_json:
        print(
            json.dumps(
                {
                    "frames": len(frames),
                    "accuracy_edge": result.edge_accuracy,
                    "accuracy_cloud": result.cloud_accuracy,
                    "rows": [r.__dict__ for r in rows],
                    "budget": budget,
                    "best": best.__dict__ if best else None,
                }
            )
        )
        return
    table = Table(
        title=f"{len(frames)} labelled frames · edge {result.edge_accuracy:.1%} · cloud {result.cloud_accuracy:.1%}"
    )
    for col in ("min_confidence", "escalated", "joint accuracy", "KiB sent up"):
        table.add_column(col, justify="right")
    for r in rows:
        mark = " ◀" if best is not None and r.threshold == best.threshold else ""
        table.add_row(
            f"{r.threshold:.2f}{mark}", f"{r.escalation_rate:.1%}", f"{r.accuracy:.1%}", f"{r.bytes_sent / 1024:.0f}"
        )
    out.print(table)
    if best is None:
        out.print(f"no threshold keeps escalation within {budget:.0%}")
    else:
        out.print(
            f"within a {budget:.0%} escalation budget: judge.min_confidence = {best.threshold:.2f} "
            f"({best.escalation_rate:.1%} escalated, {best.accuracy:.1%} accurate)"
        )
