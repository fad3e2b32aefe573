"""Real-node configuration and local images: per-node paths, the quirks this machine needs, and an
OCI archive that is deterministic and self-consistent (every digest names its blob)."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
import tomllib
from pathlib import Path

from fabmesh.testenv.cgroups import all_hierarchies, v1_hierarchies
from fabmesh.testenv.images import build_archive
from fabmesh.testenv.kubenode import release_leases, shared_dir_argv
from fabmesh.testenv.nodeconfig import (
    KUBELET_SYSCTLS,
    NodePaths,
    bridge_conflist,
    kube_proxy_config,
    kubelet_config,
    kubelet_launcher,
    render_containerd_config,
)

PATHS = NodePaths(Path("/tmp/lab/edge-1/kube"))


def test_containerd_config_is_per_node_and_restricts_oom_score_adj() -> None:
    config = tomllib.loads(render_containerd_config(PATHS, "fabmesh.local/pause:abc"))
    assert config["version"] == 2
    assert config["root"].startswith("/tmp/lab/edge-1/kube/") and config["state"].startswith("/tmp/lab/edge-1/kube/")
    assert config["grpc"]["address"] == str(PATHS.containerd_socket)
    cri = config["plugins"]["io.containerd.grpc.v1.cri"]
    assert cri["sandbox_image"] == "fabmesh.local/pause:abc"
    assert cri["restrict_oom_score_adj"] is True
    assert cri["cni"] == {"bin_dir": "/usr/lib/cni", "conf_dir": str(PATHS.cni_conf_dir), "max_conf_num": 1}
    assert cri["containerd"]["runtimes"]["runc"]["options"]["SystemdCgroup"] is False


def test_kubelet_config_is_per_node_cgroupfs_v1_and_never_collects_images() -> None:
    config = kubelet_config(PATHS, node_ip="203.0.113.225", cgroup_root="/fabmesh-x", client_ca=Path("/ca.crt"))
    assert (config["failCgroupV1"], config["cgroupDriver"], config["cgroupRoot"]) == (False, "cgroupfs", "/fabmesh-x")
    assert config["podLogsDir"] == str(PATHS.pod_logs)
    assert config["containerRuntimeEndpoint"] == f"unix://{PATHS.containerd_socket}"
    assert config["address"] == "203.0.113.225" and config["readOnlyPort"] == 0
    assert config["authentication"]["anonymous"]["enabled"] is False
    assert config["imageGCHighThresholdPercent"] == 100


def test_bridge_conflist_keeps_leases_in_the_nodes_own_dir() -> None:
    conflist = bridge_conflist("lab", "cni0", "10.244.1.0/24", PATHS.ipam_dir)
    ipam = conflist["plugins"][0]["ipam"]
    assert ipam["dataDir"] == str(PATHS.ipam_dir)
    assert ipam["ranges"] == [[{"subnet": "10.244.1.0/24"}]]


def test_v1_hierarchies_skip_cgroup2() -> None:
    mounts = ("cgroup /sys/fs/cgroup/cpu cgroup rw,cpu 0 0\n"
              "cgroup2 /sys/fs/cgroup/unified cgroup2 rw 0 0\n"
              "cgroup /sys/fs/cgroup/memory cgroup rw,memory 0 0\n"
              "tmpfs /sys/fs/cgroup tmpfs rw 0 0\n")
    assert v1_hierarchies(mounts) == [Path("/sys/fs/cgroup/cpu"), Path("/sys/fs/cgroup/memory")]
    # Teardown also empties the unified hierarchy, where runc makes each container's cgroup too.
    assert all_hierarchies(mounts) == [Path("/sys/fs/cgroup/cpu"), Path("/sys/fs/cgroup/memory"),
                                       Path("/sys/fs/cgroup/unified")]


def _members(archive: bytes) -> dict[str, bytes]:
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()}  # type: ignore[union-attr]


def test_image_archive_is_deterministic_and_every_digest_names_its_blob() -> None:
    names = {"fabmesh.local/busybox:t": ["/bin/sh"], "fabmesh.local/pause:t": ["/bin/sleep", "infinity"]}
    archive = build_archive(b"\x7fELF fake busybox", names)
    assert archive == build_archive(b"\x7fELF fake busybox", names)
    files = _members(archive)
    for path, data in files.items():
        if path.startswith("blobs/sha256/"):
            assert hashlib.sha256(data).hexdigest() == path.rsplit("/", 1)[1]
    index = json.loads(files["index.json"])
    by_name = {m["annotations"]["io.containerd.image.name"]: m for m in index["manifests"]}
    assert set(by_name) == set(names)
    pause = json.loads(files[f"blobs/sha256/{by_name['fabmesh.local/pause:t']['digest'][7:]}"])
    config = json.loads(files[f"blobs/sha256/{pause['config']['digest'][7:]}"])
    assert config["config"]["Entrypoint"] == ["/bin/sleep", "infinity"]
    assert config["os"] == "linux"


def test_kubelet_launcher_masks_every_host_sysctl_and_enters_only_the_network_namespace() -> None:
    script = kubelet_launcher(PATHS, netns="fmtabc-edge-1", cgroup_procs=[Path("/sys/fs/cgroup/cpu/x/cgroup.procs")],
                              kubelet=["/bin/kubelet", "--node-ip", "203.0.113.225"])
    for key in KUBELET_SYSCTLS:
        assert f"/proc/sys/{key}" in script
    assert "nsenter --net=/run/netns/fmtabc-edge-1 /bin/kubelet --node-ip 203.0.113.225" in script
    assert "ip netns exec" not in script  # it would remount /sys and hide the cgroup v1 mounts
    assert "/sys/fs/cgroup/cpu/x/cgroup.procs" in script.splitlines()[2]
    assert "unshare --mount --propagation unchanged" in script


def test_kube_proxy_tells_local_pods_by_cidr_unless_given_their_bridge() -> None:
    paths = NodePaths(Path("/lab/hosts/edge-1/kube"))
    by_cidr = kube_proxy_config(paths, node_name="edge-1", node_ip="172.16.1.2", cluster_cidr="10.244.0.0/16")
    assert "detectLocalMode" not in by_cidr and by_cidr["clusterCIDR"] == "10.244.0.0/16"
    by_bridge = kube_proxy_config(paths, node_name="edge-1", node_ip="172.16.1.2", cluster_cidr="10.244.0.0/16",
                                  local_bridge="fabmesh0")
    assert by_bridge["detectLocalMode"] == "BridgeInterface"
    assert by_bridge["detectLocal"] == {"bridgeInterface": "fabmesh0"}


def test_shared_dir_argv_binds_the_nodes_own_dir_then_execs_the_command() -> None:
    argv = shared_dir_argv(Path("/lab/hosts/edge-1/kube/cni/net.d"), Path("/lab/cni"),
                           ["containerd", "--config", "/lab/c.toml"])
    assert argv[:5] == ["unshare", "--mount", "--propagation", "unchanged", "--"]
    assert argv[5:7] == ["sh", "-c"]
    assert argv[7] == 'mount --bind /lab/hosts/edge-1/kube/cni/net.d /lab/cni && exec "$@"'
    assert argv[8:] == ["sh", "containerd", "--config", "/lab/c.toml"]


def test_release_leases_deletes_only_the_leases_of_the_given_containers(tmp_path: Path) -> None:
    network = tmp_path / "fabmesh"
    network.mkdir()
    (network / "10.233.0.2").write_text("a" * 64 + "\r\neth0")
    (network / "10.233.0.3").write_text("b" * 64 + "\r\neth0")
    (network / "last_reserved_ip.0").write_text("10.233.0.3")
    removed = release_leases({"a" * 64}, tmp_path)
    assert removed == [network / "10.233.0.2"]
    assert sorted(p.name for p in network.iterdir()) == ["10.233.0.3", "last_reserved_ip.0"]
