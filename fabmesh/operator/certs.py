"""Which certificates the operator must write: pure decisions over the Secrets it observed.

The reconciler used to decide renewal while writing; here the decision is data
(:class:`CertAction`: this node, this Secret, because of this reason), made from
what the API returned and a clock reading passed in, so a resync that changes
nothing is visibly a plan with no actions. Issuing a leaf generates a private
key, a side effect, so :func:`issue` is a separate small step the writer calls
for each ``ISSUE`` action. The mesh CA follows the same split:
:func:`ca_from_secret` reads it, ``None`` means "create one", and the writer
creates it (a 409 means another operator won the race; its CA is used); its
roll is :mod:`fabmesh.operator.ca_roll`'s.

Every peer pins a node's public key (``Peer.pubkey``), so the key is what the
peers check. A renewal (expiry, new addresses, a CA roll) certifies the key the
node already has: no peer's config changes and no tunnel ends. A leaf
whose key is missing, unreadable or mismatched, or whose Secret belongs to an
earlier Node of the same name, gets a new key: every peer then refuses the old
one. Deleting a node's Secret is how a person revokes a leaked key.
"""

from __future__ import annotations

import datetime
import functools
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from fabmesh.operator import objects as o
from fabmesh.operator.inventory import InvalidNode
from fabmesh.pki.authority import (
    KeyPair,
    PKIError,
    RenewReason,
    describe,
    issue_leaf,
    public_key_b64,
    renewal_reason,
)


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
    keep: KeyPair | None = None  # REBUNDLE: the leaf; ISSUE that keeps the key: the old leaf and its key

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


def _owner_uid(secret: Mapping[str, Any]) -> str:
    refs = secret.get("metadata", {}).get("ownerReferences") or []
    return next((r.get("uid", "") for r in refs if r.get("kind") == "Node"), "")


def plan_certificates(secrets: Mapping[str, Mapping[str, Any]], cert_addresses: Mapping[str, tuple[str, ...]],
                      edges: Collection[str], ca: KeyPair, now: datetime.datetime, *,
                      uids: Mapping[str, str] | None = None, bundle: str | None = None) -> CertPlan:
    """For every node that needs a certificate: nothing, a rebundle, or a new leaf, and why.

    ``secrets`` are the operator's Secrets by name as observed; ``cert_addresses`` the
    addresses each node's leaf must carry (from the plan); ``ca`` signs; ``bundle`` is what
    the Secrets' ``ca.crt`` must hold (the CA alone, or two CAs during a roll); ``uids``
    the Nodes' uids, to tell a re-created Node from the one its Secret was made for. A node
    whose name or addresses cannot go into a certificate becomes an error naming the
    certificate field.
    """
    result = CertPlan()
    bundle = ca.cert_pem if bundle is None else bundle
    uids = uids or {}
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
        owner = _owner_uid(current) if current is not None else ""
        if reason is None and owner and uids.get(name) and owner != uids[name]:
            reason = RenewReason.NODE_RECREATED
        if reason is None and existing is not None:
            if o.unb64((current or {}).get("data", {}).get("ca.crt")) == bundle:
                result.expiry[name] = describe(existing.cert_pem).not_after.isoformat()
            else:
                result.actions.append(CertAction(name, secret_name, addresses, CertChange.REBUNDLE, keep=existing))
        else:
            keep = existing if reason is not None and reason.keeps_key else None
            result.actions.append(CertAction(name, secret_name, addresses, CertChange.ISSUE, reason=reason,
                                             keep=keep))
    return result


def current_keys(secrets: Mapping[str, Mapping[str, Any]], nodes: Collection[str],
                 edges: Collection[str]) -> dict[str, str]:
    """node -> the public key of the leaf its Secret holds now: what its peers pin.

    Nodes without a readable leaf are left out (their peers then leave them out).
    """
    keys = {}
    for name in nodes:
        secret = secrets.get(secret_name_for(name, edges))
        key = leaf_key(((secret or {}).get("data") or {}).get("tls.crt") or "")
        if key:
            keys[name] = key
    return keys


@functools.lru_cache(maxsize=1 << 15)
def leaf_key(tls_crt_b64: str) -> str:
    """The pin (``public_key_b64``) of a Secret's ``tls.crt``; "" when there is none or it is unreadable.

    Cached by the Secret's text: a resync of 10,000 unchanged Secrets parses no certificate.
    """
    if not tls_crt_b64:
        return ""
    try:
        return public_key_b64(o.unb64(tls_crt_b64))
    except PKIError:
        return ""


def issue(action: CertAction, ca: KeyPair, now: datetime.datetime, lifetime: datetime.timedelta) -> KeyPair:
    """The leaf the action's Secret should hold: the kept one, or a new key and certificate.

    Raises PKIError when the CA cannot issue (e.g. it has expired).
    """
    if action.change is CertChange.REBUNDLE and action.keep is not None:
        return action.keep
    key = action.keep.key_pem if action.keep is not None else None
    return issue_leaf(ca, name=action.node, addresses=action.addresses, now=now, lifetime=lifetime, key_pem=key)
