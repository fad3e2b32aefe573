"""The TCP port fabmesh's own components listen on, in one place for every writer and reader.

The agent and the connector run on the host network, so their metrics port
shares the node with every host-network exporter. Prometheus' "Default port
allocations" wiki gave exporters 9100-9999 and that range has been fully
allocated since 2023: 9100 is node-exporter (fabmesh used it once and
crash-looped next to it), and every other 9xxx port belongs to some exporter
that may well run on a node (9091 Calico felix, 9099 Calico health, 9153
CoreDNS, 9253 node-local-dns, 9400 NVIDIA DCGM, 9808 CSI livenessprobe,
9962-9965 Cilium and Hubble). So the default sits outside it, and outside every
range a Kubernetes node uses itself: 10248-10259 (kubelet, kube-proxy,
controller-manager, scheduler), 10349-10351 (Antrea), 30000-32767 (NodePorts)
and 32768-60999 (Linux ephemeral ports). 10050/10051 (Zabbix) are avoided too.
"""

from __future__ import annotations

# The agent's and the connector's /metrics (``--metrics-port``), and what ``kubectl fabmesh`` scrapes.
DEFAULT_METRICS_PORT = 10120
