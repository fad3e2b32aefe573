"""Rolling the mesh CA without taking a tunnel down: the phases, as a pure decision.

Every node trusts the CA bundle in its ``mesh.yaml`` (``cacerts``, where one match is enough)
and pins each peer's current leaf. A roll therefore goes in three steps, each waiting
``settle`` so that every agent and the connector have applied the previous one (kubelet
refreshes a mounted ConfigMap within about a minute, agents resync every 30 s):

1. ``trust-next``: a new CA is minted and trusted beside the current one (bundle: both);
   the current one still signs.
2. ``sign-next``: the new CA signs; every leaf is reissued from it *with the node's key*
   (``RenewReason.WRONG_CA`` keeps the key), so peers swap the pinned certificate in place
   and no IKE_SA ends.
3. ``stable`` again: once no leaf is left from the old CA and ``settle`` has passed, the
   old CA leaves the bundle.

A roll starts when it is requested (the ``fabmesh.io/rotate-ca`` annotation on the CA
Secret) or when the CA would cut a new leaf short (it expires within one leaf lifetime).
The state lives in the CA Secret (:func:`state_from_secret`, :func:`secret_data`); minting
the new CA is the writer's side effect, this module only says which step is due.
"""

from __future__ import annotations

import datetime
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from fabmesh.operator import objects as o
from fabmesh.pki.authority import KeyPair

PHASE_ANNOTATION = "fabmesh.io/ca-roll-phase"
SINCE_ANNOTATION = "fabmesh.io/ca-roll-since"
ROTATE_ANNOTATION = "fabmesh.io/rotate-ca"  # set by a person (any value) to start a roll now
OTHER_CERT, OTHER_KEY = "other.crt", "other.key"


class Phase(StrEnum):
    STABLE = "stable"
    TRUST_NEXT = "trust-next"
    SIGN_NEXT = "sign-next"


class Step(StrEnum):
    NONE = "none"
    START = "start"  # mint the next CA and trust it beside the current one
    SIGN_NEXT = "sign-next"  # the next CA becomes the signer; the old one stays trusted
    FINISH = "finish"  # drop the old CA from the bundle


@dataclass(frozen=True, repr=False)
class CAState:
    """The CA Secret as data. ``signer`` signs leaves; ``other`` is the next CA (``trust-next``)
    or the previous one (``sign-next``); ``since`` is when the phase began."""

    phase: Phase
    signer: KeyPair
    other: KeyPair | None = None
    since: datetime.datetime | None = None

    def bundle(self) -> str:
        """Every trusted CA, oldest first: the same text in both roll phases, so the step from
        ``trust-next`` to ``sign-next`` rewrites no node's config."""
        if self.other is None:
            return self.signer.cert_pem
        older, newer = (self.signer, self.other) if self.phase is Phase.TRUST_NEXT else (self.other, self.signer)
        return older.cert_pem + newer.cert_pem

    def __repr__(self) -> str:
        return f"CAState({self.phase.value}, since={self.since})"


def decide(state: CAState, now: datetime.datetime, *, requested: bool, due: bool,
           settle: datetime.timedelta, old_leaves_left: bool) -> Step:
    """Which step of the roll to take now (at most one per pass).

    ``due``: the signer would cut a new leaf short; ``old_leaves_left``: some node's leaf is
    not yet from the signer (its reissue failed or is pending), which holds the old CA in.
    """
    if state.phase is Phase.STABLE:
        return Step.START if requested or due else Step.NONE
    if state.since is not None and now < state.since + settle:
        return Step.NONE
    if state.phase is Phase.TRUST_NEXT:
        return Step.SIGN_NEXT
    return Step.NONE if old_leaves_left else Step.FINISH


def advance(state: CAState, step: Step, now: datetime.datetime, next_ca: KeyPair | None = None) -> CAState:
    """The state after ``step``; ``START`` needs the freshly minted ``next_ca``."""
    if step is Step.START:
        assert next_ca is not None
        return CAState(Phase.TRUST_NEXT, signer=state.signer, other=next_ca, since=now)
    if step is Step.SIGN_NEXT:
        assert state.other is not None
        return CAState(Phase.SIGN_NEXT, signer=state.other, other=state.signer, since=now)
    if step is Step.FINISH:
        return CAState(Phase.STABLE, signer=state.signer)
    return state


def state_from_secret(secret: Mapping[str, Any]) -> CAState:
    data = secret["data"]
    annotations = secret["metadata"].get("annotations") or {}
    signer = KeyPair(cert_pem=o.unb64(data["tls.crt"]), key_pem=o.unb64(data["tls.key"]))
    phase = Phase(annotations.get(PHASE_ANNOTATION, Phase.STABLE.value))
    other = None
    if phase is not Phase.STABLE and data.get(OTHER_CERT):
        other = KeyPair(cert_pem=o.unb64(data[OTHER_CERT]), key_pem=o.unb64(data.get(OTHER_KEY)))
    since_text = annotations.get(SINCE_ANNOTATION)
    since = datetime.datetime.fromisoformat(since_text) if since_text else None
    return CAState(phase if other is not None else Phase.STABLE, signer, other, since)


def requested(secret: Mapping[str, Any]) -> bool:
    return ROTATE_ANNOTATION in (secret["metadata"].get("annotations") or {})


def secret_data(state: CAState) -> tuple[dict[str, str], dict[str, str | None]]:
    """(data, annotations patch) for the CA Secret holding ``state``; None removes an annotation."""
    data = {"tls.crt": o.b64(state.signer.cert_pem), "tls.key": o.b64(state.signer.key_pem)}
    if state.other is not None:
        data |= {OTHER_CERT: o.b64(state.other.cert_pem), OTHER_KEY: o.b64(state.other.key_pem)}
    annotations: dict[str, str | None] = {
        PHASE_ANNOTATION: state.phase.value,
        SINCE_ANNOTATION: state.since.isoformat() if state.since else None,
        ROTATE_ANNOTATION: None,
    }
    return data, annotations
