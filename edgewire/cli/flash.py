"""``edgewire flash``: a fleet template rendered into each device's files."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from edgewire.cli.common import console, fail, out
from edgewire.errors import EdgewireError


def flash(
    fleet_file: Annotated[Path, typer.Option("--fleet", help="fleet template (YAML)")],
    out_dir: Annotated[Path | None, typer.Option("--out", help="one folder per device under this one")] = None,
    target: Annotated[Path | None, typer.Option("--target", help="a device's root filesystem (one device)")] = None,
    devices: Annotated[str | None, typer.Option("--devices", help="glob on device ids, e.g. 'cam-*'")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="print the diff, write nothing")] = False,
    broker_out: Annotated[
        Path | None,
        typer.Option("--broker-out", help="also write the broker's files here: passwd, acl, roles.yaml, credentials/"),
    ] = None,
    reissue: Annotated[
        str | None,
        typer.Option(
            "--reissue",
            help="client certificates: issue new ones for these users (glob) and revoke their old ones",
        ),
    ] = None,
) -> None:
    """Render a fleet template into each device's files: validated first, written atomically."""
    from rich.progress import Progress

    from edgewire.fleet import flash as flasher

    if (out_dir is None) == (target is None):
        raise fail(ValueError("give exactly one of --out DIR or --target ROOTFS"))
    try:
        ca = flasher.load_ca(fleet_file)
        rendered = flasher.render(fleet_file, devices, ca=ca, reissue=reissue)
        broker_files = flasher.render_broker(fleet_file, ca=ca, reissue=reissue) if broker_out is not None else None
    except EdgewireError as exc:
        raise fail(exc) from None
    if target is not None and len(rendered) != 1:
        raise fail(ValueError(f"--target writes one device; {len(rendered)} match (narrow with --devices)"))
    root = out_dir if out_dir is not None else target
    assert root is not None
    changes = list(flasher.plan(rendered, root, per_device_dirs=out_dir is not None))
    if broker_files is not None and broker_out is not None:
        changes += flasher.plan([broker_files], broker_out, per_device_dirs=False)
    changes += flasher.plan(flasher.ca_files(ca), root)  # a new CA, new certificates, the revocation list
    if dry_run:
        for change in changes:
            out.print(change.diff(), highlight=False, markup=False, end="")
        console.print(f"dry run: {len(changes)} file(s) of {len(rendered)} device(s) would change")
        return
    if not changes:
        console.print(f"{len(rendered)} device(s) rendered; nothing changed")
        return
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task("writing", total=len(changes))
        flasher.write(changes, lambda _: progress.advance(task))
    touched = len({c.device_id for c in changes})
    console.print(f"{len(rendered)} device(s) rendered; {len(changes)} file(s) written for {touched} device(s)")
