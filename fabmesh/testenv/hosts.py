"""Simulated hosts: one network namespace each, on a shared WAN, each with its own charon.

Tests and the lab need several "machines" on one Linux box without touching the
box's own network. Each host is a namespace whose ``wan0`` veth plugs into a
bridge that lives in a namespace of its own (so even the bridge is off the
host's tables). Addresses come from TEST-NET ranges (RFC 5737) unless a caller
picks others. Hosts can also sit behind a :class:`NatRouter` namespace, as edges do.

charon per host: ``ip netns exec`` already gives the child a private mount
namespace (mounts are made slave), so a bind mount of a per-host directory over
``/run`` gives each charon its own pid file and VICI socket, reachable from the
outside at ``<host dir>/run/charon.vici``. ``STRONGSWAN_CONF`` points it at its
own configuration. Everything is started with a new session and stopped by PID.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import signal
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from fabmesh.mesh.model import Backend
from fabmesh.strongswan.conf import render_strongswan_conf

CHARON = Path("/usr/lib/ipsec/charon")


class HostEnvError(RuntimeError):
    pass


def sh(*args: str, check: bool = True, ns: str | None = None) -> subprocess.CompletedProcess[str]:
    cmd = (["ip", "netns", "exec", ns] if ns else []) + list(args)
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise HostEnvError(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc


def wait_for(predicate, timeout: float = 20.0, interval: float = 0.05, what: str = "condition"):
    """Poll until ``predicate()`` is truthy; return its value (tests poll, never sleep)."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


def stop_pid(pid: int, timeout: float = 5.0) -> None:
    """SIGTERM, then SIGKILL, one process we started (never by name)."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            done, _ = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            done = pid if not _alive(pid) else 0
        if done:
            return
        time.sleep(0.05)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, 0)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@dataclass
class Charon:
    host: Host
    process: subprocess.Popen[bytes]
    vici_socket: Path
    log_file: Path

    @property
    def pid(self) -> int:
        return self.process.pid

    def stop(self) -> None:
        stop_pid(self.process.pid)
        with contextlib.suppress(FileNotFoundError):
            self.vici_socket.unlink()


@dataclass
class Host:
    name: str
    netns: str
    wan_ip: str
    directory: Path
    charon: Charon | None = None

    def run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return sh(*args, check=check, ns=self.netns)

    def start_charon(self, backend: Backend = Backend.LIBIPSEC, install_routes: bool = False,
                     ignore_interfaces: tuple[str, ...] = ()) -> Charon:
        rundir = self.directory / "run"
        rundir.mkdir(parents=True, exist_ok=True)
        conf = self.directory / "strongswan.conf"
        log = self.directory / "charon.log"
        vici_socket = rundir / "charon.vici"
        conf.write_text(render_strongswan_conf(
            backend=backend, vici_socket=Path("/run/charon.vici"), log_file=log,
            install_routes=install_routes, ignore_interfaces=ignore_interfaces))
        env = dict(os.environ, STRONGSWAN_CONF=str(conf))
        with open(self.directory / "charon.stderr", "ab") as stderr:
            proc = subprocess.Popen(
                ["ip", "netns", "exec", self.netns, "sh", "-c",
                 f'mount --bind "{rundir}" /run && exec {CHARON}'],
                env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                stderr=stderr, start_new_session=True)
        self.charon = Charon(host=self, process=proc, vici_socket=vici_socket, log_file=log)
        try:
            wait_for(lambda: vici_ready(vici_socket) or proc.poll() is not None,
                     timeout=20, what=f"charon VICI socket on {self.name}")
        except TimeoutError:
            self.charon.stop()
            raise
        if proc.poll() is not None:
            raise HostEnvError(f"charon on {self.name} exited with {proc.returncode}; see {log}")
        return self.charon

    def add_pod(self, name: str, cidr: str, *, bridge: str | None = None) -> Pod:
        """A pod namespace joined to this host by a veth; the host side gets the gateway.

        With ``bridge`` the host end is enslaved to that bridge instead (the bridge
        then carries the gateway address). Tests of the agent add pods with the
        real CNI plugins instead; this is for the foundation smoke tests.
        """
        net = ipaddress.ip_interface(cidr).network
        pod_ip = ipaddress.ip_interface(cidr)
        gateway = next(net.hosts())
        netns = f"{self.netns}-{name}"[:48]
        sh("ip", "netns", "add", netns)
        host_if = f"v{uuid.uuid4().hex[:10]}"
        sh("ip", "link", "add", "eth0", "netns", netns, "type", "veth", "peer", "name", host_if,
           "netns", self.netns)
        sh("ip", "-n", netns, "addr", "add", str(pod_ip), "dev", "eth0")
        sh("ip", "-n", netns, "link", "set", "eth0", "up")
        sh("ip", "-n", netns, "link", "set", "lo", "up")
        sh("ip", "-n", netns, "route", "add", "default", "via", str(gateway))
        if bridge:
            sh("ip", "-n", self.netns, "link", "set", host_if, "master", bridge)
        else:
            sh("ip", "-n", self.netns, "addr", "add", f"{gateway}/{net.prefixlen}", "dev", host_if)
        sh("ip", "-n", self.netns, "link", "set", host_if, "up")
        return Pod(name=name, netns=netns, ip=str(pod_ip.ip))


@dataclass
class Pod:
    name: str
    netns: str
    ip: str

    def run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return sh(*args, check=check, ns=self.netns)

    def ping(self, dst: str, count: int = 1, timeout: int = 2) -> bool:
        done = self.run("ping", "-n", "-q", "-c", str(count), "-W", str(timeout), dst, check=False)
        return done.returncode == 0


def vici_ready(path: Path) -> bool:
    if not path.exists():
        return False
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(str(path))
    except OSError:
        return False
    finally:
        sock.close()
    return True


@dataclass
class NatRouter:
    """A home or 4G router: owns one WAN address, hides a LAN behind it, lets nothing in unasked.

    Outbound: MASQUERADE to its WAN address. Linux keeps the source port where it is free, so
    a mapping depends on the inside endpoint only (endpoint-independent, "cone"); with
    ``symmetric`` it is ``--random-fully``: every new destination sees another random port,
    which defeats hole punching. Inbound: only replies (conntrack ESTABLISHED/RELATED) are
    forwarded to the LAN; nothing forwards a port, so nothing on the WAN can open a connection
    to a host behind it, even with a route to the LAN.
    """

    name: str
    netns: str
    wan_ip: str
    lan_cidr: str
    symmetric: bool = False

    @property
    def gateway(self) -> str:
        return str(next(ipaddress.ip_network(self.lan_cidr).hosts()))

    def set_wan_ip(self, new_ip: str, prefixlen: int) -> None:
        """A new WAN address, as after a 4G reconnect: the link goes down, comes back with another
        address, and every mapping the LAN had is gone (the kernel's MASQUERADE forgets the
        mappings of a device that went down; deleting the address alone leaves them in place)."""
        sh("ip", "link", "set", "wan0", "down", ns=self.netns)
        sh("ip", "addr", "del", f"{self.wan_ip}/{prefixlen}", "dev", "wan0", ns=self.netns)
        sh("ip", "addr", "add", f"{new_ip}/{prefixlen}", "dev", "wan0", ns=self.netns)
        sh("ip", "link", "set", "wan0", "up", ns=self.netns)
        self.wan_ip = new_ip


@dataclass
class Network:
    """A WAN bridge in its own namespace and the hosts plugged into it."""

    prefix: str
    directory: Path
    wan_cidr: str = "198.51.100.0/24"
    hosts: dict[str, Host] = field(default_factory=dict)
    nats: dict[str, NatRouter] = field(default_factory=dict)

    @property
    def wan_netns(self) -> str:
        return f"{self.prefix}-wan"

    def create(self) -> Network:
        self.directory.mkdir(parents=True, exist_ok=True)
        sh("ip", "netns", "add", self.wan_netns)
        sh("ip", "-n", self.wan_netns, "link", "add", "br0", "type", "bridge")
        sh("ip", "-n", self.wan_netns, "link", "set", "br0", "up")
        return self

    def add_host(self, name: str, wan_ip: str | None = None) -> Host:
        net = ipaddress.ip_network(self.wan_cidr)
        ip = wan_ip or str(net.network_address + len(self.hosts) + 1)
        netns = f"{self.prefix}-{name}"
        sh("ip", "netns", "add", netns)
        peer = f"w{uuid.uuid4().hex[:10]}"
        sh("ip", "link", "add", "wan0", "netns", netns, "type", "veth", "peer", "name", peer,
           "netns", self.wan_netns)
        sh("ip", "-n", self.wan_netns, "link", "set", peer, "master", "br0", "up")
        sh("ip", "-n", netns, "addr", "add", f"{ip}/{net.prefixlen}", "dev", "wan0")
        sh("ip", "-n", netns, "link", "set", "wan0", "up")
        sh("ip", "-n", netns, "link", "set", "lo", "up")
        sh("sysctl", "-qw", "net.ipv4.ip_forward=1", ns=netns)
        host = Host(name=name, netns=netns, wan_ip=ip, directory=self.directory / name)
        host.directory.mkdir(parents=True, exist_ok=True)
        self.hosts[name] = host
        return host

    def add_nat_router(self, name: str, wan_ip: str, lan_cidr: str, *, symmetric: bool = False) -> NatRouter:
        """A NAT router namespace ``<prefix>-nat-<name>`` on the WAN with an empty LAN bridge."""
        router = NatRouter(name=name, netns=f"{self.prefix}-nat-{name}", wan_ip=wan_ip, lan_cidr=lan_cidr,
                           symmetric=symmetric)
        lan = ipaddress.ip_network(lan_cidr)
        ns = router.netns
        sh("ip", "netns", "add", ns)
        port = f"w{uuid.uuid4().hex[:10]}"
        sh("ip", "link", "add", "wan0", "netns", ns, "type", "veth", "peer", "name", port, "netns", self.wan_netns)
        sh("ip", "-n", self.wan_netns, "link", "set", port, "master", "br0", "up")
        sh("ip", "-n", ns, "link", "add", "lan0", "type", "bridge")
        wan_prefix = ipaddress.ip_network(self.wan_cidr).prefixlen
        sh("ip", "-n", ns, "addr", "add", f"{wan_ip}/{wan_prefix}", "dev", "wan0")
        sh("ip", "-n", ns, "addr", "add", f"{router.gateway}/{lan.prefixlen}", "dev", "lan0")
        for device in ("lo", "wan0", "lan0"):
            sh("ip", "-n", ns, "link", "set", device, "up")
        sh("sysctl", "-qw", "net.ipv4.ip_forward=1", ns=ns)
        masquerade = ["-j", "MASQUERADE"] + (["--random-fully"] if symmetric else [])
        rules = ("*nat\n"
                 f"-A POSTROUTING -s {lan} -o wan0 {' '.join(masquerade)}\n"
                 "COMMIT\n*filter\n"
                 "-A FORWARD -i wan0 -m conntrack --ctstate ESTABLISHED,RELATED -j ACCEPT\n"
                 "-A FORWARD -i wan0 -j DROP\n"
                 "-A INPUT -i wan0 -m conntrack --ctstate ESTABLISHED,RELATED -j ACCEPT\n"
                 "-A INPUT -i wan0 -p icmp -j ACCEPT\n"
                 "-A INPUT -i wan0 -j DROP\n"
                 "COMMIT\n")
        subprocess.run(["ip", "netns", "exec", ns, "iptables-restore"], input=rules, text=True, check=True,
                       capture_output=True)
        self.nats[name] = router
        return router

    def add_host_behind_router(self, name: str, router: NatRouter, ip: str) -> Host:
        """A host whose ``wan0`` is on ``router``'s LAN with the private address ``ip``."""
        netns = f"{self.prefix}-{name}"
        lan = ipaddress.ip_network(router.lan_cidr)
        sh("ip", "netns", "add", netns)
        port = f"l{uuid.uuid4().hex[:10]}"
        sh("ip", "link", "add", "wan0", "netns", netns, "type", "veth", "peer", "name", port, "netns", router.netns)
        sh("ip", "-n", router.netns, "link", "set", port, "master", "lan0", "up")
        sh("ip", "-n", netns, "addr", "add", f"{ip}/{lan.prefixlen}", "dev", "wan0")
        sh("ip", "-n", netns, "link", "set", "wan0", "up")
        sh("ip", "-n", netns, "link", "set", "lo", "up")
        sh("ip", "-n", netns, "route", "add", "default", "via", router.gateway)
        sh("sysctl", "-qw", "net.ipv4.ip_forward=1", ns=netns)
        host = Host(name=name, netns=netns, wan_ip=ip, directory=self.directory / name)
        host.directory.mkdir(parents=True, exist_ok=True)
        self.hosts[name] = host
        return host

    def add_host_behind_nat(self, name: str, external_ip: str, lan_cidr: str = "10.250.0.0/30") -> Host:
        """A host behind a 1:1 NAT, as a cloud VM with an ExternalIP: that address is on no interface of it.

        A router namespace (``<prefix>-<name>-nat``) owns ``external_ip`` on the WAN and translates it
        to and from the host's own address (the second address of ``lan_cidr``; the router has the
        first and is the host's default gateway). The host sees only its own address, as on EC2, GCE
        or Azure, where the public IP lives in the provider's NAT.
        """
        lan = ipaddress.ip_network(lan_cidr)
        gateway, own = (str(a) for a in list(lan.hosts())[:2])
        router = f"{self.prefix}-{name}-nat"
        netns = f"{self.prefix}-{name}"
        sh("ip", "netns", "add", router)
        sh("ip", "netns", "add", netns)
        port = f"w{uuid.uuid4().hex[:10]}"
        sh("ip", "link", "add", "wan0", "netns", router, "type", "veth", "peer", "name", port,
           "netns", self.wan_netns)
        sh("ip", "-n", self.wan_netns, "link", "set", port, "master", "br0", "up")
        sh("ip", "link", "add", "lan0", "netns", router, "type", "veth", "peer", "name", "wan0", "netns", netns)
        wan_prefix = ipaddress.ip_network(self.wan_cidr).prefixlen
        sh("ip", "-n", router, "addr", "add", f"{external_ip}/{wan_prefix}", "dev", "wan0")
        sh("ip", "-n", router, "addr", "add", f"{gateway}/{lan.prefixlen}", "dev", "lan0")
        sh("ip", "-n", netns, "addr", "add", f"{own}/{lan.prefixlen}", "dev", "wan0")
        for ns, devices in ((router, ("lo", "wan0", "lan0")), (netns, ("lo", "wan0"))):
            for device in devices:
                sh("ip", "-n", ns, "link", "set", device, "up")
            sh("sysctl", "-qw", "net.ipv4.ip_forward=1", ns=ns)
        sh("ip", "-n", netns, "route", "add", "default", "via", gateway)
        sh("iptables", "-t", "nat", "-A", "PREROUTING", "-d", external_ip, "-j", "DNAT",
           "--to-destination", own, ns=router)
        sh("iptables", "-t", "nat", "-A", "POSTROUTING", "-s", own, "-o", "wan0", "-j", "SNAT",
           "--to-source", external_ip, ns=router)
        host = Host(name=name, netns=netns, wan_ip=own, directory=self.directory / name)
        host.directory.mkdir(parents=True, exist_ok=True)
        self.hosts[name] = host
        return host

    def destroy(self) -> None:
        """Stop every charon by PID, then delete every namespace we made (tolerates 'gone')."""
        for host in self.hosts.values():
            if host.charon:
                host.charon.stop()
        for netns in owned_namespaces(self.prefix):
            sh("ip", "netns", "del", netns, check=False)


def owned_namespaces(prefix: str) -> list[str]:
    out = sh("ip", "netns", "list").stdout
    names = [line.split()[0] for line in out.splitlines() if line.strip()]
    if not prefix:
        return names
    return [n for n in names if n == prefix or n.startswith(prefix + "-")]


def unique_prefix(tag: str = "fm") -> str:
    return f"{tag}{uuid.uuid4().hex[:6]}"


@contextlib.contextmanager
def network(directory: Path, tag: str = "fm", wan_cidr: str = "198.51.100.0/24") -> Iterator[Network]:
    net = Network(prefix=unique_prefix(tag), directory=directory, wan_cidr=wan_cidr).create()
    try:
        yield net
    finally:
        net.destroy()
