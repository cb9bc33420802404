"""TLS for every MQTT client: the broker's certificate checked against the fleet's CA and its
name against the host connected to, and optionally a client certificate (mutual TLS).

One place builds the context, so a device, the bridge, the distributor and every command check
the broker the same way; a broker whose certificate the CA did not sign is refused at the
handshake with the reason in the session's error ("certificate verify failed").
"""

from __future__ import annotations

import ssl
from pathlib import Path

from edgewire.errors import ConfigError


def client_context(ca_file: Path | None, cert_file: Path | None = None, key_file: Path | None = None) -> ssl.SSLContext:
    """A client context: TLS 1.2 at least, the server verified (by ``ca_file``, or the system's
    CAs without one) and its name checked; with ``cert_file`` and ``key_file``, our certificate."""
    if (cert_file is None) != (key_file is None):
        raise ConfigError("a client certificate needs both cert_file and key_file")
    try:
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(ca_file) if ca_file else None)
        if cert_file is not None and key_file is not None:
            context.load_cert_chain(str(cert_file), str(key_file))
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"TLS settings: {exc}") from None
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.check_hostname = True
    context.verify_mode = ssl.CERT_REQUIRED
    return context


def server_context(
    cert_file: Path,
    key_file: Path,
    *,
    ca_file: Path | None = None,
    crl_file: Path | None = None,
    require_certificate: bool = False,
) -> ssl.SSLContext:
    """A broker's context: TLS 1.2 at least, our certificate, and with ``ca_file`` the clients'
    certificates checked against it (required with ``require_certificate``: mutual TLS) and,
    with ``crl_file``, against the fleet's revocation list."""
    if require_certificate and ca_file is None:
        raise ConfigError("require_certificate needs the CA that signed the clients' certificates (cafile)")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(str(cert_file), str(key_file))
        if ca_file is not None:
            context.load_verify_locations(cafile=str(ca_file))
        if crl_file is not None:
            context.load_verify_locations(cafile=str(crl_file))
            context.verify_flags |= ssl.VERIFY_CRL_CHECK_LEAF
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"TLS settings: {exc}") from None
    if require_certificate:
        context.verify_mode = ssl.CERT_REQUIRED
    else:
        context.verify_mode = ssl.CERT_OPTIONAL if ca_file is not None else ssl.CERT_NONE
    return context


def peer_common_name(ssl_object: ssl.SSLObject | ssl.SSLSocket | None) -> str | None:
    """The CN of the certificate the other side presented and we verified; None without one."""
    if ssl_object is None:
        return None
    cert = ssl_object.getpeercert()
    for rdn in (cert or {}).get("subject", ()):
        for key, value in rdn:
            if key == "commonName":
                return str(value)
    return None
