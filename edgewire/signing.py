"""Ed25519 signatures over model artefacts: the operator signs, every device verifies.

What is signed is the artefact's SHA-256 digest (the same digest the manifest carries), so a
device verifies the signature once the streamed file's hash is known, without holding the file
in memory. Public keys travel as base64 of their DER SubjectPublicKeyInfo: one line that fits in
a YAML fleet file and in the device's etc/edgewire/fleet-signing.pub.
"""

from __future__ import annotations

import base64
import binascii

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from edgewire.errors import EdgewireError


class SignatureError(EdgewireError):
    """A key that cannot be read, or a signature that does not match."""


def generate() -> tuple[bytes, str]:
    """A new fleet key pair: (private key as PKCS#8 PEM, public key as one base64 line)."""
    key = Ed25519PrivateKey.generate()
    private = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return private, public_line(key.public_key())


def public_line(key: Ed25519PublicKey) -> str:
    der = key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return base64.b64encode(der).decode()


def load_private(pem: bytes) -> Ed25519PrivateKey:
    try:
        key = serialization.load_pem_private_key(pem, password=None)
    except (ValueError, TypeError) as exc:
        raise SignatureError(f"not a readable private key (PKCS#8 PEM expected): {exc}") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise SignatureError(f"the private key is {type(key).__name__}, not Ed25519")
    return key


def load_public(text: str) -> Ed25519PublicKey:
    """A public key from its base64 DER line (what `edgewire keys` writes) or from PEM."""
    text = text.strip()
    try:
        if text.startswith("-----BEGIN"):
            key = serialization.load_pem_public_key(text.encode())
        else:
            key = serialization.load_der_public_key(base64.b64decode(text, validate=True))
    except (ValueError, TypeError, binascii.Error) as exc:
        raise SignatureError(f"not a readable public key (base64 DER or PEM expected): {exc}") from None
    if not isinstance(key, Ed25519PublicKey):
        raise SignatureError(f"the public key is {type(key).__name__}, not Ed25519")
    return key


def sign(private: Ed25519PrivateKey, sha256_digest: bytes) -> bytes:
    if len(sha256_digest) != 32:
        raise SignatureError(f"expected a 32-byte SHA-256 digest, got {len(sha256_digest)} bytes")
    return private.sign(sha256_digest)


def verify(public: Ed25519PublicKey, sha256_digest: bytes, signature: bytes) -> None:
    """Return quietly when ``signature`` is the fleet key's over ``sha256_digest``; raise otherwise."""
    try:
        public.verify(signature, sha256_digest)
    except InvalidSignature:
        raise SignatureError("signature does not match this artefact and the fleet's public key") from None
