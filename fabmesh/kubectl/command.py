"""``fabmesh status|doctor|graph|tunnels|ping`` (and ``kubectl fabmesh ...``): fetch the objects, hand them to
the pure modules, print.

Everything is read-only, except that ``ping`` runs ``ping`` in the source Pod: it needs ``get pods``,
``create pods/exec`` in the source's namespace, ``list nodes`` and ``get nodes/proxy`` (docs/operator.md,
"Debugging"). The plugin needs ``list nodes`` and, in the fabmesh
namespace, ``list configmaps, pods, tunnelstatuses`` and ``get leases`` (the
chart's ClusterRole ``fabmesh-status-viewer`` covers TunnelStatus); without ``list
secrets`` certificate dates come from the Nodes' status annotation, without
``list events`` in ``default`` doctor says it could not look. Exit codes:
doctor 1 when a check FAILs; 2 when the cluster cannot be read at all.
"""

from __future__ import annotations

import argparse
import email.utils
import json
import shutil
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from kubernetes.client import CoreV1Api
from kubernetes.client.exceptions import ApiException
from kubernetes.config import ConfigException
from kubernetes.stream import stream
from urllib3.exceptions import ConnectTimeoutError, ReadTimeoutError
from urllib3.exceptions import HTTPError as Urllib3Error
from websocket import WebSocketException

from fabmesh.kube.client import ApiError, Kube, load_api_client
from fabmesh.kubectl import cluster, doctor, ping, status
from fabmesh.kubectl.graph import mesh_dot, mesh_json
from fabmesh.kubectl.tunnels import tunnel_rows
from fabmesh.mesh.names import AGENT_SELECTOR, EVENTS_NAMESPACE, STATUS_ANNOTATION
from fabmesh.mesh.ports import DEFAULT_METRICS_PORT
from fabmesh.mesh.probepath import Counters, counted
from fabmesh.mesh.timestamps import format_time
from fabmesh.mesh.tunnelstatus import PLURAL, parse_report
from fabmesh.operator.settings import OperatorSettings, SettingsError, load_settings

CANNOT_RUN = 2
RENDER_FORMATS = ("svg", "png")

DESCRIPTIONS = {
    "status": "One row per Node: role, pod CIDR, communities, certificate expiry, agent Pod phase, "
              "planned peers and (with --metrics) tunnels up, read from the agents' Prometheus endpoints.",
    "doctor": "Check the mesh for common faults; each finding is PASS, WARN or FAIL with a one-line fix. "
              "Exits 1 when any check FAILs, else 0.",
    "graph": "Print the mesh as Graphviz DOT: communities as clusters, tunnels as solid edges coloured by the "
             "state the nodes report (green up, red not up), pairs relayed through the connector as dashed edges "
             "(orange when they share a community and should be direct). --output renders it with Graphviz's dot; "
             "--output json prints the nodes and edges as JSON.",
    "ping": "Ping DST from SRC's Pod (pods/exec) and name the path the tunnels observed: direct, relayed or "
            "cloud, from the CHILD_SA packet counters of the source's node, the destination's node and the "
            "active connector, read through the API server's node proxy before and after the probe. "
            "Exits 1 when the probe got no reply or no tunnel counted it.",
    "tunnels": "One node's tunnels as its agent (or the connector) last reported them in its TunnelStatus: peer, "
               "state, since when, endpoints, NAT, bytes and packets both ways, path.",
}


class CannotRun(Exception):
    """The cluster (or a local tool) could not be used; the message says what to do."""


def _role(row: status.StatusRow) -> str:
    return row.role.value if row.role else "invalid"


# -- arguments ------------------------------------------------------------------------------------

def register(sub: argparse._SubParsersAction, name: str, help_text: str) -> None:
    parser = sub.add_parser(name, help=help_text, description=DESCRIPTIONS[name])
    parser.add_argument("--kubeconfig", default=None,
                        help="kubeconfig file (default: in-cluster config, else $KUBECONFIG or ~/.kube/config)")
    parser.add_argument("--namespace", "-n", default=None,
                        help="fabmesh's namespace (default: the one in --settings, else fabmesh-system)")
    parser.add_argument("--settings", type=Path, default=None,
                        help="the operator's settings YAML, for custom labels or Lease name (default: built-in)")
    if name == "status":
        parser.add_argument("--json", action="store_true", help="print a JSON list of objects instead of a table")
        parser.add_argument("--watch", "-w", action="store_true", help="print the table again every --interval")
        parser.add_argument("--interval", type=float, default=2.0, help="seconds between --watch refreshes "
                            "(default: 2)")
        parser.add_argument("--metrics", action="store_true",
                            help="fetch each agent's /metrics on its InternalIP to count tunnels up")
        parser.add_argument("--metrics-port", type=int, default=DEFAULT_METRICS_PORT,
                            help=f"the agents' --metrics-port (default: {DEFAULT_METRICS_PORT})")
        parser.add_argument("--metrics-timeout", type=float, default=1.0,
                            help="seconds to wait for one agent's metrics (default: 1)")
    elif name == "doctor":
        parser.add_argument("--no-agent-pods", action="store_true",
                            help="do not require an agent Pod per edge node (agents run outside Pods, "
                                 "as in the lab)")
        parser.add_argument("--json", action="store_true", help="print the checks as a JSON list")
    elif name == "tunnels":
        parser.add_argument("node", help="the node (edge or connector) whose tunnels to show")
        parser.add_argument("--output", "-o", choices=["table", "json"], default="table",
                            help="table (default) or json (the TunnelStatus report)")
    elif name == "ping":
        parser.add_argument("src", metavar="SRC", help="[NAMESPACE/]POD, pod/NAME or node/NAME (a node: from a "
                            "Running hostNetwork Pod there, fabmesh's agent Pod first); a bare NAME is a Pod if one "
                            "exists, else a Node")
        parser.add_argument("dst", metavar="DST", help="as SRC, or an IP address (its node found from the Nodes' "
                            "InternalIPs and pod CIDRs)")
        parser.add_argument("--pod-namespace", default="default",
                            help="the namespace of a POD without NAMESPACE/ (default: default)")
        parser.add_argument("--container", "-c", default=None, help="the source Pod's container (default: its first)")
        parser.add_argument("--count", type=int, default=3, help="echo requests to send (default: 3)")
        parser.add_argument("--metrics-port", type=int, default=DEFAULT_METRICS_PORT,
                            help=f"the agents' and connector's --metrics-port (default: {DEFAULT_METRICS_PORT})")
        parser.add_argument("--metrics-timeout", type=float, default=5.0,
                            help="seconds to wait for one node's metrics through the node proxy (default: 5)")
        parser.add_argument("--output", "-o", choices=["text", "json"], default="text",
                            help="text (default) or json (schema in docs/operator.md, \"Debugging\")")
    else:
        parser.add_argument("--output", "-o", type=Path, default=None, metavar="FILE.svg|FILE.png|json",
                            help="render to this file with Graphviz's dot instead of printing DOT; json: print "
                                 "the nodes and edges as JSON")
    parser.set_defaults(func=_guarded(RUNNERS[name]))


def _guarded(run: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    def wrapper(args: argparse.Namespace) -> int:
        try:
            return run(args)
        except CannotRun as exc:
            print(f"fabmesh {args.command}: {exc}", file=sys.stderr)
            return CANNOT_RUN

    return wrapper


# -- observe --------------------------------------------------------------------------------------

def _settings(args: argparse.Namespace) -> tuple[OperatorSettings, str]:
    try:
        settings = load_settings(args.settings)
    except SettingsError as exc:
        raise CannotRun(str(exc)) from exc
    return settings, args.namespace or settings.namespace


def _kube(args: argparse.Namespace) -> Kube:
    try:
        return Kube(load_api_client(args.kubeconfig), timeout=15.0)
    except (ConfigException, OSError) as exc:
        raise CannotRun(f"no usable kubeconfig: {exc}") from exc


def _read(what: str, fetch: Callable[[], Any], forbidden_ok: bool = False) -> Any:
    """One API read; a 403 gives None when the caller can do without, every other failure stops."""
    try:
        return fetch()
    except ApiError as exc:
        if forbidden_ok and exc.status == 403:
            return None
        raise CannotRun(f"cannot read {what}: {exc}") from exc
    except (Urllib3Error, OSError) as exc:
        raise CannotRun(f"cannot reach the API server to read {what}: {exc}") from exc


def _server_date(kube: Kube) -> datetime | None:
    """The API server's clock, from the Date header of a cheap GET (our JSON client drops headers)."""
    _, url, headers, _, _ = kube.api.param_serialize(method="GET", resource_path="/version",
                                                     header_params={"Accept": "application/json"},
                                                     auth_settings=["BearerToken"])
    response = kube.api.call_api("GET", url, header_params=headers, _request_timeout=kube.timeout)
    response.read()
    date = response.headers.get("Date")
    return email.utils.parsedate_to_datetime(date) if date else None


def _fetch_metrics(targets: dict[str, str], timeout: float) -> dict[str, int]:
    def one(url: str) -> int | None:
        try:
            with urllib.request.urlopen(url, timeout=timeout) as response:
                return status.count_tunnels_up(response.read().decode())
        except (OSError, ValueError):
            return None  # unreachable, timed out, or not Prometheus text: shown as "-"

    if not targets:
        return {}
    with ThreadPoolExecutor(min(32, len(targets))) as pool:
        results = dict(zip(targets, pool.map(one, targets.values()), strict=True))
    return {name: up for name, up in results.items() if up is not None}


# -- print ----------------------------------------------------------------------------------------

def _table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    return "\n".join("   ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)).rstrip()
                     for line in [headers, *rows])


def _dash(value: object) -> str:
    return "-" if value is None or value == () else str(value)


# -- the commands ---------------------------------------------------------------------------------

def _statuses(kube: Kube, ns: str) -> list[Any] | None:
    """The TunnelStatus objects; None when not allowed or the CRD is not installed."""
    try:
        return kube.list(PLURAL, ns)
    except ApiError as exc:
        if exc.status in (403, 404):
            return None
        raise CannotRun(f"cannot read tunnelstatuses in {ns}: {exc}") from exc
    except (Urllib3Error, OSError) as exc:
        raise CannotRun(f"cannot reach the API server to read tunnelstatuses: {exc}") from exc


def _age(seconds: int | None) -> str:
    if seconds is None:
        return "-"
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def _generation(row: status.StatusRow) -> str:
    """The generation applied; ``applied/wanted`` when the node runs another one than its ConfigMaps hold."""
    if row.generation_wanted is None or row.generation_applied == row.generation_wanted:
        return row.generation_applied or "-"
    return f"{row.generation_applied or '-'}/{row.generation_wanted}"


def _tunnels(row: status.StatusRow) -> str:
    if row.tunnels_up is None:
        return "-"
    return f"{row.tunnels_up}/{row.tunnels_expected}" if row.tunnels_expected is not None else str(row.tunnels_up)


def run_status(args: argparse.Namespace) -> int:
    if not args.watch:
        return _status_once(args)
    try:
        while True:
            sys.stdout.write("\x1b[H\x1b[2J" if sys.stdout.isatty() else "\n")
            print(f"Every {args.interval:g}s: kubectl fabmesh status    {format_time(datetime.now(UTC))}\n")
            _status_once(args)
            sys.stdout.flush()
            time.sleep(args.interval)
    except KeyboardInterrupt:
        return 0


def _status_once(args: argparse.Namespace) -> int:
    settings, ns = _settings(args)
    kube = _kube(args)
    nodes = _read("nodes", lambda: kube.list("nodes"))
    configmaps = _read(f"configmaps in {ns}", lambda: kube.list("configmaps", ns))
    secrets = _read(f"secrets in {ns}", lambda: kube.list("secrets", ns), forbidden_ok=True)
    pods = _read(f"pods in {ns}", lambda: kube.list("pods", ns, AGENT_SELECTOR), forbidden_ok=True) or []
    tunnels_up = None
    if args.metrics:
        tunnels_up = _fetch_metrics(status.metrics_targets(nodes, settings, args.metrics_port), args.metrics_timeout)
    statuses = _statuses(kube, ns)
    server_now = _read("the server's date", lambda: _server_date(kube))
    rows = status.status_rows(nodes, configmaps, secrets, pods, settings, tunnels_up,
                              cluster.observed_by_node(statuses), server_now)
    if args.json:
        print(json.dumps([{**asdict(r), "role": _role(r), "communities": list(r.communities)} for r in rows],
                         indent=2))
        return 0
    headers = ["NAME", "ROLE", "POD-CIDR", "COMMUNITIES", "CERT-EXPIRES", "AGENT", "PEERS", "TUNNELS-UP",
               "GENERATION", "STATUS-AGE", "LAST-ERROR"]
    print(_table(headers, [[r.name, _role(r), _dash(r.pod_cidr), ",".join(r.communities) or "-",
                            _dash(r.cert_expires), _dash(r.agent), _dash(r.peers), _tunnels(r), _generation(r),
                            _age(r.status_age_s), _dash(r.last_error)[:80]]
                           for r in rows]))
    if statuses is None:
        print(f"(cannot list tunnelstatuses in {ns}: TUNNELS-UP only with --metrics)", file=sys.stderr)
    if secrets is None:
        print(f"(cannot list secrets in {ns}: CERT-EXPIRES from the nodes' {STATUS_ANNOTATION} annotation)",
              file=sys.stderr)
    return 0


def run_doctor(args: argparse.Namespace) -> int:
    settings, ns = _settings(args)
    kube = _kube(args)
    lease_name = settings.leader_election.lease_name
    state = doctor.ClusterState(
        nodes=_read("nodes", lambda: kube.list("nodes")),
        configmaps=_read(f"configmaps in {ns}", lambda: kube.list("configmaps", ns)),
        secrets=_read(f"secrets in {ns}", lambda: kube.list("secrets", ns), forbidden_ok=True),
        pods=_read(f"pods in {ns}", lambda: kube.list("pods", ns, AGENT_SELECTOR)),
        lease=_read(f"lease {ns}/{lease_name}", lambda: kube.get("leases", lease_name, ns), forbidden_ok=True),
        events=_read("events", lambda: kube.list("events", EVENTS_NAMESPACE), forbidden_ok=True),
        server_date=_read("the server's date", lambda: _server_date(kube)),
        now=datetime.now(UTC), namespace=ns, settings=settings, statuses=_statuses(kube, ns))
    found = doctor.run_checks(state, agent_pods=not args.no_agent_pods)
    if args.json:
        print(json.dumps([{**asdict(c), "name": c.name.value, "status": c.status.value} for c in found], indent=2))
        return doctor.exit_code(found)
    width = max(len(c.name) for c in found)
    for check in found:
        print(f"{check.status.value:<4}  {check.name.value:<{width}}  {check.message}")
        if check.status is not doctor.Status.PASS and check.hint:
            print(f"{'':<4}  {'':<{width}}  fix: {check.hint}")
    counts = {s: sum(1 for c in found if c.status is s) for s in doctor.Status}
    print(f"\n{counts[doctor.Status.FAIL]} FAIL, {counts[doctor.Status.WARN]} WARN, "
          f"{counts[doctor.Status.PASS]} PASS")
    return doctor.exit_code(found)


def _render(dot_text: str, output: Path, dot: str) -> None:
    fmt = output.suffix.lower().lstrip(".")
    result = subprocess.run([dot, f"-T{fmt}", "-o", str(output)], input=dot_text, text=True,
                            capture_output=True, check=False)
    if result.returncode != 0:
        raise CannotRun(f"dot failed to render {output}: {result.stderr.strip()}")


def run_graph(args: argparse.Namespace) -> int:
    dot = None
    as_json = args.output is not None and str(args.output) == "json"
    if args.output is not None and not as_json:
        if args.output.suffix.lower().lstrip(".") not in RENDER_FORMATS:
            raise CannotRun(f"--output {args.output}: the file name must end in .svg or .png")
        dot = shutil.which("dot")
        if dot is None:
            raise CannotRun("--output needs Graphviz's `dot` binary, which is not on PATH: install Graphviz "
                            "(e.g. apt-get install graphviz), or leave out --output to print DOT")
    settings, ns = _settings(args)
    kube = _kube(args)
    nodes = _read("nodes", lambda: kube.list("nodes"))
    configmaps = _read(f"configmaps in {ns}", lambda: kube.list("configmaps", ns))
    observed = cluster.observed_by_node(_statuses(kube, ns))
    if as_json:
        print(json.dumps(mesh_json(nodes, configmaps, settings, observed), indent=2))
        return 0
    text = mesh_dot(nodes, configmaps, settings, observed)
    if dot is None:
        sys.stdout.write(text)
    else:
        _render(text, args.output, dot)
        print(f"wrote {args.output}", file=sys.stderr)
    return 0


def run_tunnels(args: argparse.Namespace) -> int:
    settings, ns = _settings(args)
    kube = _kube(args)
    obj = _read(f"tunnelstatus {ns}/{args.node}", lambda: kube.get(PLURAL, args.node, ns))
    if obj is None:
        raise CannotRun(f"no TunnelStatus {ns}/{args.node}: is {args.node} an edge or the connector, and does the "
                        "operator serve it (kubectl fabmesh doctor)?")
    report = parse_report(obj)
    if report is None:
        raise CannotRun(f"{args.node} has not published its tunnel state yet: is its agent running and able to "
                        "reach the API server (its log says action=write-status)?")
    nodes = _read("nodes", lambda: kube.list("nodes"))
    rows = tunnel_rows(args.node, report, nodes, settings)
    if args.output == "json":
        print(json.dumps({"node": args.node, **report.to_api(), "paths": {r.peer: r.path for r in rows}}, indent=2))
        return 0
    print(_table(["PEER", "STATE", "SINCE", "LOCAL", "REMOTE", "NAT", "BYTES-IN", "BYTES-OUT", "PKTS-IN",
                  "PKTS-OUT", "PATH"],
                 [[r.peer, r.state, _dash(r.since), _dash(r.local), _dash(r.remote), r.nat, str(r.bytes_in),
                   str(r.bytes_out), str(r.packets_in), str(r.packets_out), r.path] for r in rows]))
    extra = f", {report.tunnels_expected - len(report.tunnels)} up and not listed" if report.truncated else ""
    print(f"\n{report.tunnels_up}/{report.tunnels_expected} up{extra}; config {report.config_generation or '-'}; "
          f"written {report.written_at or '-'}" + (f"; last error: {report.last_error}" if report.last_error else ""))
    return 0


def _get_raw(kube: Kube, path: str, accept: str = "text/plain") -> str:
    """A GET as text (a node-proxied /metrics, which our JSON client would try to decode), query included."""
    _, url, headers, _, _ = kube.api.param_serialize(method="GET", resource_path=path,
                                                     header_params={"Accept": accept},
                                                     auth_settings=["BearerToken"])
    response = kube.api.call_api("GET", url, header_params=headers, _request_timeout=kube.timeout)
    response.read()
    text = response.data.decode(errors="replace") if response.data else ""
    if not 200 <= response.status < 300:
        raise ApiError(response.status, response.reason or "", text)
    return text


def _read_counters(kube: Kube, hosts: list[str], port: int) -> tuple[Counters, dict[str, str]]:
    """The hosts' CHILD_SA counters, one after the other in the given order; and the hosts not read, with why."""
    found: Counters = {}
    unread = {}
    for host in hosts:
        try:
            text = _get_raw(kube, f"/api/v1/nodes/{host}:{port}/proxy/metrics")
            counters = ping.counters_from_metrics(host, text)
        except ApiError as exc:
            unread[host] = f"{host} ({exc.status} {exc.reason}: {exc.body.strip()[:120]})"
            continue
        except (TimeoutError, ReadTimeoutError, ConnectTimeoutError):
            unread[host] = f"{host} (no answer through the API server's node proxy within {kube.timeout:g}s)"
            continue
        except (Urllib3Error, OSError, ValueError) as exc:
            unread[host] = f"{host} ({exc})"
            continue
        if counters is None:
            unread[host] = f"{host} (its metrics have no {ping.SA_PACKETS_SAMPLE}: an older agent?)"
            continue
        found.update(counters)
    return found, unread


def _exec_refusal(exc: ApiException) -> str:
    """The API server's words from a refused exec: the WebSocket client packs status, headers and body into
    ``reason`` (``Handshake status 403 Forbidden -+-+- {headers} -+-+- {body}``)."""
    parts = str(exc.reason or "").split(" -+-+- ")
    status_line = parts[0].removeprefix("Handshake status ").strip()
    try:
        message = json.loads(parts[-1]).get("message", "") if len(parts) > 1 else ""
    except ValueError:
        message = ""
    return f"{status_line or exc.status}" + (f": {message}" if message else "")


def _exec(kube: Kube, pod: dict[str, Any], container: str | None, argv: list[str], timeout: float) -> str:
    """Run ``argv`` in the Pod through the pods/exec API; its stdout and stderr together."""
    meta = pod["metadata"]
    container = container or pod["spec"]["containers"][0]["name"]
    try:
        ws = stream(CoreV1Api(kube.api).connect_get_namespaced_pod_exec, meta["name"], meta["namespace"],
                    container=container, command=argv, stdin=False, stdout=True, stderr=True, tty=False,
                    _preload_content=False, _request_timeout=timeout)
    except ApiException as exc:
        raise CannotRun(f"cannot exec in Pod {meta['namespace']}/{meta['name']}: {_exec_refusal(exc)}; "
                        "is its node reachable from the API server (kubectl logs works?), and may you use "
                        "pods/exec?") from exc
    except (Urllib3Error, OSError, WebSocketException) as exc:
        raise CannotRun(f"cannot exec in Pod {meta['namespace']}/{meta['name']}: {exc}") from exc
    output = []
    deadline = time.monotonic() + timeout
    while ws.is_open() and time.monotonic() < deadline:
        ws.update(timeout=1)
        output.append(ws.read_stdout() if ws.peek_stdout() else "")
        output.append(ws.read_stderr() if ws.peek_stderr() else "")
    ws.close()
    return "".join(output)


def _resolve(kube: Kube, ref: ping.Ref, nodes: list[dict[str, Any]], role: str) -> tuple[ping.End, Any]:
    """The end, and for a source the Pod to exec in."""
    named = {cluster.name_of(n): n for n in nodes}
    if ref.kind is ping.Kind.IP:
        if role == "SRC":
            raise CannotRun(f"SRC {ref.name}: an IP address cannot run a probe; name a Pod or a Node")
        return ping.ip_end(ref.name, nodes), None
    pod = None
    if ref.kind in (ping.Kind.POD, None):
        pod = _read(f"pod {ref.namespace}/{ref.name}", lambda: kube.get("pods", ref.name, ref.namespace))
        if pod is None and ref.kind is ping.Kind.POD:
            raise CannotRun(f"{role} {ref.name}: no Pod {ref.namespace}/{ref.name}")
    try:
        if pod is not None:
            return ping.pod_end(pod), pod
        if ref.name not in named:
            raise CannotRun(f"{role} {ref.name}: no Pod {ref.namespace}/{ref.name} and no Node {ref.name}")
        end = ping.node_end(named[ref.name])
    except ping.RefError as exc:
        raise CannotRun(f"{role}: {exc}") from exc
    if role == "DST":
        return end, None
    selector = urllib.parse.quote(f"spec.nodeName={ref.name}")
    pods = _read(f"pods on {ref.name}", lambda: json.loads(_get_raw(kube, f"/api/v1/pods?fieldSelector={selector}",
                                                                    "application/json")).get("items", []))
    host_pod = ping.exec_pod_on(ref.name, pods)
    if host_pod is None:
        raise CannotRun(f"SRC node/{ref.name}: no Running hostNetwork Pod on it to probe from; name a Pod on "
                        "that node instead")
    return end, host_pod


def _print_verdict(v: ping.Verdict) -> None:
    def side(end: ping.End) -> str:
        what = f"{end.namespace}/{end.name}" if end.namespace else end.name
        return f"{end.kind.value} {what} ({end.ip}, node {end.node or '?'})"

    print(f"{side(v.source)} -> {side(v.destination)}: {v.received}/{v.transmitted} replies")
    intended = f" (the rules intend {v.intended.value})" if v.intended and v.intended.value != v.path.value else ""
    print(f"path: {v.path.value}{intended}" + (f": {v.reason}" if v.reason else ""))
    if v.evidence:
        print("\nSAs that counted the probe (and any other traffic in that window):")
        print(_table(["HOST", "SA-PEER", "PKTS-IN", "PKTS-OUT"],
                     [[c.host, c.peer, str(c.packets_in), str(c.packets_out)] for c in v.evidence]))
    for host in v.unread:
        print(f"(could not read the counters of {host})", file=sys.stderr)
    if not v.ok and v.probe_output.strip():
        print("\nping said:\n" + v.probe_output.rstrip(), file=sys.stderr)


def run_ping(args: argparse.Namespace) -> int:
    if args.count < 1:
        raise CannotRun("--count must be at least 1")
    settings, _ = _settings(args)
    try:
        src_ref, dst_ref = ping.parse_ref(args.src, args.pod_namespace), ping.parse_ref(args.dst, args.pod_namespace)
    except ping.RefError as exc:
        raise CannotRun(str(exc)) from exc
    kube = _kube(args)
    nodes = _read("nodes", lambda: kube.list("nodes"))
    metrics = Kube(kube.api, timeout=args.metrics_timeout)
    source, pod = _resolve(kube, src_ref, nodes, "SRC")
    destination, _ = _resolve(kube, dst_ref, nodes, "DST")
    mesh = ping.mesh_of(nodes, settings)
    hosts = ping.tunnel_hosts(source.node, destination.node, mesh)
    before, unread = _read_counters(metrics, hosts, args.metrics_port)
    output = _exec(kube, pod, args.container, ping.ping_argv(destination.ip, args.count), timeout=args.count + 15)
    after, unread_after = _read_counters(metrics, list(reversed(hosts)), args.metrics_port)
    result = ping.verdict(source, destination, mesh, ping.parse_ping(output), counted(before, after),
                          [{**unread_after, **unread}[h] for h in hosts if h in unread or h in unread_after], output)
    if args.output == "json":
        print(json.dumps(result.as_json(), indent=2))
    else:
        _print_verdict(result)
    return 0 if result.ok else 1


RUNNERS: dict[str, Callable[[argparse.Namespace], int]] = {
    "status": run_status, "doctor": run_doctor, "graph": run_graph, "tunnels": run_tunnels, "ping": run_ping,
}
