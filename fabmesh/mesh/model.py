"""The mesh as plain data: what the operator decides and what an agent or connector applies.

``NodeMesh`` is the versioned schema of ``mesh.yaml`` (the ConfigMap an agent
mounts) and of the connector's configuration. Models are strict and frozen:
unknown keys are errors (a typo in a hand-edited file must not be ignored), and
lists are kept sorted by the planner so the same input always serialises to the
same bytes, which is what makes "write only when content changed" possible.

Private keys never appear here: they travel in the node's Secret only.
"""

from __future__ import annotations

import ipaddress
import posixpath
import re
from collections.abc import Callable, Sequence
from enum import StrEnum
from typing import Annotated, Literal, TypeVar

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, model_validator
from pydantic_core import PydanticCustomError

from fabmesh.mesh.crypto import Kind, proposal_problem

API_VERSION = "fabmesh.io/v1alpha1"
_M = TypeVar("_M", bound=BaseModel)


def _cidr(value: str) -> str:
    return str(ipaddress.ip_network(value, strict=True))


def _ip(value: str) -> str:
    return str(ipaddress.ip_address(value))


def _refuse(value: str, reason: str) -> PydanticCustomError:
    # A custom error type keeps pydantic's "Value error, " prefix out of the message an operator reads.
    return PydanticCustomError("fabmesh", "{value} is not allowed: {reason}", {"value": repr(value), "reason": reason})


def _proposal(kind: Kind) -> Callable[[str], str]:
    def check(value: str) -> str:
        problem = proposal_problem(kind, value)
        if problem:
            raise _refuse(value, problem)
        return value
    return check


def _abs_dir(value: str) -> str:
    # The agent mounts this host directory and writes the CNI file into it: a relative path or a
    # ".." part would point it somewhere the chart and the docs do not say it touches.
    if not value.startswith("/"):
        raise _refuse(value, "must be an absolute path")
    if posixpath.normpath(value) != value or value.startswith("//"):
        raise _refuse(value, f"must be normalised, without '..', '.', '//' or a trailing '/' "
                             f"(did you mean {posixpath.normpath(value)!r}?)")
    return value


# Only .conflist: the agent always writes a plugin list, and container runtimes (libcni) read a
# ".conf" file as one plugin's config, which a list is not.
CONF_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]*\.conflist$"
# The schema's spelling of _abs_dir (Go's regexp has no lookahead): "/" or components other than "." and "..".
ABS_DIR_PATTERN = r"^(/|(/([^/.][^/]*|\.[^/.][^/]*|\.\.[^/]+))+)$"


def _conf_name(value: str) -> str:
    if not re.fullmatch(CONF_NAME_PATTERN, value):
        raise _refuse(value, "must be a plain file name (letters, digits, '.', '_', '-'; no '/') ending in "
                             ".conflist (the agent writes a plugin list; runtimes read a .conf as one plugin)")
    return value


Cidr = Annotated[str, AfterValidator(_cidr)]
IP = Annotated[str, AfterValidator(_ip)]
DNS1123 = Annotated[str, Field(pattern=r"^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$")]
IkeProposal = Annotated[str, AfterValidator(_proposal(Kind.IKE))]
EspProposal = Annotated[str, AfterValidator(_proposal(Kind.ESP))]
AbsoluteDir = Annotated[str, AfterValidator(_abs_dir)]
ConfFileName = Annotated[str, AfterValidator(_conf_name)]


def error_field(loc: Sequence[str | int]) -> str:
    """A pydantic error location as a person writes it: ``tunnel.esp_proposals[1]``."""
    text = ""
    for part in loc:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text or "<document>"


class Backend(StrEnum):
    """Where ESP runs: in the kernel (xfrm), or in charon's userspace ``kernel-libipsec`` over a TUN device.

    A strongSwan notion (``fabmesh/strongswan/conf.py`` picks the plugins from it), kept here because
    the planners decide routes and bypass policies from it and must not import the renderer.
    """

    KERNEL = "kernel"
    LIBIPSEC = "libipsec"


class Role(StrEnum):
    EDGE = "edge"
    CONNECTOR = "connector"
    CLOUD = "cloud"


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


class TunnelSettings(_Model):
    """Cluster-wide IPsec settings; every tunnel of a node uses the same ones.

    Proposals are checked against the allow-list in ``fabmesh/mesh/crypto.py`` (AEAD only, SHA-2
    PRFs, strong DH groups; ESP proposals carry a group so CHILD_SA rekeys have PFS).
    """

    ike_proposals: tuple[IkeProposal, ...] = Field(
        default=("aes256gcm16-prfsha256-ecp256", "aes128gcm16-prfsha256-x25519"), min_length=1)
    esp_proposals: tuple[EspProposal, ...] = Field(
        default=("aes256gcm16-ecp256", "aes128gcm16-x25519"), min_length=1)
    # DPD on the connector tunnel (both ends). Also how an edge whose NAT router changed its WAN address
    # recovers: after this long without inbound traffic its DPD leaves by the new mapping, and the
    # connector (responder, peer behind NAT) moves the IKE_SA there (docs/performance.md: ~dpd + 0.5 s).
    dpd_delay_s: int = Field(default=5, ge=1, le=3600)
    # Direct edge-to-edge tunnels: a short DPD, and the agent removes the tunnel once a DPD has gone
    # unanswered this long (0: never; charon's own retransmit schedule, ~83 s, decides). The pair then
    # falls to the connector tunnel until the initiator's next pass brings the direct one back
    # (fabmesh/node/liveness.py explains the numbers).
    direct_dpd_delay_s: int = Field(default=2, ge=1, le=3600)
    direct_dpd_timeout_s: float = Field(default=3.0, ge=0, le=3600)
    rekey_time_s: int = Field(default=4 * 3600, ge=60)
    backend: Backend = Backend.KERNEL
    # Userspace/kernel ESP in UDP adds ~60-70 bytes; 1400 leaves room under a 1500 path MTU.
    mtu: int = Field(default=1400, ge=576, le=9000)
    # Force UDP encapsulation: edges sit behind NAT, and libipsec only does ESP-in-UDP.
    encap: bool = True


class NodeSettings(_Model):
    """Where an agent puts things on its node."""

    bridge: str = Field(default="fabmesh0", max_length=15)
    cni_conf_dir: AbsoluteDir = "/etc/cni/net.d"
    cni_conf_name: ConfFileName = "10-fabmesh.conflist"
    route_table: int = Field(default=2620, ge=1, le=2**31 - 1)
    resync_period_s: int = Field(default=30, ge=1)
    # The node's TunnelStatus object (fabmesh/node/report.py): charon is polled every status_poll_s; a
    # change is written no sooner than status_min_interval_s after the last write; an unchanged status
    # is rewritten every status_heartbeat_s, so a node that stopped writing shows as stale.
    status_poll_s: int = Field(default=5, ge=1, le=3600)
    status_min_interval_s: int = Field(default=10, ge=1, le=3600)
    status_heartbeat_s: int = Field(default=300, ge=10, le=86400)


class Peer(_Model):
    """One tunnel, seen from the node that owns the config."""

    name: DNS1123
    role: Role
    identity: str = ""  # the peer's certificate identity; "" = its name (in CN and SAN)
    endpoint: IP | None = None  # None: accept from any address (an edge behind NAT)
    subnets: tuple[Cidr, ...]  # what lives behind the peer, routed into this tunnel (remote TS)
    local_subnets: tuple[Cidr, ...] = ()  # local TS of this tunnel; () = the node's local_subnets
    initiate: bool = False  # exactly one side of a pair initiates; the other only responds
    # The peer's public key, pinned: its SubjectPublicKeyInfo, DER in base64 on one line (124 characters
    # for P-256, where a whole leaf is ~0.8 KB). charon accepts for this peer only a certificate that
    # carries this key (and still its name and a chain to the CA bundle), so a key the operator has
    # replaced (reissued, node deleted or re-created) is refused at the next resync, while a renewal,
    # which keeps the key, changes no peer's config. "" = no pin, the CA alone decides (hand-written
    # configs); the operator always pins.
    pubkey: str = Field(default="", pattern=r"^[A-Za-z0-9+/]*={0,2}$")
    # Hole punching (strongSwan mediation, RFC-draft "IKE mediation"). On an edge: the name of the peer
    # (the connector) that mediates this edge-edge tunnel; the edge then dials it through that peer's
    # mediation connection instead of at an endpoint, and keeps a mediation IKE_SA with the mediator.
    mediated_by: DNS1123 | None = None
    # On the connector: this edge also holds a mediation IKE_SA with us, under the same identities as
    # its data IKE_SA (so that IKE_SA must not replace the data one, see node/tunnels.py).
    mediation_client: bool = False

    @property
    def id(self) -> str:
        return self.identity or self.name


class LocalNode(_Model):
    name: DNS1123
    role: Role
    address: IP  # the node's InternalIP
    # What peers dial (ExternalIP where it has one). Behind a cloud's 1:1 NAT it is on no local
    # interface, so charon never binds to it (tunnels.py uses %any locally).
    endpoint: IP
    pod_cidr: Cidr | None = None
    communities: tuple[str, ...] = ()


class NodeMesh(_Model):
    """The full desired state for one node (``mesh.yaml``)."""

    api_version: Literal["fabmesh.io/v1alpha1"] = Field(default=API_VERSION, alias="apiVersion")
    kind: Literal["NodeMesh"] = "NodeMesh"
    node: LocalNode
    local_subnets: tuple[Cidr, ...]  # what this node announces into its tunnels
    mesh_cidrs: tuple[Cidr, ...]  # every CIDR inside the mesh: never SNAT between these
    peers: tuple[Peer, ...] = ()
    # The CA bundle: one or more PEM certificates, concatenated. Two during a CA roll (the outgoing and
    # the incoming CA), so leaves from either are accepted while they are reissued.
    ca_cert: str = Field(alias="caCert")
    tunnel: TunnelSettings = TunnelSettings()
    settings: NodeSettings = NodeSettings()

    def to_yaml(self) -> str:
        return dump_yaml(self)

    def ca_certs(self) -> tuple[str, ...]:
        """The bundle as single PEM certificates (VICI takes one certificate per list entry)."""
        return split_pems(self.ca_cert)

    def local_ts(self, peer: Peer) -> tuple[str, ...]:
        return peer.local_subnets or self.local_subnets

    def mediators(self) -> tuple[Peer, ...]:
        """The peers some other peer is mediated by, in name order: each gets a mediation connection."""
        names = {p.mediated_by for p in self.peers if p.mediated_by}
        return tuple(sorted((p for p in self.peers if p.name in names), key=lambda p: p.name))

    @model_validator(mode="after")
    def _mediators_are_dialable_peers(self) -> NodeMesh:
        by_name = {p.name: p for p in self.peers}
        for i, peer in enumerate(self.peers):
            if peer.mediated_by is None:
                continue
            mediator = by_name.get(peer.mediated_by)
            if mediator is None or mediator.endpoint is None or mediator.mediated_by is not None:
                raise PydanticCustomError(
                    "fabmesh", "peers[{i}].mediated_by: {value} is not a peer of this node with an endpoint "
                    "(the mediation server is dialled directly)", {"i": i, "value": repr(peer.mediated_by)})
        return self


_PEM_BLOCK = re.compile(r"-----BEGIN CERTIFICATE-----.*?-----END CERTIFICATE-----\n?", re.S)


def split_pems(bundle: str) -> tuple[str, ...]:
    """The PEM certificates in ``bundle``, in order, each ending in a newline; text that is no PEM
    block yields itself (charon then refuses it, naming the connection)."""
    blocks = tuple(b if b.endswith("\n") else b + "\n" for b in _PEM_BLOCK.findall(bundle))
    return blocks or ((bundle,) if bundle.strip() else ())


def public_key_pem(pubkey: str) -> str:
    """A ``Peer.pubkey`` as the PEM block charon's ``pubkeys`` takes (64 characters a line)."""
    body = "\n".join(pubkey[i:i + 64] for i in range(0, len(pubkey), 64))
    return f"-----BEGIN PUBLIC KEY-----\n{body}\n-----END PUBLIC KEY-----\n"


def dump_yaml(model: BaseModel) -> str:
    """Compact, deterministic YAML: defaults left out, flow-style lists of scalars.

    Peers are rendered one by one through a cache: the planner shares one ``Peer`` object
    among every node that lists it, so 5,000 edge configs with ~80 peers each cost ~10,000
    renderings, not 400,000.
    """
    data = model.model_dump(mode="json", by_alias=True, exclude_defaults=True, exclude={"peers"})
    if "api_version" in type(model).model_fields:  # versioned documents say what they are, first
        data = {"apiVersion": model.api_version, "kind": model.kind, **data}  # type: ignore[attr-defined]
    peers: tuple[Peer, ...] = getattr(model, "peers", ())
    if not peers:
        return _dump(data)
    order = [field.alias or name for name, field in type(model).model_fields.items()]
    before = set(order[: order.index("peers")])  # keep the fields' order: peers sit in the middle
    head = {k: v for k, v in data.items() if k in before}
    tail = {k: v for k, v in data.items() if k not in before}
    return _dump(head) + "peers:\n" + "".join(_peer_yaml(p) for p in peers) + (_dump(tail) if tail else "")


def _dump(data: dict) -> str:
    return yaml.dump(data, Dumper=_CompactDumper, sort_keys=False, width=4096)


_PEER_CACHE: dict[int, tuple[Peer, str]] = {}
_PEER_CACHE_MAX = 100_000


def _peer_yaml(peer: Peer) -> str:
    # Keyed by identity, holding the object so its id cannot be reused: hashing a frozen model on
    # each of ~400,000 lookups would cost more than the rendering it saves.
    hit = _PEER_CACHE.get(id(peer))
    if hit is not None and hit[0] is peer:
        return hit[1]
    if len(_PEER_CACHE) >= _PEER_CACHE_MAX:
        _PEER_CACHE.clear()
    text = yaml.dump([peer.model_dump(mode="json", exclude_defaults=True)], Dumper=_CompactDumper,
                     sort_keys=False, width=4096)
    _PEER_CACHE[id(peer)] = (peer, text)
    return text


# libyaml's emitter and parser when PyYAML has them (its wheels do): several times faster.
_SafeDumper = getattr(yaml, "CSafeDumper", yaml.SafeDumper)
_SafeLoader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


class _CompactDumper(_SafeDumper):  # type: ignore[misc,valid-type]
    pass


def _represent_list(dumper: yaml.SafeDumper, data: list) -> yaml.Node:
    flow = all(isinstance(item, str | int | float | bool) for item in data)
    return dumper.represent_sequence("tag:yaml.org,2002:seq", data, flow_style=flow)


_CompactDumper.add_representer(list, _represent_list)


class PeerShard(_Model):
    """One slice of the connector's peers (``peers.yaml``), so 10,000 edges fit ConfigMap limits."""

    api_version: Literal["fabmesh.io/v1alpha1"] = Field(default=API_VERSION, alias="apiVersion")
    kind: Literal["PeerShard"] = "PeerShard"
    shard: int = Field(ge=0)
    peers: tuple[Peer, ...] = ()


class MeshConfigError(ValueError):
    """A mesh.yaml that cannot be used; says which field and why."""

    def __init__(self, source: str, field: str, reason: str) -> None:
        super().__init__(f"{source}: {field}: {reason}")
        self.source, self.field, self.reason = source, field, reason


def parse_node_mesh(text: str, source: str = "mesh.yaml") -> NodeMesh:
    return _parse(NodeMesh, text, source)


def parse_peer_shard(text: str, source: str = "peers.yaml") -> PeerShard:
    return _parse(PeerShard, text, source)


def _parse(model: type[_M], text: str, source: str) -> _M:
    try:
        data = yaml.load(text, Loader=_SafeLoader)  # a safe loader (libyaml's when present)
    except yaml.YAMLError as exc:
        raise MeshConfigError(source, "<document>", f"not YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise MeshConfigError(source, "<document>", "expected a mapping")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        raise MeshConfigError(source, error_field(first["loc"]), first["msg"]) from exc
