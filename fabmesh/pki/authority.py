"""The mesh's own certificate authority, as pure functions over PEM text.

Every fabmesh node authenticates its IKEv2 peers with X.509 certificates issued by one
mesh CA, so the operator has to mint that CA, issue a leaf per node, check what is already
stored, and decide when a leaf must be reissued. Keeping those steps here as pure
functions (PEM in, PEM or a decision out; no Kubernetes, no files, no clock of its own)
lets the reconcilers stay thin and lets every rule about names, addresses, lifetimes and
renewal be tested directly. Only the ``cryptography`` package is used; nothing shells out.
"""

from __future__ import annotations

import base64
import ipaddress
import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from enum import StrEnum

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes, PublicKeyTypes
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from cryptography.x509.verification import PolicyBuilder, Store, VerificationError

__all__ = [
    "CLOCK_SKEW",
    "CertInfo",
    "KeyPair",
    "PKIError",
    "RenewReason",
    "ca_needs_rotation",
    "describe",
    "issue_leaf",
    "issued_by",
    "key_matches_cert",
    "new_ca",
    "public_key_b64",
    "public_key_sha256",
    "renewal_reason",
    "verify_leaf",
]

# Certificates start this long before "now" so a peer whose clock runs a little behind
# still accepts them.
CLOCK_SKEW = timedelta(minutes=5)
ORGANIZATION = "fabmesh"
# X.509 caps a subject commonName at 64 characters (ub-common-name).
MAX_COMMON_NAME = 64
# A Kubernetes object name: an RFC 1123 subdomain.
_DNS_NAME = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")

Pem = str | bytes
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IssuerKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey


class PKIError(ValueError):
    """Input that cannot be turned into, or accepted as, a mesh certificate.

    ``field`` names what was wrong (``tls.crt``, ``ca.key``, ``addresses``, ...) so callers
    can point the user at it; ``reason`` says what was wrong with it.
    """

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"{field}: {reason}")
        self.field = field
        self.reason = reason

    def __reduce__(self) -> tuple[type[PKIError], tuple[str, str]]:
        return (type(self), (self.field, self.reason))


@dataclass(frozen=True, repr=False)
class KeyPair:
    """A certificate and its PKCS#8 private key, both PEM. The repr never shows the key."""

    cert_pem: str
    key_pem: str

    def __repr__(self) -> str:
        return f"KeyPair(cert={_subject_label(self.cert_pem)}, key=<redacted>)"


@dataclass(frozen=True)
class CertInfo:
    """What an operator or a renewal decision needs to know about one certificate.

    ``ip_addresses`` are in canonical ``ipaddress`` form; ``fingerprint_sha256`` is the
    lowercase hex SHA-256 of the DER encoding, without separators.
    """

    common_name: str
    dns_names: tuple[str, ...]
    ip_addresses: tuple[str, ...]
    not_before: datetime
    not_after: datetime
    serial: int
    fingerprint_sha256: str


class RenewReason(StrEnum):
    """Why a node's leaf certificate has to be (re)issued (a ``str`` too, for logs and events)."""

    MISSING = "missing"
    UNPARSEABLE = "unparseable"
    WRONG_CA = "wrong_ca"
    NAME_CHANGED = "name_changed"
    ADDRESSES_CHANGED = "addresses_changed"
    EXPIRING = "expiring"
    KEY_MISMATCH = "key_mismatch"
    NODE_RECREATED = "node_recreated"  # the Secret belongs to an earlier Node of the same name

    @property
    def keeps_key(self) -> bool:
        """Whether the new leaf may certify the key already in use.

        A renewal (expiry, new addresses, a CA roll) is not a compromise: keeping the key lets every
        peer, which pins the leaf, replace its credentials without ending the tunnel (it compares the
        pinned key). A missing, unreadable or mismatched key, or a Node that was deleted and made
        again, gets a new key: the old one is then refused by every peer within one resync.
        """
        return self in (RenewReason.WRONG_CA, RenewReason.NAME_CHANGED, RenewReason.ADDRESSES_CHANGED,
                        RenewReason.EXPIRING)


def new_ca(
    common_name: str = "fabmesh-ca", *, now: datetime, lifetime: timedelta = timedelta(days=3650)
) -> KeyPair:
    """Mint a self-signed ECDSA P-256 mesh CA that may sign leaves but no further CAs."""
    _check_common_name("common_name", common_name)
    _check_lifetime(lifetime)
    start = _utc(now)
    key = ec.generate_private_key(ec.SECP256R1())
    subject = _subject(common_name)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start - CLOCK_SKEW)
        .not_valid_after(start + lifetime)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(key_cert_sign=True, crl_sign=True), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return KeyPair(cert_pem=_cert_pem(cert), key_pem=_key_pem(key))


def issue_leaf(
    ca: KeyPair,
    *,
    name: str,
    addresses: Sequence[str],
    now: datetime,
    lifetime: timedelta = timedelta(days=365),
    key_pem: str | None = None,
) -> KeyPair:
    """Issue a node's IKE certificate: CN and DNS SAN ``name``, an IP SAN per address.

    ``key_pem`` renews: the leaf certifies that existing (ECDSA P-256) key instead of a new one.
    The leaf never outlives the CA: its end is cut to the CA's end when needed.
    """
    _check_name(name)
    ips = _canonical_addresses(addresses)
    _check_lifetime(lifetime)
    ca_cert, ca_key = _issuer(ca)
    start = _utc(now)
    _check_still_valid(ca_cert, start)
    key = ec.generate_private_key(ec.SECP256R1()) if key_pem is None else _leaf_key(key_pem)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_subject(name))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start - CLOCK_SKEW)
        .not_valid_after(min(start + lifetime, ca_cert.not_valid_after_utc))
        .add_extension(_subject_alt_name(name, ips), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(digital_signature=True), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
            critical=False,
        )
        .add_extension(_authority_key_id(ca_cert), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    return KeyPair(cert_pem=_cert_pem(cert), key_pem=_key_pem(key))


def describe(cert_pem: Pem) -> CertInfo:
    """Summarise a PEM certificate; raise PKIError(field="tls.crt") if it is not one."""
    return _describe(_load_cert(cert_pem, "tls.crt"), "tls.crt")


def verify_leaf(ca_cert_pem: Pem, leaf_cert_pem: Pem, *, now: datetime) -> None:
    """Raise PKIError unless the leaf was issued by this CA and both are valid at ``now``."""
    ca_cert = _load_cert(ca_cert_pem, "ca.crt")
    leaf = _load_cert(leaf_cert_pem, "tls.crt")
    at = _utc(now)
    _check_within_validity(leaf, at)
    _check_issuer_name(ca_cert, leaf)
    _check_chain(ca_cert, leaf, at)


def issued_by(ca_cert_pem: Pem, leaf_cert_pem: Pem) -> bool:
    """Whether the leaf carries this CA's signature (validity is not checked); False if unreadable."""
    try:
        return _issued_by(_load_cert(ca_cert_pem, "ca.crt"), _load_cert(leaf_cert_pem, "tls.crt"))
    except PKIError:
        return False


def public_key_b64(cert_pem: Pem) -> str:
    """The certificate's SubjectPublicKeyInfo, DER in base64 on one line: what peers pin (``Peer.pubkey``)."""
    return base64.b64encode(_public_der(_load_cert(cert_pem, "tls.crt").public_key())).decode()


def public_key_sha256(cert_pem: Pem) -> str:
    """Lowercase hex SHA-256 of the certificate's SubjectPublicKeyInfo (what a renewal keeps)."""
    cert = _load_cert(cert_pem, "tls.crt")
    digest = hashes.Hash(hashes.SHA256())
    digest.update(_public_der(cert.public_key()))
    return digest.finalize().hex()


def key_matches_cert(cert_pem: Pem, key_pem: Pem) -> bool:
    """Whether the private key belongs to the certificate's public key.

    Raises PKIError (field ``tls.crt`` or ``tls.key``) when either cannot be parsed.
    """
    cert = _load_cert(cert_pem, "tls.crt")
    key = _load_key(key_pem, "tls.key")
    return _public_der(cert.public_key()) == _public_der(key.public_key())


def renewal_reason(
    ca: KeyPair | Pem,
    existing: KeyPair | None,
    *,
    name: str,
    addresses: Sequence[str],
    now: datetime,
) -> RenewReason | None:
    """Decide whether ``existing`` can stay as the leaf for ``name``; None means keep it.

    ``ca`` is the CA key pair or just its certificate PEM. A malformed ``name`` or
    ``addresses`` raises PKIError, exactly as issue_leaf would.
    """
    _check_name(name)
    wanted = frozenset(_canonical_addresses(addresses))
    ca_cert = _load_cert(ca.cert_pem if isinstance(ca, KeyPair) else ca, "ca.crt")
    if existing is None:
        return RenewReason.MISSING
    try:
        leaf = _load_cert(existing.cert_pem, "tls.crt")
        info = _describe(leaf, "tls.crt")
        matches = key_matches_cert(existing.cert_pem, existing.key_pem)
    except PKIError:
        return RenewReason.UNPARSEABLE
    return _first_reason(ca_cert, leaf, info, matches, name, wanted, _utc(now))


def ca_needs_rotation(ca: KeyPair, *, now: datetime, leaf_lifetime: timedelta) -> bool:
    """Whether a leaf issued now would be cut short because the CA expires first.

    The operator starts a CA roll when this is true (``fabmesh/operator/ca_roll.py``), so leaves
    are never cut short for long; ``kubectl fabmesh doctor`` also warns 30 days before any
    certificate, the CA's included, expires.
    """
    ca_cert = _load_cert(ca.cert_pem, "ca.crt")
    return ca_cert.not_valid_after_utc < _utc(now) + leaf_lifetime


def _first_reason(
    ca_cert: x509.Certificate,
    leaf: x509.Certificate,
    info: CertInfo,
    key_matches: bool,
    name: str,
    wanted: frozenset[IPAddress],
    now: datetime,
) -> RenewReason | None:
    if not key_matches:
        return RenewReason.KEY_MISMATCH
    if not _issued_by(ca_cert, leaf):
        return RenewReason.WRONG_CA
    if info.common_name != name or info.dns_names != (name,):
        return RenewReason.NAME_CHANGED
    if frozenset(ipaddress.ip_address(ip) for ip in info.ip_addresses) != wanted:
        return RenewReason.ADDRESSES_CHANGED
    if _is_expiring(info, now):
        return RenewReason.EXPIRING
    return None


def _is_expiring(info: CertInfo, now: datetime) -> bool:
    return now >= info.not_before + (info.not_after - info.not_before) * 2 / 3


def _issued_by(ca_cert: x509.Certificate, leaf: x509.Certificate) -> bool:
    try:
        leaf.verify_directly_issued_by(ca_cert)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def _describe(cert: x509.Certificate, field: str) -> CertInfo:
    try:
        sans = _san(cert)
        return CertInfo(
            common_name=_common_name(cert),
            dns_names=tuple(sans.get_values_for_type(x509.DNSName)) if sans else (),
            ip_addresses=tuple(str(ip) for ip in sans.get_values_for_type(x509.IPAddress)) if sans else (),
            not_before=cert.not_valid_before_utc,
            not_after=cert.not_valid_after_utc,
            serial=cert.serial_number,
            fingerprint_sha256=cert.fingerprint(hashes.SHA256()).hex(),
        )
    except ValueError as error:
        raise PKIError(field, f"unreadable certificate contents ({error})") from error


def _san(cert: x509.Certificate) -> x509.SubjectAlternativeName | None:
    try:
        return cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return None


def _common_name(cert: x509.Certificate) -> str:
    attributes = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if not attributes:
        return ""
    value = attributes[0].value
    return value if isinstance(value, str) else value.decode("utf-8", errors="replace")


def _subject_label(cert_pem: str) -> str:
    try:
        return _common_name(_load_cert(cert_pem, "tls.crt")) or "<no CN>"
    except (PKIError, ValueError):
        return "<unparseable>"


def _check_within_validity(cert: x509.Certificate, at: datetime) -> None:
    if at < cert.not_valid_before_utc:
        raise PKIError("tls.crt", f"not valid before {cert.not_valid_before_utc.isoformat()}")
    if at > cert.not_valid_after_utc:
        raise PKIError("tls.crt", f"expired at {cert.not_valid_after_utc.isoformat()}")


def _check_issuer_name(ca_cert: x509.Certificate, leaf: x509.Certificate) -> None:
    if leaf.issuer != ca_cert.subject:
        raise PKIError(
            "tls.crt", f"issued by {leaf.issuer.rfc4514_string()}, not {ca_cert.subject.rfc4514_string()}"
        )


def _check_chain(ca_cert: x509.Certificate, leaf: x509.Certificate, at: datetime) -> None:
    verifier = PolicyBuilder().store(Store([ca_cert])).time(at).build_client_verifier()
    try:
        verifier.verify(leaf, [])
    except VerificationError as error:
        raise PKIError("tls.crt", f"does not verify against the CA ({error})") from error


def _check_still_valid(ca_cert: x509.Certificate, at: datetime) -> None:
    if ca_cert.not_valid_after_utc <= at:
        raise PKIError("ca.crt", f"expired at {ca_cert.not_valid_after_utc.isoformat()}")


def _check_name(name: str) -> None:
    if len(name) > MAX_COMMON_NAME or not _DNS_NAME.fullmatch(name):
        raise PKIError(
            "name", f"{name!r} is not a lowercase DNS name of at most {MAX_COMMON_NAME} characters"
        )


def _check_common_name(field: str, common_name: str) -> None:
    if not 1 <= len(common_name) <= MAX_COMMON_NAME:
        raise PKIError(field, f"must be 1 to {MAX_COMMON_NAME} characters long")


def _check_lifetime(lifetime: timedelta) -> None:
    if lifetime <= timedelta(0):
        raise PKIError("lifetime", f"must be positive, got {lifetime}")


def _canonical_addresses(addresses: Sequence[str]) -> tuple[IPAddress, ...]:
    if isinstance(addresses, str | bytes):
        raise PKIError("addresses", "must be a list of addresses, not a single string")
    return tuple(dict.fromkeys(_parse_address(address) for address in addresses))


def _parse_address(address: str) -> IPAddress:
    try:
        ip = ipaddress.ip_address(address) if isinstance(address, str) else None
    except ValueError:
        ip = None
    if ip is None or getattr(ip, "scope_id", None):
        raise PKIError("addresses", f"{address!r} is not an IPv4 or IPv6 address")
    return ip


def _issuer(ca: KeyPair) -> tuple[x509.Certificate, IssuerKey]:
    ca_cert = _load_cert(ca.cert_pem, "ca.crt")
    ca_key = _load_key(ca.key_pem, "ca.key")
    if not isinstance(ca_key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey):
        raise PKIError("ca.key", f"unsupported key type {type(ca_key).__name__}")
    if _public_der(ca_cert.public_key()) != _public_der(ca_key.public_key()):
        raise PKIError("ca.key", "does not belong to ca.crt")
    return ca_cert, ca_key


def _leaf_key(key_pem: str) -> ec.EllipticCurvePrivateKey:
    key = _load_key(key_pem, "tls.key")
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise PKIError("tls.key", f"unsupported key type {type(key).__name__} (want ECDSA)")
    return key


def _authority_key_id(ca_cert: x509.Certificate) -> x509.AuthorityKeyIdentifier:
    try:
        ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    except x509.ExtensionNotFound:
        return x509.AuthorityKeyIdentifier.from_issuer_public_key(_issuer_public_key(ca_cert))
    return x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski)


def _issuer_public_key(ca_cert: x509.Certificate) -> ec.EllipticCurvePublicKey | rsa.RSAPublicKey:
    public_key = ca_cert.public_key()
    if not isinstance(public_key, ec.EllipticCurvePublicKey | rsa.RSAPublicKey):
        raise PKIError("ca.crt", f"unsupported key type {type(public_key).__name__}")
    return public_key


def _subject_alt_name(name: str, ips: Sequence[IPAddress]) -> x509.SubjectAlternativeName:
    general_names: list[x509.GeneralName] = [x509.DNSName(name)]
    general_names.extend(x509.IPAddress(ip) for ip in ips)
    return x509.SubjectAlternativeName(general_names)


def _subject(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, ORGANIZATION),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _key_usage(
    *, digital_signature: bool = False, key_cert_sign: bool = False, crl_sign: bool = False
) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=digital_signature,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=key_cert_sign,
        crl_sign=crl_sign,
        encipher_only=False,
        decipher_only=False,
    )


def _load_cert(pem: Pem, field: str) -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate(_as_bytes(pem))
    except (ValueError, TypeError) as error:
        raise PKIError(field, "not a PEM certificate") from error


def _load_key(pem: Pem, field: str) -> PrivateKeyTypes:
    try:
        return serialization.load_pem_private_key(_as_bytes(pem), password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm) as error:
        raise PKIError(field, "not an unencrypted PEM private key") from error


def _as_bytes(pem: Pem) -> bytes:
    if isinstance(pem, bytes):
        return pem
    if isinstance(pem, str):
        return pem.encode("ascii", errors="replace")
    raise TypeError(f"expected PEM str or bytes, got {type(pem).__name__}")


def _public_der(public_key: PublicKeyTypes) -> bytes:
    return public_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _cert_pem(cert: x509.Certificate) -> str:
    return cert.public_bytes(serialization.Encoding.PEM).decode("ascii")


def _key_pem(key: ec.EllipticCurvePrivateKey) -> str:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode("ascii")


def _utc(moment: datetime) -> datetime:
    """Normalise to UTC, reading a naive datetime as UTC, at X.509's one-second resolution."""
    aware = moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)
    return aware.replace(microsecond=0)
