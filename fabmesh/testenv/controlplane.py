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
``kubernetes`` Service's ClusterIP, as kubeadm's does. The API server
would reach kubelets at their InternalIP with a ``kubelet-client`` certificate;
from the box's loopback it has no route into the lab, so that path waits for
an API server inside the mesh (issue 14).
"""

from __future__ import annotations

import base64
import contextlib
import datetime
import ipaddress
import json
import os
import secrets
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

    @property
    def kubeconfig(self) -> Path:
        return self.directory / "kubeconfig"

    def start(self) -> ControlPlane:
        self.assets = self.assets or ensure_assets()
        self.directory.mkdir(parents=True, exist_ok=True)
        etcd_url = self._start_etcd()
        self._start_apiserver(etcd_url)
        self._write_kubeconfig(self.kubeconfig, user="admin", token=self.token)
        return self

    def _spawn(self, name: str, cmd: list[str]) -> subprocess.Popen[bytes]:
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
        wait_for(lambda: proc.poll() is not None or _http_ok(f"{url}/health"), timeout=self.ready_timeout / 3,
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
        serving = issue_leaf(ca, name="localhost", addresses=["127.0.0.1", service_ip], now=now)
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
        proc = self._spawn("kube-apiserver", [
            str(self.assets.path("kube-apiserver")),
            "--etcd-servers", etcd_url,
            "--bind-address", "127.0.0.1", "--advertise-address", "127.0.0.1",
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
                 or _http_ok(f"{self.url}/readyz", token=self.token, context=context),
                 timeout=self.ready_timeout, interval=0.2, what="kube-apiserver /readyz")
        if proc.poll() is not None:
            raise RuntimeError(f"kube-apiserver exited ({proc.returncode}); "
                               f"see {self.directory / 'kube-apiserver.log'}")

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
            stop_pid(pid, timeout=10)
        self.pids.clear()


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
