"""How each peer of a ``NodeMesh`` becomes one charon connection (a VICI ``load-conn`` message).

Pure: the agent and the connector both call :func:`desired_connections` and
hand the result to the VICI reconciler, which loads only what differs.

Choices, and why:
* One connection per peer, named after the peer, with one CHILD_SA carrying
  exactly the tunnel's subnets on both sides. Exact traffic selectors (rather
  than one wide 0/0 tunnel) keep direct community tunnels and the connector
  tunnel from overlapping, so the kernel or libipsec never has to guess.
* Only one side of a pair initiates, and it does so explicitly over VICI
  whenever it has no IKE_SA (``start_action = none``: ``start`` would fire once
  at load, and a NO_PROPOSAL_CHOSEN from a peer that has not loaded us yet is
  final). It then
  restarts on DPD timeout and on close; the responder only answers, so a pair
  never builds two IKE_SAs. ``trap`` is avoided: with kernel-libipsec a trap
  policy never starts the tunnel.
* The remote identity must equal the peer's node name and, when the operator
  pinned it (it always does), carry the peer's current public key
  (``pubkeys`` alone: charon makes it a trusted-pubkey certificate and a
  subject-certificate constraint whose comparison is by public key, so any
  X.509 leaf with that key complies and any other is refused, "peer not
  authenticated with peer cert"; a ``cacerts`` beside it would refuse every
  peer, see ``_remote_auth``). Only an unpinned, hand-written peer is checked
  against the CA bundle (``cacerts``, one entry per CA during a roll). A certificate from elsewhere, a replaced key
  of a reissued node, or a node that has left the mesh (its connection is gone)
  gets no tunnel; a renewed leaf with the same key needs no change here.
* With kernel ESP, ``policies_fwd_out = yes``: fabmesh puts ``block`` xfrm policies under each
  tunnel (fail closed), and forwarded pod traffic meets the fwd one unless charon installs its
  outbound fwd policy, which strongSwan does only when asked.
* ``unique = replace``: an edge that reboots and reconnects replaces its stale
  IKE_SA on the connector instead of stacking a second one. The pin is what
  keeps a stolen old key from using this to evict the real edge.
* ``local_addrs = %any``, never the node's ``endpoint``: the endpoint is what
  peers dial, the ExternalIP where a Node has one, and on the major clouds that
  address lives in the provider's 1:1 NAT, on no interface of the VM. charon
  matches an incoming IKE_SA_INIT against ``local_addrs`` using the address the
  packet arrived at (the VM's own one), so a pinned ExternalIP refuses every
  edge. Nor the InternalIP: in the lab, as on edges whose kubelet address is a
  loopback alias, it is not the address packets leave by. ``%any`` answers on
  the address the packet arrived at and initiates from the one the kernel routes
  by, which is exactly what the peer sees.

Hole punching (strongSwan mediation, "IKE mediation"; Debian's charon has it compiled in):
* An edge with a peer ``mediated_by`` the connector holds one more connection,
  ``mediation@<connector>`` (:func:`mediation_name`): ``mediation = yes``, no CHILD_SA, same
  identities and pin as its data connection. Over it the connector relays each side's
  candidate endpoints (ME_CONNECT) and both edges send connectivity checks from port 4500, which
  opens both NATs' mappings; the initiator then makes the IKE_SA straight to the address that
  answered. Both edges of a pair need it up: the responder is reached over it.
* The mediated connection dials nobody itself: ``remote_addrs = %any``, ``mediated_by`` and
  ``mediation_peer`` (the other edge's identity, under which the connector knows its mediation
  IKE_SA). One-initiator and pinning are unchanged: the lower-named edge initiates, and the direct
  IKE_SA is authenticated by the pinned key like any other.
* ``unique``: the connector needs no connection of its own for mediation. charon (5.9,
  ``ike_me.c`` ``process_r_ms``: "FIXME: we should check whether the current peer_config is
  configured as mediation connection") serves mediation on whatever peer config the edge's IKE_SA
  selected, and with the same identities and addresses that is the edge's data connection. So on
  the connector the edge's mediation IKE_SA and its data IKE_SA share one peer config, and
  ``unique = replace`` would make each evict the other (``ike_sa_manager.c`` ``check_uniqueness``
  replaces an established IKE_SA whose peer config ``equals`` the new one's). For a mediation
  client the connector therefore uses ``unique = no``: a rebooted edge still clears its stale
  IKE_SAs, because its first IKE_SA carries INITIAL_CONTACT, which charon honours under ``no`` (it
  destroys every IKE_SA of that identity pair). On the edge the two connections differ
  (``mediation``), so its data connection keeps ``replace``. charon forces ``unique = replace`` on
  a mediation connection (``vici_config.c``: "force unique connections for mediation
  connections"), so its first IKE_SA carries INITIAL_CONTACT when the edge has no other IKE_SA
  with the connector, and the connector then destroys the data IKE_SA of that identity pair
  without a word (seen in the lab when both were initiated at once). The agent therefore starts
  the mediation connection only once the data IKE_SA is up (``TunnelSync``): that IKE_SA is the
  contact, and the data one is the IKE_SA that carries INITIAL_CONTACT after a reboot.
"""

from __future__ import annotations

from typing import Any

from fabmesh.mesh.model import Backend, NodeMesh, Peer, Role, public_key_pem


def connection(mesh: NodeMesh, peer: Peer, cert_pem: str) -> dict[str, Any]:
    tunnel = mesh.tunnel
    child: dict[str, Any] = {
        "mode": "tunnel",
        "local_ts": list(mesh.local_ts(peer)),
        "remote_ts": list(peer.subnets),
        "esp_proposals": list(tunnel.esp_proposals),
        "rekey_time": f"{tunnel.rekey_time_s // 4}s",
        # Initiation is explicit (TunnelSync.apply), so a peer that was not ready gets retried.
        "start_action": "none",
        "dpd_action": "restart" if peer.initiate else "clear",
        "close_action": "start" if peer.initiate else "none",
    }
    if tunnel.backend is Backend.KERNEL:
        # Charon's outbound fwd policy overrides our fwd block while the SA is up (node/desired.py).
        child["policies_fwd_out"] = "yes"
    conn = _ike(mesh, peer, cert_pem)
    if peer.mediation_client:
        conn["unique"] = "no"
    if peer.mediated_by:
        conn["remote_addrs"] = ["%any"]
        conn["mediated_by"] = mediation_name(peer.mediated_by)
        conn["mediation_peer"] = peer.id
    conn["children"] = {peer.name: child}
    return conn


def mediation_name(mediator: str) -> str:
    """The name of the mediation connection to ``mediator``; '@' is in no node name (DNS-1123)."""
    return f"mediation@{mediator}"


def mediation_connection(mesh: NodeMesh, mediator: Peer, cert_pem: str) -> dict[str, Any]:
    """The IKE_SA an edge keeps with its mediation server: no CHILD_SA; ``unique`` stays ``replace``,
    which charon would force anyway."""
    conn = _ike(mesh, mediator, cert_pem)
    conn["mediation"] = "yes"
    return conn


def _ike(mesh: NodeMesh, peer: Peer, cert_pem: str) -> dict[str, Any]:
    tunnel = mesh.tunnel
    return {
        "version": "2",
        "local_addrs": ["%any"],
        "remote_addrs": [peer.endpoint] if peer.endpoint else ["%any"],
        "proposals": list(tunnel.ike_proposals),
        "encap": "yes" if tunnel.encap else "no",
        "dpd_delay": f"{dpd_delay_s(mesh, peer)}s",
        "rekey_time": f"{tunnel.rekey_time_s}s",
        "unique": "replace",
        "mobike": "no",
        # One try per initiation: the agent re-initiates on its next pass. Letting charon retry
        # too (keyingtries=0) races the agent and builds duplicate IKE_SAs that replace each other.
        "keyingtries": "1",
        "local": {"auth": "pubkey", "certs": [cert_pem], "id": mesh.node.name},
        "remote": _remote_auth(mesh, peer),
    }


def is_direct(mesh: NodeMesh, peer: Peer) -> bool:
    """An edge's tunnel with another edge: the one a pair can lose and fall back to the connector from."""
    return mesh.node.role is Role.EDGE and peer.role is Role.EDGE


def dpd_delay_s(mesh: NodeMesh, peer: Peer) -> int:
    """Direct tunnels get their own, short DPD: the agent removes one whose DPD goes unanswered
    (fabmesh/node/liveness.py), and only a DPD in flight tells it the peer stopped answering."""
    return mesh.tunnel.direct_dpd_delay_s if is_direct(mesh, peer) else mesh.tunnel.dpd_delay_s


def _remote_auth(mesh: NodeMesh, peer: Peer) -> dict[str, Any]:
    """The pinned key alone when there is one, else the CA bundle: charon cannot require both.

    strongSwan 5.9 makes a ``pubkeys`` entry a trusted certificate for the peer's identity and
    authenticates the peer with it directly ("using trusted certificate"), so its authentication
    names no CA and a ``cacerts`` next to it refuses every peer ("peer not authenticated by CA").
    The pin is the stricter rule anyway: the operator pins only keys its CA certified.
    """
    if peer.pubkey:
        return {"auth": "pubkey", "id": peer.id, "pubkeys": [public_key_pem(peer.pubkey)]}
    return {"auth": "pubkey", "id": peer.id, "cacerts": list(mesh.ca_certs())}


def desired_connections(mesh: NodeMesh, cert_pem: str) -> dict[str, dict[str, Any]]:
    """Connection name -> load-conn body, for every peer, then every mediation server, in name order."""
    conns = {peer.name: connection(mesh, peer, cert_pem) for peer in sorted(mesh.peers, key=lambda p: p.name)}
    for mediator in mesh.mediators():
        conns[mediation_name(mediator.name)] = mediation_connection(mesh, mediator, cert_pem)
    return conns


def initiated(mesh: NodeMesh) -> set[str]:
    """The connections this node initiates: its initiating peers and its mediation connections."""
    return {p.name for p in mesh.peers if p.initiate} | {mediation_name(m.name) for m in mesh.mediators()}
