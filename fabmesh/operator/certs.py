"""Which certificates the operator must write: pure decisions over the Secrets it observed.

The reconciler used to decide renewal while writing; here the decision is data
(:class:`CertAction`: this node, this Secret, because of this reason), made from
what the API returned and a clock reading passed in, so a resync that changes
nothing is visibly a plan with no actions. Issuing a leaf generates a private
key, a side effect, so :func:`issue` is a separate small step the writer calls
for each ``ISSUE`` action. The mesh CA follows the same split:
:func:`ca_from_secret` reads it, ``None`` means "create one", and the writer
creates it (a 409 means another operator won the race; its CA is used).
"""

from __future__ import annotations

import datetime
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from fabmesh.operator import objects as o
from fabmesh.operator.inventory import InvalidNode
from fabmesh.pki.authority import KeyPair, PKIError, RenewReason, describe, issue_leaf, renewal_reason


class CertChange(StrEnum):
    ISSUE = "issue"  # a new key and leaf
    REBUNDLE = "ca-bundle"  # the leaf stays; only the Secret's ca.crt is stale


@dataclass(frozen=True, repr=False)
class CertAction:
    """One Secret to write. ``keep`` is the leaf a ``REBUNDLE`` writes back (never shown in a repr)."""

    node: str
    secret_name: str
    addresses: tuple[str, ...]
    change: CertChange
    reason: RenewReason | None = None  # why a leaf is issued; None for REBUNDLE
    keep: KeyPair | None = None

    @property
    def log_reason(self) -> str:
        return self.reason.value if self.reason is not None else self.change.value

    def __repr__(self) -> str:
        return f"CertAction(node={self.node}, secret={self.secret_name}, {self.change.value}, {self.log_reason})"


@dataclass
class CertPlan:
    actions: list[CertAction] = field(default_factory=list)
    expiry: dict[str, str] = field(default_factory=dict)  # node -> not-after of a leaf that stays as it is
    errors: list[InvalidNode] = field(default_factory=list)


def secret_name_for(node: str, edges: Collection[str]) -> str:
    """An edge's Secret, else a connector's: each connector node has its own key."""
    return o.tls_secret_name(node) if node in edges else o.connector_secret_name(node)


def ca_from_secret(secret: Mapping[str, Any] | None) -> KeyPair | None:
    """The mesh CA stored in its Secret; None when there is none yet (the writer creates it)."""
    if secret is None:
        return None
    data = secret["data"]
    return KeyPair(cert_pem=o.unb64(data["tls.crt"]), key_pem=o.unb64(data["tls.key"]))


def plan_certificates(secrets: Mapping[str, Mapping[str, Any]], cert_addresses: Mapping[str, tuple[str, ...]],
                      edges: Collection[str], ca: KeyPair, now: datetime.datetime) -> CertPlan:
    """For every node that needs a certificate: nothing, a rebundle, or a new leaf, and why.

    ``secrets`` are the operator's Secrets by name as observed; ``cert_addresses`` the
    addresses each node's leaf must carry (from the plan). A node whose name or addresses
    cannot go into a certificate becomes an error naming the certificate field.
    """
    result = CertPlan()
    for name, addresses in sorted(cert_addresses.items()):
        secret_name = secret_name_for(name, edges)
        current = secrets.get(secret_name)
        existing = None
        if current is not None:
            data = current.get("data") or {}
            existing = KeyPair(cert_pem=o.unb64(data.get("tls.crt")), key_pem=o.unb64(data.get("tls.key")))
        try:
            reason = renewal_reason(ca, existing, name=name, addresses=addresses, now=now)
        except PKIError as exc:
            result.errors.append(InvalidNode(name, f"certificate.{exc.field}", exc.reason))
            continue
        if reason is None and existing is not None:
            if o.unb64((current or {}).get("data", {}).get("ca.crt")) == ca.cert_pem:
                result.expiry[name] = describe(existing.cert_pem).not_after.isoformat()
            else:
                result.actions.append(CertAction(name, secret_name, addresses, CertChange.REBUNDLE, keep=existing))
        else:
            result.actions.append(CertAction(name, secret_name, addresses, CertChange.ISSUE, reason=reason))
    return result


def issue(action: CertAction, ca: KeyPair, now: datetime.datetime, lifetime: datetime.timedelta) -> KeyPair:
    """The leaf the action's Secret should hold: the kept one, or a new key and certificate.

    Raises PKIError when the CA cannot issue (e.g. it has expired).
    """
    if action.change is CertChange.REBUNDLE and action.keep is not None:
        return action.keep
    return issue_leaf(ca, name=action.node, addresses=action.addresses, now=now, lifetime=lifetime)
