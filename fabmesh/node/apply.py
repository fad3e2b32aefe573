"""Apply a ``NodeState`` (or a cloud node's ``CloudState``) to the node: each resource through its own
reconciler, only what differs.

Each step is independent: one failing (charon not up yet, a device missing)
is reported and the others still run, and the next pass retries it. Order:
sysctls, bridge, CNI config, ipsets (before the rules that name them),
iptables, xfrm bypass and block policies (kernel ESP), anchor addresses (libipsec),
tunnels over VICI (creates libipsec's TUN device), rule and routes.

Writes are counted per resource; a pass over an unchanged node writes nothing.

The route agent on cloud nodes (``fabmesh cloud-agent``) uses the same reconcilers through
:class:`CloudApplier`: routes in its own table behind its own rule, one ipset, one nat chain, all
under its own prefix, so an agent and a connector on one node never take each other's objects for
stale ones.
"""

from __future__ import annotations

import ipaddress
import logging
import os
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from fabmesh.cloudagent.plan import PREFIX as CLOUD_PREFIX
from fabmesh.cloudagent.plan import RULE_PRIORITY as CLOUD_RULE_PRIORITY
from fabmesh.cloudagent.plan import CloudState
from fabmesh.firewall.ipset import IPSets
from fabmesh.firewall.iptables import IPTables
from fabmesh.mesh.dataplane import Route
from fabmesh.netlink.driver import Netlink, RouteChanges, RoutesNotApplied
from fabmesh.node.desired import RULE_PRIORITY, NodeState
from fabmesh.node.teardown import TeardownPlan
from fabmesh.node.tunnel_sync import Credentials, TunnelSync
from fabmesh.strongswan.driver import Charon
from fabmesh.xfrm.driver import XfrmPolicies

log = logging.getLogger(__name__)


class StepFailed(RuntimeError):
    """A step that failed part-way; ``changes`` are the lines of what it did write (``_step`` logs them)."""

    def __init__(self, message: str, changes: list[str]) -> None:
        super().__init__(message)
        self.changes = changes


def _route_lines(changes: RouteChanges) -> list[str]:
    return ([f"action=add-route {r.key()}" for r in changes.added]
            + [f"action=del-route {r.key()}" for r in changes.removed])


@dataclass
class ApplyReport:
    changes: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.errors


def write_atomically(path: Path, text: str) -> bool:
    """Write ``text`` to ``path`` via rename, so a reader never sees half a file; False if unchanged."""
    try:
        if path.read_text() == text:
            return False
    except FileNotFoundError:
        pass
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
    return True


class DataplaneApplier:
    """The reconcilers every fabmesh loop shares, held for the life of the process (they cache normal forms):
    routes in one table behind one ``ip rule``, ipsets, iptables chains, all named with ``prefix``."""

    def __init__(self, node: str, prefix: str) -> None:
        self.node = node
        self.prefix = prefix
        self.iptables = IPTables(None, 4)
        self.ipsets = IPSets(None)
        self.netlink_writes = 0

    def _step(self, report: ApplyReport, what: str, fn: Callable[[], list[str]]) -> None:
        """Run one reconciler and log each change it made, once, here (the drivers log at DEBUG)."""
        try:
            changes = fn()
        except Exception as exc:  # one failing resource must not stop the others
            changes = getattr(exc, "changes", [])  # what the failing call did change before it raised
            report.errors.append(f"{what}: {exc}")
            log.warning("node=%s step=%s failed (retrying next pass): %s", self.node, what, exc)
        for change in changes:
            report.changes.append(change)
            log.info("node=%s %s", self.node, change)

    def _set_routes(self, table: int, priority: int, routes: tuple[Route, ...], *, rule: bool) -> list[str]:
        """Our routes in ``table`` exactly ``routes``; the rule looking it up present (``rule``) or gone."""
        with Netlink(None) as nl:
            before = nl.writes
            try:
                lines: list[str] = []
                if rule and nl.ensure_rule(table, priority):
                    lines.append(f"action=add-rule table={table} priority={priority}")
                try:
                    changes = nl.set_routes(table, routes)
                except RoutesNotApplied as exc:
                    # _step logs what was written before the failure: lines, as every step reports them.
                    raise StepFailed(str(exc), lines + _route_lines(exc.changes)) from exc
                lines += _route_lines(changes)
                if not rule and nl.remove_rule(table, priority):
                    lines.append(f"action=remove-rule table={table} priority={priority}")
            finally:
                self.netlink_writes += nl.writes - before
        return lines


class CloudApplier(DataplaneApplier):
    """A cloud node's route agent: routes via the connector, the no-SNAT chain and its set (``CloudState``)."""

    def __init__(self, node: str) -> None:
        super().__init__(node, CLOUD_PREFIX)

    def apply(self, state: CloudState) -> ApplyReport:
        """Sets before the rules naming them before the routes; in reverse when everything goes (a set
        named by a rule cannot be destroyed, and no packet should be routed without its no-SNAT rule)."""
        report = ApplyReport()
        steps: list[tuple[str, Callable[[], list[str]]]] = [
            ("ipset", lambda: self.ipsets.set(state.ipsets, prefix=self.prefix)),
            ("iptables", lambda: self.iptables.set(state.chains, state.jumps, prefix=self.prefix)),
            ("routes", lambda: self._set_routes(state.route_table, CLOUD_RULE_PRIORITY, state.routes,
                                                rule=bool(state.routes)))]
        for what, fn in reversed(steps) if state.idle else steps:
            self._step(report, what, fn)
        return report

    def writes(self) -> Counter[str]:
        return Counter({"netlink": self.netlink_writes, "iptables": self.iptables.writes,
                        "ipset": self.ipsets.writes})


class NodeApplier(DataplaneApplier):
    """An edge agent's or a connector's whole node (``NodeState``)."""

    def __init__(self, node: str, vici_socket: Path, state_dir: Path, cni_conf_path: Path | None) -> None:
        super().__init__(node, "FABMESH-")
        self.cni_conf_path = cni_conf_path
        self.vici_socket = vici_socket
        self.xfrm = XfrmPolicies(None)
        self.tunnels = TunnelSync(lambda: Charon(vici_socket), state_dir / "tunnels.json")
        self.file_writes = 0
        self.sysctl_writes = 0

    def writes(self) -> Counter[str]:
        return Counter({"netlink": self.netlink_writes, "iptables": self.iptables.writes,
                        "ipset": self.ipsets.writes, "vici": self.tunnels.writes, "xfrm": self.xfrm.writes,
                        "files": self.file_writes, "sysctl": self.sysctl_writes})

    def apply(self, state: NodeState, creds: Credentials) -> ApplyReport:
        report = ApplyReport()
        self._step(report, "sysctl", self._sysctls)
        if state.bridge:
            self._step(report, "bridge", lambda: self._bridge(state))
        if state.conflist and self.cni_conf_path:
            self._step(report, "cni", lambda: self._cni(state.conflist or ""))
        self._step(report, "ipset", lambda: self.ipsets.set(state.ipsets, prefix="FABMESH-"))
        self._step(report, "iptables", lambda: self.iptables.set(state.chains, state.jumps, prefix="FABMESH-"))
        if state.xfrm or self.xfrm.list():
            self._step(report, "xfrm", lambda: self.xfrm.set(state.xfrm))
        if state.anchors:
            self._step(report, "anchors", lambda: self._anchors(state))
        self._step(report, "tunnels", lambda: self._tunnels(state, creds))
        self._step(report, "routes", lambda: self._routes(state))
        return report

    def teardown(self, plan: TeardownPlan) -> ApplyReport:
        """Remove everything :meth:`apply` programs, for an uninstall (``fabmesh/node/teardown.py``).

        The reverse of apply's order: no packet is routed into a tunnel whose policy is gone, and a
        set is destroyed only after the rules naming it. ``ip_forward`` stays on: other software on
        the node (kube-proxy, the cloud CNI) may rely on it, and turning it off is not ours to do.
        """
        report = ApplyReport()
        self._step(report, "routes", lambda: self._set_routes(plan.route_table, RULE_PRIORITY, (), rule=False))
        self._step(report, "tunnels", self._unload_tunnels)
        if plan.anchors:
            self._step(report, "anchors", lambda: self._remove_anchors(plan.anchors))
        self._step(report, "xfrm", lambda: self.xfrm.set(()) if self.xfrm.list() else [])
        self._step(report, "iptables", lambda: self.iptables.set((), (), prefix=self.prefix))
        self._step(report, "ipset", lambda: self.ipsets.set((), prefix=self.prefix))
        if plan.cni_conf:
            self._step(report, "cni", lambda: self._remove_file(Path(plan.cni_conf or "")))
        if plan.bridge:
            self._step(report, "bridge", lambda: self._delete_link(plan.bridge or ""))
        return report

    def _unload_tunnels(self) -> list[str]:
        """Unload and terminate every connection; nothing to do when charon is not running (by-hand cleanup)."""
        if not self.vici_socket.exists():
            return []
        return [f"action=unload-conn peer={n}" for n in self.tunnels.unload_all()]

    def _remove_anchors(self, anchors: tuple[str, ...]) -> list[str]:
        with Netlink(None) as nl:
            before = nl.writes
            changes = [c for a in anchors for c in nl.remove_host_address("lo", a)]
            self.netlink_writes += nl.writes - before
        return changes

    def _remove_file(self, path: Path) -> list[str]:
        try:
            path.unlink()
        except FileNotFoundError:
            return []
        self.file_writes += 1
        return [f"action=remove-cni-config path={path}"]

    def _delete_link(self, name: str) -> list[str]:
        with Netlink(None) as nl:
            before = nl.writes
            changes = nl.delete_link(name)
            self.netlink_writes += nl.writes - before
        return changes

    def _sysctls(self) -> list[str]:
        path = Path("/proc/sys/net/ipv4/ip_forward")
        if path.read_text().strip() == "1":
            return []
        path.write_text("1")
        self.sysctl_writes += 1
        return ["action=sysctl net.ipv4.ip_forward=1"]

    def _bridge(self, state: NodeState) -> list[str]:
        assert state.bridge
        name, address, mtu = state.bridge
        with Netlink(None) as nl:
            before = nl.writes
            changes = nl.ensure_bridge(name, address, mtu)
            self.netlink_writes += nl.writes - before
        return [f"action=bridge {c}" for c in changes]

    def _anchors(self, state: NodeState) -> list[str]:
        changes: list[str] = []
        with Netlink(None) as nl:
            present = [ipaddress.ip_address(a) for a in nl.addresses()]
            before = nl.writes
            for subnet in state.anchors:
                net = ipaddress.ip_network(subnet)
                if any(a in net for a in present):
                    continue
                changes += nl.ensure_host_address("lo", str(net.network_address))
            self.netlink_writes += nl.writes - before
        return changes

    def _cni(self, conflist: str) -> list[str]:
        assert self.cni_conf_path
        if not write_atomically(self.cni_conf_path, conflist):
            return []
        self.file_writes += 1
        return [f"action=write-cni-config path={self.cni_conf_path}"]

    def _tunnels(self, state: NodeState, creds: Credentials) -> list[str]:
        changes = self.tunnels.apply(state.connections, creds, set(state.initiators))
        return ([*(f"action=load-conn peer={n}{' terminated=yes' if n in changes.terminated else ''}"
                   for n in changes.loaded),
                 *(f"action=unload-conn peer={n}" for n in changes.unloaded),
                 *(f"action=initiate peer={n}" for n in changes.initiated)]
                + (["action=load-credentials"] if changes.credentials else []))

    def _routes(self, state: NodeState) -> list[str]:
        return self._set_routes(state.route_table, RULE_PRIORITY, state.routes, rule=True)
