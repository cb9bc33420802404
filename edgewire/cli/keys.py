"""``edgewire keys``: the fleet's model-signing key pair."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from edgewire.cli.common import console, fail, out

keys_app = typer.Typer(help="The fleet's model-signing key pair (Ed25519).", no_args_is_help=True)


@keys_app.command("generate")
def keys_generate(
    out_dir: Annotated[Path, typer.Option("--out", help="folder for fleet-signing.key and fleet-signing.pub")],
    force: Annotated[bool, typer.Option("--force", help="replace an existing key pair")] = False,
) -> None:
    """Make the fleet's signing key pair; the .pub line goes into the fleet file (signing_public_key)."""
    import os

    from edgewire.signing import generate

    private_path, public_path = out_dir / "fleet-signing.key", out_dir / "fleet-signing.pub"
    if private_path.exists() and not force:
        raise fail(FileExistsError(f"{private_path} exists; models signed with it would stop verifying (--force)"))
    private, public = generate()
    out_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(private_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(private)
    public_path.write_text(public + "\n")
    console.print(f"private key {private_path} (keep it off devices); public key {public_path}:")
    out.print(public, highlight=False)


@keys_app.command("show")
def keys_show(key: Annotated[Path, typer.Option("--key", help="private key file")]) -> None:
    """Print the public line of a private key (to put into a fleet file)."""
    from edgewire.signing import SignatureError, load_private, public_line

    try:
        out.print(public_line(load_private(key.read_bytes()).public_key()), highlight=False)
    except (OSError, SignatureError) as exc:
        raise fail(exc) from None
