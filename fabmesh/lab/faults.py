"""``fabmesh lab cut|heal``: take a host off the WAN, or block the path between two hosts, and undo it.

A cut is iptables rules in a chain of its own (``LAB-CUT``) in the
*host's* namespace, jumped to first from INPUT and OUTPUT, so it drops charon's
IKE and ESP-in-UDP (both are UDP on the host's uplink) but no route or link
changes: ``heal`` only deletes the chain, and every address and route is as it
was. ``cut HOST`` drops everything on the host's uplink (``wan0``); ``cut HOST
--from OTHER`` drops only what goes to or comes from OTHER's addresses (its
uplink address and, behind a NAT, its router's WAN address), which is how UDP
between two edges gets blocked while both still reach the connector.
"""

from __future__ import annotations

from fabmesh.lab.state import LabState
from fabmesh.testenv.hosts import sh

CHAIN = "LAB-CUT"  # not FABMESH-*: the agent owns those chains and deletes unknown ones
_HOOKS = ("INPUT", "OUTPUT")


def cut_rules(state: LabState, host: str, other: str | None) -> list[str]:
    """The chain's rules (``iptables-restore`` lines without ``-A CHAIN``) (pure)."""
    if other is None:
        return ["-i wan0 -j DROP", "-o wan0 -j DROP"]
    peer = state.host(other)
    addresses = sorted({peer.wan_ip, peer.public_ip(state)})
    return [rule for a in addresses for rule in (f"-s {a}/32 -j DROP", f"-d {a}/32 -j DROP")]


def cut(state: LabState, host: str, other: str | None = None) -> list[str]:
    """Add the cut's rules in ``host``'s namespace (adds to an earlier cut); returns them."""
    netns = state.host(host).netns
    rules = cut_rules(state, host, other)
    sh("iptables", "-N", CHAIN, ns=netns, check=False)
    for hook in _HOOKS:
        if sh("iptables", "-C", hook, "-j", CHAIN, ns=netns, check=False).returncode != 0:
            sh("iptables", "-I", hook, "1", "-j", CHAIN, ns=netns)
    for rule in rules:
        sh("iptables", "-A", CHAIN, *rule.split(), ns=netns)
    return rules


def heal(state: LabState, host: str) -> bool:
    """Remove every cut on ``host``; False when there was none."""
    netns = state.host(host).netns
    if sh("iptables", "-L", CHAIN, "-n", ns=netns, check=False).returncode != 0:
        return False
    for hook in _HOOKS:
        while sh("iptables", "-D", hook, "-j", CHAIN, ns=netns, check=False).returncode == 0:
            pass
    sh("iptables", "-F", CHAIN, ns=netns)
    sh("iptables", "-X", CHAIN, ns=netns)
    return True


def exec_argv(state: LabState, target: str, command: list[str]) -> list[str]:
    """``ip netns exec`` argv for a pod (by pod name or by its node's name) or a host (``host/NAME``)."""
    if target.startswith("host/"):
        netns = state.host(target.removeprefix("host/")).netns
    else:
        pod = next((p for p in state.pods if target in (p.name, p.node)), None)
        if pod is None:
            raise KeyError(target)
        netns = pod.netns
    return ["ip", "netns", "exec", netns, *command]
