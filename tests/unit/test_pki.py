"""Unit tests for the mesh CA: what it issues, what it accepts, and when it reissues.

These pin the contract the operator relies on when it stores and rotates node
certificates: leaves carry the node's name and addresses, verify only against their own
CA, never outlive it, never leak their key through repr, and are renewed for exactly the
listed reasons. Keys are generated once per module so the file stays fast.
"""

from __future__ import annotations

import pickle
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID

from fabmesh.pki import (
    CLOCK_SKEW,
    KeyPair,
    PKIError,
    RenewReason,
    ca_needs_rotation,
    describe,
    issue_leaf,
    key_matches_cert,
    new_ca,
    renewal_reason,
    verify_leaf,
)

pytestmark = pytest.mark.unit

NOW = datetime(2030, 1, 1, 12, 0, tzinfo=UTC)
NAME = "node-1"
ADDRESSES = ("10.0.0.1", "fd00::1")
LEAF_LIFETIME = timedelta(days=365)


@dataclass(frozen=True)
class Mesh:
    ca: KeyPair
    impostor_ca: KeyPair  # same subject as ``ca``, different key
    short_ca: KeyPair  # expires before a fresh leaf would
    leaf: KeyPair
    stranger: KeyPair  # same name and addresses as ``leaf``, issued by ``impostor_ca``


@pytest.fixture(scope="module")
def mesh() -> Mesh:
    ca = new_ca(now=NOW)
    impostor_ca = new_ca(now=NOW)
    return Mesh(
        ca=ca,
        impostor_ca=impostor_ca,
        short_ca=new_ca("short-ca", now=NOW, lifetime=timedelta(days=30)),
        leaf=issue_leaf(ca, name=NAME, addresses=ADDRESSES, now=NOW, lifetime=LEAF_LIFETIME),
        stranger=issue_leaf(impostor_ca, name=NAME, addresses=ADDRESSES, now=NOW),
    )


def _load(pem: str) -> x509.Certificate:
    return x509.load_pem_x509_certificate(pem.encode())


ExistingOf = Callable[[Mesh], KeyPair | None]
RenewalCase = tuple[ExistingOf, str, Sequence[str], datetime, RenewReason | None]


def _stored_leaf(mesh: Mesh) -> KeyPair:
    return mesh.leaf


def _nothing_stored(mesh: Mesh) -> None:
    return None


def _garbage_cert(mesh: Mesh) -> KeyPair:
    return KeyPair("not a cert", mesh.leaf.key_pem)


def _garbage_key(mesh: Mesh) -> KeyPair:
    return KeyPair(mesh.leaf.cert_pem, "not a key")


def _stranger(mesh: Mesh) -> KeyPair:
    return mesh.stranger


def _foreign_key(mesh: Mesh) -> KeyPair:
    return KeyPair(mesh.leaf.cert_pem, mesh.stranger.key_pem)


# The leaf is valid from NOW - 5 min to NOW + 365 days; two thirds in is NOW + ~243.3 days.
EARLY, LATE, AFTER_END = NOW + timedelta(days=243), NOW + timedelta(days=244), NOW + timedelta(days=400)
RESPELLED = ("FD00:0::1", "10.0.0.1", "10.0.0.1")
ADDED, REMOVED = (*ADDRESSES, "10.0.0.2"), ADDRESSES[:1]
RENEWAL_CASES: dict[str, RenewalCase] = {
    "keep-unchanged-leaf": (_stored_leaf, NAME, ADDRESSES, NOW, None),
    "keep-when-addresses-reordered-and-respelled": (_stored_leaf, NAME, RESPELLED, NOW, None),
    "keep-just-before-two-thirds-of-lifetime": (_stored_leaf, NAME, ADDRESSES, EARLY, None),
    "missing-when-no-leaf-stored": (_nothing_stored, NAME, ADDRESSES, NOW, RenewReason.MISSING),
    "unparseable-certificate": (_garbage_cert, NAME, ADDRESSES, NOW, RenewReason.UNPARSEABLE),
    "unparseable-key": (_garbage_key, NAME, ADDRESSES, NOW, RenewReason.UNPARSEABLE),
    "wrong-ca-with-the-same-ca-name": (_stranger, NAME, ADDRESSES, NOW, RenewReason.WRONG_CA),
    "name-changed": (_stored_leaf, "node-2", ADDRESSES, NOW, RenewReason.NAME_CHANGED),
    "addresses-changed-when-one-added": (_stored_leaf, NAME, ADDED, NOW, RenewReason.ADDRESSES_CHANGED),
    "addresses-changed-when-one-removed": (_stored_leaf, NAME, REMOVED, NOW, RenewReason.ADDRESSES_CHANGED),
    "expiring-just-after-two-thirds-of-lifetime": (_stored_leaf, NAME, ADDRESSES, LATE, RenewReason.EXPIRING),
    "expiring-when-already-expired": (_stored_leaf, NAME, ADDRESSES, AFTER_END, RenewReason.EXPIRING),
    "key-mismatch-with-another-leafs-key": (_foreign_key, NAME, ADDRESSES, NOW, RenewReason.KEY_MISMATCH),
}


@pytest.mark.parametrize(
    ("existing", "name", "addresses", "at", "expected"), list(RENEWAL_CASES.values()), ids=list(RENEWAL_CASES)
)
def test_renewal_reason_decides_whether_to_reissue(
    mesh: Mesh,
    existing: ExistingOf,
    name: str,
    addresses: Sequence[str],
    at: datetime,
    expected: RenewReason | None,
) -> None:
    assert renewal_reason(mesh.ca, existing(mesh), name=name, addresses=addresses, now=at) is expected


def test_renewal_reason_accepts_the_ca_certificate_alone(mesh: Mesh) -> None:
    assert renewal_reason(mesh.ca.cert_pem, mesh.leaf, name=NAME, addresses=ADDRESSES, now=NOW) is None
    assert renewal_reason(mesh.ca.cert_pem, mesh.stranger, name=NAME, addresses=ADDRESSES, now=NOW) is (
        RenewReason.WRONG_CA
    )


def test_renewal_reason_rejects_malformed_desired_addresses(mesh: Mesh) -> None:
    with pytest.raises(PKIError) as caught:
        renewal_reason(mesh.ca, mesh.leaf, name=NAME, addresses=("10.0.0.300",), now=NOW)
    assert caught.value.field == "addresses"


def test_leaf_verifies_against_its_ca(mesh: Mesh) -> None:
    verify_leaf(mesh.ca.cert_pem, mesh.leaf.cert_pem, now=NOW)
    verify_leaf(mesh.ca.cert_pem.encode(), mesh.leaf.cert_pem.encode(), now=NOW + timedelta(days=300))


def test_leaf_from_another_ca_with_the_same_name_fails_verification(mesh: Mesh) -> None:
    with pytest.raises(PKIError) as caught:
        verify_leaf(mesh.ca.cert_pem, mesh.stranger.cert_pem, now=NOW)
    assert caught.value.field == "tls.crt"


def test_leaf_from_a_differently_named_ca_fails_verification_on_issuer(mesh: Mesh) -> None:
    with pytest.raises(PKIError, match="issued by"):
        verify_leaf(mesh.short_ca.cert_pem, mesh.leaf.cert_pem, now=NOW)


def test_expired_leaf_fails_verification(mesh: Mesh) -> None:
    with pytest.raises(PKIError, match="expired"):
        verify_leaf(mesh.ca.cert_pem, mesh.leaf.cert_pem, now=NOW + LEAF_LIFETIME + timedelta(seconds=1))


def test_leaf_from_the_future_fails_verification(mesh: Mesh) -> None:
    with pytest.raises(PKIError, match="not valid before"):
        verify_leaf(mesh.ca.cert_pem, mesh.leaf.cert_pem, now=NOW - CLOCK_SKEW - timedelta(seconds=1))


def test_leaf_carries_name_and_every_address_in_its_san(mesh: Mesh) -> None:
    info = describe(mesh.leaf.cert_pem)
    assert info.common_name == NAME
    assert info.dns_names == (NAME,)
    assert info.ip_addresses == ADDRESSES
    assert info.not_before == NOW - CLOCK_SKEW
    assert info.not_after == NOW + LEAF_LIFETIME
    assert len(info.fingerprint_sha256) == 64


def test_leaf_is_an_end_entity_for_both_ike_roles(mesh: Mesh) -> None:
    leaf, ca = _load(mesh.leaf.cert_pem), _load(mesh.ca.cert_pem)
    extensions = leaf.extensions
    assert extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False
    usage = extensions.get_extension_for_class(x509.KeyUsage)
    assert usage.critical and usage.value.digital_signature and not usage.value.key_cert_sign
    assert set(extensions.get_extension_for_class(x509.ExtendedKeyUsage).value) == {
        ExtendedKeyUsageOID.SERVER_AUTH,
        ExtendedKeyUsageOID.CLIENT_AUTH,
    }
    authority_key_id = extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value.key_identifier
    assert authority_key_id == ca.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value.digest
    assert isinstance(leaf.public_key(), ec.EllipticCurvePublicKey)
    assert leaf.public_key().curve.name == "secp256r1"


def test_ca_is_self_signed_and_may_sign_only_leaves(mesh: Mesh) -> None:
    ca = _load(mesh.ca.cert_pem)
    ca.verify_directly_issued_by(ca)
    constraints = ca.extensions.get_extension_for_class(x509.BasicConstraints)
    assert constraints.critical and constraints.value.ca and constraints.value.path_length == 0
    usage = ca.extensions.get_extension_for_class(x509.KeyUsage)
    assert usage.critical and usage.value.key_cert_sign and usage.value.crl_sign
    assert not usage.value.digital_signature
    assert describe(mesh.ca.cert_pem).common_name == "fabmesh-ca"


def test_leaf_never_outlives_its_ca(mesh: Mesh) -> None:
    leaf = issue_leaf(mesh.short_ca, name=NAME, addresses=ADDRESSES, now=NOW, lifetime=LEAF_LIFETIME)
    assert describe(leaf.cert_pem).not_after == describe(mesh.short_ca.cert_pem).not_after
    verify_leaf(mesh.short_ca.cert_pem, leaf.cert_pem, now=NOW + timedelta(days=29))


def test_ca_needs_rotation_only_when_fresh_leaves_would_be_cut_short(mesh: Mesh) -> None:
    assert ca_needs_rotation(mesh.short_ca, now=NOW, leaf_lifetime=LEAF_LIFETIME)
    assert not ca_needs_rotation(mesh.short_ca, now=NOW, leaf_lifetime=timedelta(days=7))
    assert not ca_needs_rotation(mesh.ca, now=NOW, leaf_lifetime=LEAF_LIFETIME)


def test_repr_never_shows_the_private_key(mesh: Mesh) -> None:
    for shown in (repr(mesh.leaf), str(mesh.ca), f"{mesh.leaf}", repr([mesh.leaf]), repr(KeyPair("x", "y"))):
        assert "PRIVATE KEY" not in shown
        assert "<redacted>" in shown
    assert repr(mesh.leaf) == f"KeyPair(cert={NAME}, key=<redacted>)"


def test_keys_are_unencrypted_pkcs8_and_match_their_certificates(mesh: Mesh) -> None:
    assert mesh.leaf.key_pem.startswith("-----BEGIN PRIVATE KEY-----")
    assert key_matches_cert(mesh.leaf.cert_pem, mesh.leaf.key_pem)
    assert key_matches_cert(mesh.ca.cert_pem, mesh.ca.key_pem)
    assert not key_matches_cert(mesh.leaf.cert_pem, mesh.stranger.key_pem)


@pytest.mark.parametrize(
    "addresses",
    [("10.0.0.256",), ("not-an-ip",), ("10.0.0.0/24",), ("",), ("fe80::1%eth0",), (" 10.0.0.1",), "10.0.0.1"],
    ids=["octet-out-of-range", "hostname", "cidr", "empty", "scoped-ipv6", "padded", "bare-string"],
)
def test_malformed_address_is_rejected_naming_the_field(mesh: Mesh, addresses: Sequence[str]) -> None:
    with pytest.raises(PKIError) as caught:
        issue_leaf(mesh.ca, name=NAME, addresses=addresses, now=NOW)
    assert caught.value.field == "addresses"
    assert str(caught.value).startswith("addresses: ")


@pytest.mark.parametrize(
    "name", ["", "Node-1", "node_1", "n" * 65], ids=["empty", "uppercase", "underscore", "too-long-for-cn"]
)
def test_malformed_name_is_rejected_naming_the_field(mesh: Mesh, name: str) -> None:
    with pytest.raises(PKIError) as caught:
        issue_leaf(mesh.ca, name=name, addresses=ADDRESSES, now=NOW)
    assert caught.value.field == "name"


def test_issuing_from_an_expired_ca_is_refused(mesh: Mesh) -> None:
    with pytest.raises(PKIError) as caught:
        issue_leaf(mesh.short_ca, name=NAME, addresses=ADDRESSES, now=NOW + timedelta(days=31))
    assert caught.value.field == "ca.crt"


@pytest.mark.parametrize(
    "garbage",
    ["", "hello", "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n", b"\x00\xff"],
    ids=["empty", "text", "truncated-pem", "binary"],
)
def test_describe_rejects_garbage_naming_the_field(garbage: str | bytes) -> None:
    with pytest.raises(PKIError) as caught:
        describe(garbage)
    assert caught.value.field == "tls.crt"
    assert str(caught.value) == "tls.crt: not a PEM certificate"


def test_describe_rejects_a_private_key_passed_as_certificate(mesh: Mesh) -> None:
    with pytest.raises(PKIError, match=r"^tls\.crt: "):
        describe(mesh.leaf.key_pem)


def test_pki_error_survives_pickling_with_its_field_and_reason() -> None:
    error = pickle.loads(pickle.dumps(PKIError("tls.key", "not an unencrypted PEM private key")))
    assert (error.field, error.reason) == ("tls.key", "not an unencrypted PEM private key")
    assert str(error) == "tls.key: not an unencrypted PEM private key"
