"""The fleet's certificate authority for mutual TLS: one CA per fleet, a client certificate per
broker user (CN = device id or username), the broker's server certificate, and the list of
certificates no longer trusted.

The CA lives in one folder next to the fleet file (its key readable by its owner only); it is
created on the first ``edgewire flash`` that needs it. Everything here is computed in memory
and handed back as files to write (:attr:`FleetCA.pending`), so ``flash --dry-run`` writes
nothing and a run that fails validation leaves the folder as it was. A certificate already
issued is reused while it is signed by this CA, names the same subject and has more than
:data:`RENEW_BEFORE` left, so flashing again changes nothing; a certificate replaced before its
time (:meth:`FleetCA.client` with ``reissue``) or one of a user no longer in the fleet is
listed in the revocation list both brokers read.
"""

from __future__ import annotations

import datetime
import ipaddress
from collections.abc import Iterable
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from edgewire.errors import ConfigError

CA_CERT = "ca.pem"
CA_KEY = "ca.key"
CRL = "crl.pem"
ISSUED = "issued"  # issued/<name>.pem and issued/<name>.key: the certificate in use per user
REVOKED = "revoked"  # revoked/<serial>.pem: certificates replaced before their time
SERVER = "server"  # server.pem and server.key: the broker's certificate (not a login, not under issued/)
CA_DAYS = 3650
#: An issued certificate this close to its end is replaced at the next flash.
RENEW_BEFORE = datetime.timedelta(days=30)


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc)


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def common_name(cert: x509.Certificate) -> str | None:
    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(names[0].value) if names else None


def _valid_name(name: str) -> bool:
    return bool(name) and all(c.isalnum() or c in "._-" for c in name) and not name.startswith(".")


class FleetCA:
    """A fleet's CA folder, read once, with what a flash adds to it kept in :attr:`pending`."""

    def __init__(self, folder: Path, *, fleet: str, days: int) -> None:
        self.folder = folder
        self.days = days
        self.pending: dict[str, bytes] = {}
        cert_pem, key_pem = self._read(CA_CERT), self._read(CA_KEY)
        if (cert_pem is None) != (key_pem is None):
            missing = CA_KEY if key_pem is None else CA_CERT
            raise ConfigError(
                f"{folder}: has one of {CA_CERT} and {CA_KEY} but not {missing}; restore it from a backup"
            )
        if cert_pem is None or key_pem is None:
            self._key = ec.generate_private_key(ec.SECP256R1())
            now = _now()
            self.cert = (
                x509.CertificateBuilder()
                .subject_name(_name(f"{fleet} fleet CA"))
                .issuer_name(_name(f"{fleet} fleet CA"))
                .public_key(self._key.public_key())
                .serial_number(x509.random_serial_number())
                .not_valid_before(now - datetime.timedelta(minutes=5))
                .not_valid_after(now + datetime.timedelta(days=CA_DAYS))
                .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
                .add_extension(
                    x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True
                )
                .sign(self._key, hashes.SHA256())
            )
            self.pending[CA_CERT] = _cert_pem(self.cert)
            self.pending[CA_KEY] = _key_pem(self._key)
        else:
            try:
                self.cert = x509.load_pem_x509_certificate(cert_pem)
                key = serialization.load_pem_private_key(key_pem, password=None)
            except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
                raise ConfigError(f"{folder}: cannot read the fleet CA: {exc}") from None
            if not isinstance(key, ec.EllipticCurvePrivateKey):
                raise ConfigError(f"{folder}/{CA_KEY}: expected an EC key (as flash creates)")
            self._key = key

    @property
    def cert_pem(self) -> bytes:
        return _cert_pem(self.cert)

    def _read(self, rel: str) -> bytes | None:
        if rel in self.pending:
            return self.pending[rel]
        path = self.folder / rel
        return path.read_bytes() if path.is_file() else None

    def _signed_by_us(self, cert: x509.Certificate) -> bool:
        try:
            cert.verify_directly_issued_by(self.cert)
        except (ValueError, TypeError, InvalidSignature):
            return False
        return True

    def _current(self, stem: str) -> tuple[x509.Certificate, bytes, bytes] | None:
        cert_pem, key_pem = self._read(f"{stem}.pem"), self._read(f"{stem}.key")
        if cert_pem is None or key_pem is None:
            return None
        try:
            cert = x509.load_pem_x509_certificate(cert_pem)
        except ValueError:
            return None
        return cert, cert_pem, key_pem

    def _issue(self, stem: str, name: str, *, server_names: list[str] | None = None) -> tuple[bytes, bytes]:
        key = ec.generate_private_key(ec.SECP256R1())
        now = _now()
        builder = (
            x509.CertificateBuilder()
            .subject_name(_name(name))
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(min(now + datetime.timedelta(days=self.days), self.cert.not_valid_after_utc))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        )
        if server_names is None:
            builder = builder.add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        else:
            alt: list[x509.GeneralName] = []
            for host in server_names:
                try:
                    alt.append(x509.IPAddress(ipaddress.ip_address(host)))
                except ValueError:
                    alt.append(x509.DNSName(host))
            builder = builder.add_extension(x509.SubjectAlternativeName(alt), critical=False).add_extension(
                x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False
            )
        cert = builder.sign(self._key, hashes.SHA256())
        cert_pem, key_pem = _cert_pem(cert), _key_pem(key)
        self.pending[f"{stem}.pem"] = cert_pem
        self.pending[f"{stem}.key"] = key_pem
        return cert_pem, key_pem

    def _usable(self, cert: x509.Certificate, name: str) -> bool:
        return (
            self._signed_by_us(cert)
            and common_name(cert) == name
            and cert.not_valid_after_utc - _now() > RENEW_BEFORE
            and not self._is_revoked(cert.serial_number)
        )

    def _is_revoked(self, serial: int) -> bool:
        return (self.folder / REVOKED / f"{serial:x}.pem").exists() or f"{REVOKED}/{serial:x}.pem" in self.pending

    def _retire(self, cert: x509.Certificate, cert_pem: bytes) -> None:
        """Keep a replaced certificate under revoked/, so the revocation list names it."""
        if self._signed_by_us(cert) and cert.not_valid_after_utc > _now():
            self.pending[f"{REVOKED}/{cert.serial_number:x}.pem"] = cert_pem

    def client(self, name: str, *, reissue: bool = False) -> tuple[bytes, bytes]:
        """(certificate, key) in PEM for the login ``name`` (CN = name): the one issued before
        while it is still good, else a new one (and the old one revoked)."""
        if not _valid_name(name):
            raise ConfigError(f"{name!r} cannot be a certificate's name (letters, digits, . _ -)")
        current = self._current(f"{ISSUED}/{name}")
        if current is not None:
            cert, cert_pem, key_pem = current
            if not reissue and self._usable(cert, name):
                return cert_pem, key_pem
            self._retire(cert, cert_pem)
        return self._issue(f"{ISSUED}/{name}", name)

    def server(self, names: list[str]) -> tuple[bytes, bytes]:
        """The broker's (certificate, key), valid for ``names`` (host names or IP addresses)."""
        if not names or not all(names):
            raise ConfigError("the broker's certificate needs at least one name (broker_names)")
        current = self._current(SERVER)
        if current is not None:
            cert, cert_pem, key_pem = current
            try:
                alt = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
                have = [str(v) for v in alt.get_values_for_type(x509.DNSName)]
                have += [str(v) for v in alt.get_values_for_type(x509.IPAddress)]
            except x509.ExtensionNotFound:
                have = []
            if self._usable(cert, names[0]) and sorted(have) == sorted(names):
                return cert_pem, key_pem
        return self._issue(SERVER, names[0], server_names=names)

    def revocation_list(self, keep: Iterable[str]) -> bytes:
        """The CRL both brokers check: every certificate replaced before its time, and the
        current certificate of every issued name not in ``keep`` (users taken out of the
        fleet). Reused while it names the same serials, so a second flash changes nothing."""
        keep = set(keep)
        serials: set[int] = set()
        revoked_dir = self.folder / REVOKED
        names = [f"{REVOKED}/{p.name}" for p in revoked_dir.glob("*.pem")] if revoked_dir.is_dir() else []
        names += [rel for rel in self.pending if rel.startswith(f"{REVOKED}/")]
        issued_dir = self.folder / ISSUED
        issued = {p.stem for p in issued_dir.glob("*.pem")} if issued_dir.is_dir() else set()
        issued |= {Path(rel).stem for rel in self.pending if rel.startswith(f"{ISSUED}/")}
        names += [f"{ISSUED}/{n}.pem" for n in issued - keep]
        for rel in set(names):
            pem = self._read(rel)
            if pem is None:
                continue
            try:
                cert = x509.load_pem_x509_certificate(pem)
            except ValueError:
                continue
            if self._signed_by_us(cert):
                serials.add(cert.serial_number)
        old = self._read(CRL)
        if old is not None:
            try:
                crl = x509.load_pem_x509_crl(old)
                if (
                    crl.is_signature_valid(self._key.public_key())
                    and {r.serial_number for r in crl} == serials
                    and crl.next_update_utc is not None
                    and crl.next_update_utc - _now() > RENEW_BEFORE
                ):
                    return old
            except ValueError:
                pass
        now = _now()
        builder = (
            x509.CertificateRevocationListBuilder()
            .issuer_name(self.cert.subject)
            .last_update(now - datetime.timedelta(minutes=5))
            .next_update(now + datetime.timedelta(days=self.days))
        )
        for serial in sorted(serials):
            builder = builder.add_revoked_certificate(
                x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(now).build()
            )
        pem = builder.sign(self._key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)
        self.pending[CRL] = pem
        return pem
