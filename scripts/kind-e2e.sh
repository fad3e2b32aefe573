#!/usr/bin/env bash
# End-to-end on a kind cluster, for users who have Docker. NOT run in this project's CI (CI has no
# Docker engine; there the same mesh is proven in network namespaces by `./scripts/test.sh`).
#
# What it does: builds the image, creates a kind cluster (1 control plane, 1 connector worker,
# 2 edge workers in community "a"), loads the image, installs the chart with the libipsec backend
# (kind nodes are containers: no ESP in their kernel namespaces is assumed), runs one pod per node
# and pings every pod from every pod.
#
# Needs: docker, kind, kubectl, helm on PATH. Usage: scripts/kind-e2e.sh [cluster-name]
set -euo pipefail
cd "$(dirname "$0")/.."
name=${1:-fabmesh-e2e}
image=ghcr.io/fabmesh/fabmesh:dev
for tool in docker kind kubectl helm; do
  command -v "$tool" >/dev/null || { echo "error: $tool is not on PATH" >&2; exit 2; }
done

docker build -t "$image" .
cat <<YAML | kind create cluster --name "$name" --config -
kind: Cluster
apiVersion: kind.x-k8s.io/v1alpha4
networking: {podSubnet: 10.244.0.0/16}
nodes:
  - role: control-plane
  - role: worker
  - role: worker
    labels: {node-role.kubernetes.io/edge: "", community.fabmesh.io/a: ""}
  - role: worker
    labels: {node-role.kubernetes.io/edge: "", community.fabmesh.io/a: ""}
YAML
kind load docker-image "$image" --name "$name"
# The connector label is one a kubelet may not set (node-restriction.kubernetes.io/): label it as admin.
kubectl label node "$name-worker" node-restriction.kubernetes.io/fabmesh-connector=
helm install fabmesh charts/fabmesh -n fabmesh-system --create-namespace \
  --set image.repository="${image%:*}" --set image.tag="${image##*:}" --set image.pullPolicy=Never \
  --set operator.settings.tunnel.backend=libipsec
kubectl -n fabmesh-system rollout status deploy/fabmesh-operator --timeout=180s

for node in $(kubectl get nodes -o name | sed 's|node/||' | grep -v control-plane); do
  kubectl run "ping-$node" --image=busybox:1.36 --restart=Never \
    --overrides="{\"spec\":{\"nodeName\":\"$node\"}}" -- sleep 3600
done
kubectl wait --for=condition=Ready pod -l run --timeout=180s || kubectl get pods -o wide
fail=0
for src in $(kubectl get pods -o name | grep ping-); do
  for ip in $(kubectl get pods -o jsonpath='{range .items[*]}{.status.podIP}{"\n"}{end}'); do
    if kubectl exec "${src#pod/}" -- ping -c1 -W2 "$ip" >/dev/null; then echo "ok   ${src#pod/} -> $ip"
    else echo "FAIL ${src#pod/} -> $ip"; fail=1; fi
  done
done
echo "delete with: kind delete cluster --name $name"
exit "$fail"
