"""A real etcd + kube-apiserver on loopback, for the api tier and the lab.

The apiserver runs with Node and RBAC authorization and the NodeRestriction
admission plugin, as production clusters do (so RBAC tests and "what may a
kubelet write" tests mean something), TLS with a serving certificate made by
fabmesh's own PKI, an admin bearer token in ``system:masters``
(``--token-auth-file``), client certificates for kubelet identities
(``system:node:<name>``), and a service-account signing key so the TokenRequest
API can mint tokens for least-privilege clients.

By default there is no kube-controller-manager: nothing garbage-collects owner
references and no controller creates a namespace's ``default`` ServiceAccount.
The ``ServiceAccount`` admission plugin is therefore off (as in
controller-runtime's envtest), and fabmesh deletes what it owns explicitly
instead of relying on GC. Real-node tests add kube-controller-manager and
kube-scheduler with :meth:`ControlPlane.start_controllers`; a control plane made
with ``service_accounts=True`` keeps the ``ServiceAccount`` admission plugin on, so
Pods get their projected token and ``kube-root-ca.crt`` (what ``helm install`` of
the chart on real nodes needs), and its serving certificate also names the
``kubernetes`` Service's ClusterIP, as kubeadm's does. The API server reaches
kubelets at their InternalIP with a ``kubelet-client`` certificate; from the
box's loopback it has no route into the lab.

With ``netns`` set (a lab host's namespace, e.g. a cloud node that is not the
connector) etcd and kube-apiserver run *inside* it (``nsenter --net``): the API
server listens on the host's address there (``lab_url``, for kubelets) and dials
kubelets through that host's routes, i.e. through the mesh. Clients in the root
namespace (pytest, kubectl, the lab's operator) reach it through two relays and
a unix socket, as ``NodeLink`` does the other way round: ``socat`` in the host's
namespace from ``<dir>/api.sock`` to ``127.0.0.1:<port>`` there, and ``socat``
in the root namespace from ``127.0.0.1:<port>`` (loopback only) to the socket.
The root namespace gains no interface, address or route.
"""

from __future__ import annotations

import base64
import contextlib
import datetime
import ipaddress
import json
import os
import secrets
import signal
import socket
import ssl
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fabmesh.pki.authority import KeyPair, issue_leaf, new_ca
from fabmesh.testenv.assets import Assets, ensure_assets
from fabmesh.testenv.hosts import stop_pid, wait_for

SERVICE_CIDR = "10.96.0.0/12"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class ControlPlane:
    """Start with :meth:`start`, stop with :meth:`stop` (by PID)."""

    directory: Path
    assets: Assets | None = None
    # How long etcd and kube-apiserver may take to become ready: 90 s on a loaded 2-core host; several
    # minutes under software emulation (the kernel tier's VM, where the lab passes its own timeout).
    ready_timeout: float = 90.0
    # Keep the ServiceAccount admission plugin on (Pods get tokens); needs kube-controller-manager,
    # which creates each namespace's default ServiceAccount, or Pods using it are refused.
    service_accounts: bool = False
    pids: list[int] = field(default_factory=list)
    url: str = ""
    token: str = ""
    ca_pem: str = ""
    ca: KeyPair | None = None
    # A lab host's network namespace to run etcd and kube-apiserver in, and the host's address there
    # (the API server's advertise address, on its serving certificate). None: the box's loopback.
    netns: str | None = None
    host_address: str | None = None
    lab_url: str = ""  # with netns: https://<host_address>:<port>, what kubelets in the lab dial

    @property
    def kubeconfig(self) -> Path:
        return self.directory / "kubeconfig"

    def start(self) -> ControlPlane:
        if (self.netns is None) != (self.host_address is None):
            raise ValueError("ControlPlane: netns and host_address go together")
        self.assets = self.assets or ensure_assets()
        self.directory.mkdir(parents=True, exist_ok=True)
        etcd_url = self._start_etcd()
        self._start_apiserver(etcd_url)
        self._write_kubeconfig(self.kubeconfig, user="admin", token=self.token)
        return self

    def _in_netns(self, cmd: list[str]) -> list[str]:
        # nsenter --net enters the network namespace only (``ip netns exec`` also remounts /sys).
        return ["nsenter", f"--net=/run/netns/{self.netns}", *cmd] if self.netns else cmd

    def _ready(self, url: str, token: str | None = None, context: ssl.SSLContext | None = None) -> bool:
        """``url`` answers 200, asked from where it listens (the host's namespace, with netns)."""
        if self.netns is None:
            return _http_ok(url, token, context)
        return _curl_ok_in(self.netns, url, token)

    def _spawn(self, name: str, cmd: list[str]) -> subprocess.Popen[bytes]:
        cmd = self._in_netns(cmd) if name in ("etcd", "kube-apiserver", "relay-netns") else cmd
        with open(self.directory / f"{name}.log", "ab") as log:
            proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                    start_new_session=True)
        self.pids.append(proc.pid)
        (self.directory / f"{name}.pid").write_text(str(proc.pid))
        return proc

    def _start_etcd(self) -> str:
        assert self.assets
        client, peer = free_port(), free_port()
        url = f"http://127.0.0.1:{client}"
        proc = self._spawn("etcd", [
            str(self.assets.path("etcd")), "--data-dir", str(self.directory / "etcd"),
            "--listen-client-urls", url, "--advertise-client-urls", url,
            "--listen-peer-urls", f"http://127.0.0.1:{peer}",
            "--initial-advertise-peer-urls", f"http://127.0.0.1:{peer}",
            "--initial-cluster", f"default=http://127.0.0.1:{peer}",
            "--unsafe-no-fsync", "--log-level", "warn",
        ])
        wait_for(lambda: proc.poll() is not None or self._ready(f"{url}/health"), timeout=self.ready_timeout / 3,
                 what="etcd /health")
        if proc.poll() is not None:
            raise RuntimeError(f"etcd exited ({proc.returncode}); see {self.directory / 'etcd.log'}")
        return url

    def _start_apiserver(self, etcd_url: str) -> None:
        assert self.assets
        now = datetime.datetime.now(datetime.UTC)
        ca = self.ca = new_ca("fabmesh-testenv-ca", now=now)
        # In-cluster clients dial the kubernetes Service's ClusterIP (the first address of the range).
        service_ip = str(ipaddress.ip_network(SERVICE_CIDR).network_address + 1)
        serving = issue_leaf(ca, name="localhost",
                             addresses=["127.0.0.1", service_ip, *filter(None, [self.host_address])], now=now)
        certs = self.directory / "pki"
        certs.mkdir(exist_ok=True)
        (certs / "ca.crt").write_text(ca.cert_pem)
        (certs / "apiserver.crt").write_text(serving.cert_pem)
        (certs / "apiserver.key").write_text(serving.key_pem)
        (certs / "apiserver.key").chmod(0o600)
        # The identity the apiserver shows a kubelet (logs, exec, proxy); a real kubelet authorizes it
        # with a SubjectAccessReview, which system:masters passes.
        kubelet_client = client_certificate(ca, "kube-apiserver-kubelet-client", "system:masters")
        (certs / "kubelet-client.crt").write_text(kubelet_client.cert_pem)
        (certs / "kubelet-client.key").write_text(kubelet_client.key_pem)
        (certs / "kubelet-client.key").chmod(0o600)
        sa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        (certs / "sa.key").write_bytes(sa_key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
        (certs / "sa.pub").write_bytes(sa_key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
        self.token = secrets.token_hex(24)
        (certs / "tokens.csv").write_text(f'{self.token},admin,admin,"system:masters"\n')
        self.ca_pem = ca.cert_pem
        port = free_port()
        self.url = f"https://127.0.0.1:{port}"
        # In a lab host: every address of the host (its own loopback for the relay, its WAN address for
        # kubelets); the advertise address is the one kubelets and the kubernetes Service would use.
        bind, advertise = ("0.0.0.0", self.host_address) if self.host_address else ("127.0.0.1", "127.0.0.1")
        proc = self._spawn("kube-apiserver", [
            str(self.assets.path("kube-apiserver")),
            "--etcd-servers", etcd_url,
            "--bind-address", bind, "--advertise-address", advertise,
            "--secure-port", str(port),
            "--tls-cert-file", str(certs / "apiserver.crt"),
            "--tls-private-key-file", str(certs / "apiserver.key"),
            "--client-ca-file", str(certs / "ca.crt"),
            "--kubelet-client-certificate", str(certs / "kubelet-client.crt"),
            "--kubelet-client-key", str(certs / "kubelet-client.key"),
            # Lab node names resolve nowhere; kubeadm clusters prefer InternalIP the same way.
            "--kubelet-preferred-address-types", "InternalIP,ExternalIP,Hostname",
            "--token-auth-file", str(certs / "tokens.csv"),
            "--authorization-mode", "Node,RBAC",
            "--enable-admission-plugins", "NodeRestriction",
            "--service-cluster-ip-range", SERVICE_CIDR,
            "--service-account-issuer", "https://kubernetes.default.svc",
            "--service-account-key-file", str(certs / "sa.pub"),
            "--service-account-signing-key-file", str(certs / "sa.key"),
            *([] if self.service_accounts else ["--disable-admission-plugins", "ServiceAccount"]),
            "--allow-privileged=true",
            # Loopback may not be published as the kubernetes Service endpoint; nothing here needs it.
            "--endpoint-reconciler-type", "none",
            "--cert-dir", str(certs),
            "--v", "1",
        ])
        context = ssl.create_default_context(cadata=ca.cert_pem)
        wait_for(lambda: proc.poll() is not None
                 or self._ready(f"{self.url}/readyz", token=self.token, context=context),
                 timeout=self.ready_timeout, interval=0.2, what="kube-apiserver /readyz")
        if proc.poll() is not None:
            raise RuntimeError(f"kube-apiserver exited ({proc.returncode}); "
                               f"see {self.directory / 'kube-apiserver.log'}")
        if self.host_address:
            self.lab_url = f"https://{self.host_address}:{port}"
            self._relay_to_root(port, context)

    def _relay_to_root(self, port: int, context: ssl.SSLContext) -> None:
        """Loopback in the root namespace -> a unix socket -> loopback in the host's namespace; ``url``
        becomes the root side (a unix socket crosses namespaces, an address would need a route)."""
        sock = self.directory / "api.sock"
        inside = self._spawn("relay-netns", ["socat", f"UNIX-LISTEN:{sock},fork,unlink-early,mode=600",
                                             f"TCP:127.0.0.1:{port}"])
        wait_for(lambda: inside.poll() is not None or sock.exists(), timeout=10, what=f"API relay socket {sock}")
        root_port = free_port()
        root = self._spawn("relay-root", ["socat", f"TCP-LISTEN:{root_port},bind=127.0.0.1,fork,reuseaddr",
                                          f"UNIX-CONNECT:{sock}"])
        self.url = f"https://127.0.0.1:{root_port}"
        wait_for(lambda: inside.poll() is not None or root.poll() is not None
                 or _http_ok(f"{self.url}/readyz", token=self.token, context=context),
                 timeout=10, interval=0.2, what="the API server through the root relay")
        for name, relay in (("relay-netns", inside), ("relay-root", root)):
            if relay.poll() is not None:
                raise RuntimeError(f"{name} exited ({relay.returncode}); see {self.directory / f'{name}.log'}")

    def start_controllers(self, binaries: Path) -> None:
        """Run kube-controller-manager and kube-scheduler too (from ``ensure_node_assets()``'s directory).

        Only for real nodes: with them, owner references are garbage-collected, DaemonSets and
        ReplicaSets make Pods and Pods without ``nodeName`` are scheduled, which the api tier's tests
        (written for an envtest-like control plane) do not expect. Both use the admin identity and
        serve nothing (``--secure-port 0``); no leader election, there is one of each.
        """
        certs = self.directory / "pki"
        controller_manager = self._spawn("kube-controller-manager", [
            str(binaries / "kube-controller-manager"), "--kubeconfig", str(self.kubeconfig),
            "--secure-port", "0", "--leader-elect=false",
            "--service-account-private-key-file", str(certs / "sa.key"),
            "--root-ca-file", str(certs / "ca.crt"), "--v", "1"])
        scheduler = self._spawn("kube-scheduler", [
            str(binaries / "kube-scheduler"), "--kubeconfig", str(self.kubeconfig),
            "--secure-port", "0", "--leader-elect=false", "--v", "1"])
        time.sleep(1)
        for name, proc in (("kube-controller-manager", controller_manager), ("kube-scheduler", scheduler)):
            if proc.poll() is not None:
                raise RuntimeError(f"{name} exited ({proc.returncode}); see {self.directory / f'{name}.log'}")

    def _write_kubeconfig(self, path: Path, *, user: str, token: str | None = None,
                          client: KeyPair | None = None, namespace: str = "default") -> None:
        credentials = {"token": token} if token else {} if client is None else {
            "client-certificate-data": base64.b64encode(client.cert_pem.encode()).decode(),
            "client-key-data": base64.b64encode(client.key_pem.encode()).decode()}
        config = {
            "apiVersion": "v1", "kind": "Config",
            "clusters": [{"name": "fabmesh", "cluster": {
                "server": self.url,
                "certificate-authority-data": base64.b64encode(self.ca_pem.encode()).decode()}}],
            "users": [{"name": user, "user": credentials}],
            "contexts": [{"name": user, "context": {"cluster": "fabmesh", "user": user,
                                                    "namespace": namespace}}],
            "current-context": user,
        }
        path.write_text(yaml.safe_dump(config))
        path.chmod(0o600)

    def kubeconfig_for_token(self, name: str, token: str, namespace: str = "default") -> Path:
        """A kubeconfig for a least-privilege identity (e.g. a ServiceAccount token)."""
        path = self.directory / f"kubeconfig-{name}"
        self._write_kubeconfig(path, user=name, token=token, namespace=namespace)
        return path

    def kubeconfig_for_node(self, node: str) -> Path:
        """A kubeconfig with the identity a kubelet has (``system:node:<node>`` in ``system:nodes``):
        the Node authorizer and NodeRestriction limit it to what a kubelet may do."""
        assert self.ca is not None, "start the control plane first"
        path = self.directory / f"kubeconfig-node-{node}"
        self._write_kubeconfig(path, user=f"system:node:{node}",
                               client=client_certificate(self.ca, f"system:node:{node}", "system:nodes"))
        return path

    def kubeconfig_for_client(self, user: str, group: str) -> Path:
        """A kubeconfig with a client certificate for ``user`` in ``group``: e.g. ``system:kube-proxy``,
        which the API server's default ``system:node-proxier`` binding already authorizes."""
        assert self.ca is not None, "start the control plane first"
        path = self.directory / f"kubeconfig-{user.replace(':', '-')}"
        self._write_kubeconfig(path, user=user, client=client_certificate(self.ca, user, group))
        return path

    def stop(self) -> None:
        for pid in reversed(self.pids):
            # Each was started as its own session: the group also holds what socat forked per connection.
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pid, signal.SIGTERM)
            stop_pid(pid, timeout=10)
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pid, signal.SIGKILL)
        self.pids.clear()
        with contextlib.suppress(FileNotFoundError):
            (self.directory / "api.sock").unlink()


def client_certificate(ca: KeyPair, user: str, group: str) -> KeyPair:
    """An X.509 client certificate as the apiserver reads it: CN is the user, O the group."""
    now = datetime.datetime.now(datetime.UTC)
    ca_cert = x509.load_pem_x509_certificate(ca.cert_pem.encode())
    ca_key = serialization.load_pem_private_key(ca.key_pem.encode(), password=None)
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, user),
                         x509.NameAttribute(NameOID.ORGANIZATION_NAME, group)])
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(ca_cert.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
            .sign(ca_key, hashes.SHA256()))  # type: ignore[arg-type]
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption()).decode()
    return KeyPair(cert_pem=cert.public_bytes(serialization.Encoding.PEM).decode(), key_pem=key_pem)


def _http_ok(url: str, token: str | None = None, context: ssl.SSLContext | None = None) -> bool:
    request = urllib.request.Request(url)
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=2, context=context) as response:
            return response.status == 200
    except OSError:
        return False


def _curl_ok_in(netns: str, url: str, token: str | None) -> bool:
    """200 from ``url``, asked from inside ``netns`` (curl, as ``kubenode._healthz_in`` does)."""
    cmd = ["nsenter", f"--net=/run/netns/{netns}", "curl", "-s", "--max-time", "2", "-o", "/dev/null",
           "-w", "%{http_code}"]
    if url.startswith("https"):
        cmd += ["-k"]  # the server is ours, just started; the relay check outside verifies the chain
    if token:
        cmd += ["-H", f"Authorization: Bearer {token}"]
    done = subprocess.run([*cmd, url], capture_output=True, text=True)
    return done.stdout.strip() == "200"


@contextlib.contextmanager
def control_plane(directory: Path) -> Iterator[ControlPlane]:
    cp = ControlPlane(directory=directory)
    try:
        yield cp.start()
    finally:
        cp.stop()


def main() -> int:
    """Start a control plane in the foreground until interrupted (for manual poking)."""
    import argparse
    import tempfile

    parser = argparse.ArgumentParser(prog="python -m fabmesh.testenv.controlplane",
                                     description="Run etcd + kube-apiserver on loopback until Ctrl-C.")
    parser.add_argument("--dir", type=Path, default=None, help="state directory (default: a temp dir)")
    args = parser.parse_args()
    directory = args.dir or Path(tempfile.mkdtemp(prefix="fabmesh-cp-"))
    with control_plane(directory) as cp:
        print(json.dumps({"kubeconfig": str(cp.kubeconfig), "url": cp.url, "pid": os.getpid()}), flush=True)
        with contextlib.suppress(KeyboardInterrupt):
            while True:
                time.sleep(3600)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
