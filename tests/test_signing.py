"""Ed25519 over the artefact digest: made by `edgewire keys`, checked the way devices will."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from edgewire.cli import app
from edgewire.signing import SignatureError, generate, load_private, load_public, public_line, sign, verify

ROOT = Path(__file__).resolve().parents[1]


def test_sign_and_verify_round_trip_and_refuse_tampering() -> None:
    private_pem, public = generate()
    key = load_private(private_pem)
    digest = hashlib.sha256(b"model bytes").digest()
    signature = sign(key, digest)
    verify(load_public(public), digest, signature)
    with pytest.raises(SignatureError, match="does not match"):
        verify(load_public(public), hashlib.sha256(b"other bytes").digest(), signature)
    with pytest.raises(SignatureError, match="does not match"):
        verify(load_public(generate()[1]), digest, signature)
    with pytest.raises(SignatureError, match="32-byte"):
        sign(key, b"short")


@pytest.mark.parametrize("bad", ["", "not base64!", "AAAA", "-----BEGIN PUBLIC KEY-----\nxx\n-----END PUBLIC KEY-----"])
def test_unreadable_public_keys_are_refused(bad: str) -> None:
    with pytest.raises(SignatureError, match="not a readable public key"):
        load_public(bad)


def test_fleet_template_key_is_an_ed25519_public_key() -> None:
    fleet = yaml.safe_load((ROOT / "firmware_configs" / "fleet.example.yaml").read_text())
    assert public_line(load_public(fleet["signing_public_key"])) == fleet["signing_public_key"]


def test_keys_command_writes_a_private_key_only_the_owner_reads(tmp_path: Path) -> None:
    runner = CliRunner()
    made = runner.invoke(app, ["keys", "generate", "--out", str(tmp_path)])
    assert made.exit_code == 0, made.output
    private = tmp_path / "fleet-signing.key"
    assert private.stat().st_mode & 0o777 == 0o600
    public = (tmp_path / "fleet-signing.pub").read_text().strip()
    shown = runner.invoke(app, ["keys", "show", "--key", str(private)])
    assert shown.output.strip() == public
    again = runner.invoke(app, ["keys", "generate", "--out", str(tmp_path)])
    assert again.exit_code == 2 and "exists" in again.output
    assert (tmp_path / "fleet-signing.pub").read_text().strip() == public
