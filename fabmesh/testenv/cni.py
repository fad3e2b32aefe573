"""A small CNI runtime for tests and the lab: what a container runtime does with libcni.

There is no ``cnitool`` on the test machines, and the agent's conflist is only
proven by feeding it to the real reference plugins the way kubelet's runtime
(containerd via libcni) does: a pod network namespace, then each plugin of the
list in order with the CNI 1.0.0 protocol (``CNI_*`` environment, the plugin's
config on stdin with the list's ``name``/``cniVersion`` and the previous
plugin's result as ``prevResult``, ``runtimeConfig`` only for capabilities the
plugin declares), and DEL in reverse order with the ADD result as
``prevResult`` (libcni passes its cached result). The plugins run inside the
*host's* namespace (``ip netns exec``), because that is where the bridge, the
IPAM lock and the host end of the veth live; ``CNI_NETNS`` points them at the
pod. Unlike libcni, a failed ADD is rolled back here (what containerd does
next by tearing the network down), so a test never leaks a namespace or an IP.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import logging
import os
import subprocess
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

from fabmesh.testenv.hosts import sh

log = logging.getLogger(__name__)

CNI_BIN = Path("/usr/lib/cni")
NETNS_DIR = Path("/run/netns")
MAX_NETNS_NAME = 48
# What this runtime offers to plugins that declare a capability (kubelet: no hostPorts).
DEFAULT_CAPABILITY_ARGS: dict[str, Any] = {"portMappings": []}

Json = dict[str, Any]


class CniCommand(StrEnum):
    ADD = "ADD"
    DEL = "DEL"


class CniError(RuntimeError):
    """A plugin failed; ``code``/``msg``/``details`` are the spec's error object (code None: no object)."""

    def __init__(self, plugin: str, command: CniCommand, code: int | None, msg: str, details: str = "") -> None:
        text = f"CNI plugin {plugin!r} {command} failed (code {code}): {msg}"
        super().__init__(f"{text}: {details}" if details else text)
        self.plugin, self.command, self.code, self.msg, self.details = plugin, command, code, msg, details


@dataclass
class CniPod:
    """A pod namespace wired up by the plugins of ``conflist_path``."""

    name: str
    netns: str
    ip: str
    container_id: str
    conflist_path: Path
    host_netns: str
    ifname: str = "eth0"
    cni_bin: Path = CNI_BIN
    # The conflist and final result as of ADD (libcni's result cache): DEL replays exactly these.
    conflist: Json = field(default_factory=dict, repr=False)
    result: Json = field(default_factory=dict, repr=False)

    def run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return sh(*args, check=check, ns=self.netns)

    def ping(self, dst: str, count: int = 1, timeout: int = 2) -> bool:
        done = self.run("ping", "-n", "-q", "-c", str(count), "-W", str(timeout), dst, check=False)
        return done.returncode == 0


def add_pod(conflist_path: Path, host_netns: str, pod_name: str, *, cni_bin: Path = CNI_BIN,
            ifname: str = "eth0") -> CniPod:
    """Create netns ``<host_netns>-<pod_name>`` and ADD every plugin; on any failure undo all of it."""
    conflist = load_conflist(conflist_path)
    netns = pod_netns_name(host_netns, pod_name)
    pod = CniPod(name=pod_name, netns=netns, ip="", container_id=uuid.uuid4().hex, conflist_path=conflist_path,
                 host_netns=host_netns, ifname=ifname, cni_bin=cni_bin, conflist=conflist)
    sh("ip", "netns", "add", netns)
    added: list[Json] = []
    prev: Json | None = None
    try:
        for plugin in conflist["plugins"]:
            added.append(plugin)  # DEL even the one that fails: it may have done part of its work
            prev = _invoke(pod, CniCommand.ADD, plugin_config(conflist, plugin, prev))
        assert prev is not None
        pod.result, pod.ip = prev, first_ipv4(prev)
    except BaseException:
        _delete_plugins(pod, reversed(added), prev)
        sh("ip", "netns", "del", netns, check=False)
        raise
    log.debug("pod=%s action=cni-add netns=%s ip=%s network=%s", pod_name, netns, pod.ip, conflist["name"])
    return pod


def del_pod(pod: CniPod) -> None:
    """DEL every plugin in reverse order (errors logged, not raised: DEL must be repeatable), drop the netns."""
    conflist = pod.conflist or load_conflist(pod.conflist_path)
    _delete_plugins(pod, reversed(conflist["plugins"]), pod.result or None, conflist)
    sh("ip", "netns", "del", pod.netns, check=False)
    log.debug("pod=%s action=cni-del netns=%s ip=%s", pod.name, pod.netns, pod.ip)


def load_conflist(path: Path) -> Json:
    conflist = json.loads(path.read_text())
    for key in ("cniVersion", "name", "plugins"):
        if not conflist.get(key):
            raise ValueError(f"{path}: conflist has no {key!r}")
    return conflist


def pod_netns_name(host_netns: str, pod_name: str) -> str:
    name = f"{host_netns}-{pod_name}"
    if len(name) > MAX_NETNS_NAME or "/" in name:
        raise ValueError(f"pod netns name {name!r}: at most {MAX_NETNS_NAME} characters, no '/'")
    return name


def plugin_config(conflist: Json, plugin: Json, prev_result: Json | None,
                  capability_args: Json | None = None) -> Json:
    """The stdin of one plugin: its own config plus the list's name/cniVersion, prevResult, runtimeConfig."""
    conf = dict(plugin, name=conflist["name"], cniVersion=conflist["cniVersion"])
    if prev_result is not None:
        conf["prevResult"] = prev_result
    offered = DEFAULT_CAPABILITY_ARGS if capability_args is None else capability_args
    runtime = {cap: offered[cap] for cap, on in plugin.get("capabilities", {}).items() if on and cap in offered}
    if runtime:
        conf["runtimeConfig"] = runtime
    return conf


def first_ipv4(result: Json) -> str:
    for ip in result.get("ips", []):
        iface = ipaddress.ip_interface(ip["address"])
        if iface.version == 4:
            return str(iface.ip)
    raise ValueError(f"CNI result has no IPv4 address: {result.get('ips')}")


def _delete_plugins(pod: CniPod, plugins: Iterable[Json], prev_result: Json | None,
                    conflist: Json | None = None) -> None:
    conflist = conflist or pod.conflist
    for plugin in plugins:
        try:
            _invoke(pod, CniCommand.DEL, plugin_config(conflist, plugin, prev_result))
        except CniError as exc:
            log.warning("pod=%s action=cni-del-failed %s", pod.name, exc)


def _invoke(pod: CniPod, command: CniCommand, conf: Json) -> Json:
    """Exec one plugin in the host netns; return its parsed stdout (ADD result, ``{}`` for DEL)."""
    plugin = str(conf.get("type", ""))
    binary = pod.cni_bin / plugin
    if not plugin or "/" in plugin or not os.access(binary, os.X_OK):
        raise CniError(plugin, command, None, f"failed to find plugin {plugin!r} in path [{pod.cni_bin}]")
    proc = subprocess.run(
        ["ip", "netns", "exec", pod.host_netns, str(binary)],
        input=json.dumps(conf), capture_output=True, text=True, env=_plugin_env(pod, command))
    if proc.returncode != 0:
        raise _plugin_error(plugin, command, proc)
    if command is CniCommand.DEL or not proc.stdout.strip():
        return {}
    try:
        return json.loads(proc.stdout)
    except json.JSONDecodeError as exc:
        raise CniError(plugin, command, None, f"result is not JSON: {exc}", proc.stdout.strip()) from exc


def _plugin_env(pod: CniPod, command: CniCommand) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CNI_")}
    netns_path = NETNS_DIR / pod.netns
    env.update(CNI_COMMAND=command.value, CNI_CONTAINERID=pod.container_id, CNI_IFNAME=pod.ifname,
               CNI_PATH=str(pod.cni_bin), CNI_NETNS=str(netns_path) if netns_path.exists() else "")
    return env


def _plugin_error(plugin: str, command: CniCommand, proc: subprocess.CompletedProcess[str]) -> CniError:
    error: Json = {}
    with contextlib.suppress(json.JSONDecodeError):
        parsed = json.loads(proc.stdout)
        error = parsed if isinstance(parsed, dict) else {}
    if "code" in error:
        return CniError(plugin, command, error["code"], str(error.get("msg", "")), str(error.get("details", "")))
    return CniError(plugin, command, None, f"exit status {proc.returncode}",
                    (proc.stderr or proc.stdout).strip())
