"""The mesh's X.509 authority: mint the CA, issue node leaves, inspect and verify them.

IKEv2 peers in the mesh authenticate each other with certificates from one mesh CA; this
package holds the pure, Kubernetes-free logic for that, and re-exports it so callers can
write ``from fabmesh.pki import issue_leaf``.
"""

from fabmesh.pki.authority import (
    CLOCK_SKEW,
    CertInfo,
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

__all__ = [
    "CLOCK_SKEW",
    "CertInfo",
    "KeyPair",
    "PKIError",
    "RenewReason",
    "ca_needs_rotation",
    "describe",
    "issue_leaf",
    "key_matches_cert",
    "new_ca",
    "renewal_reason",
    "verify_leaf",
]
