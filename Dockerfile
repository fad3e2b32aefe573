# One image for every fabmesh component: operator, connector, agent and the strongSwan sidecar
# (`fabmesh charon`). Multi-arch: nothing here is architecture-specific, so for edge gateways on ARM
#   docker buildx build --platform linux/amd64,linux/arm64 -t ghcr.io/fabmesh/fabmesh:0.1.0 --push .
# Not built in this project's CI (no Docker engine there); the lab and tests use the same code directly.
FROM python:3.11-slim-bookworm

# strongSwan 5.9 (charon + VICI), the libipsec backend and AEAD (gcm) plugins; the tools the agent
# and connector drive. The node's container runtime runs the CNI plugins, so they are not needed here.
RUN apt-get update \
 && apt-get install -y --no-install-recommends \
      strongswan-charon libcharon-extra-plugins libstrongswan-standard-plugins \
      iproute2 iptables ipset \
 && rm -rf /var/lib/apt/lists/*

WORKDIR /src
COPY pyproject.toml README.md ./
COPY fabmesh ./fabmesh
RUN pip install --no-cache-dir . && rm -rf /src

# The operator runs unprivileged (the chart sets runAsUser 65532); agent and connector need
# NET_ADMIN/NET_RAW, granted as capabilities by their Pod specs.
ENTRYPOINT ["fabmesh"]
CMD ["--help"]
