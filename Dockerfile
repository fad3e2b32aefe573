# One image for every fabmesh component: operator, connector, agent and the strongSwan sidecar
# (`fabmesh charon`). Multi-arch: nothing here is architecture-specific, so for edge gateways on ARM
#   docker buildx build --platform linux/amd64,linux/arm64 -t ghcr.io/fabmesh/fabmesh:0.1.0 --push .
# The nodes tier builds it without Docker or a registry: python -m fabmesh.testenv.product_image
# (buildah, on an mmdebstrap base; docs/real-nodes.md).
# BASE: any Debian bookworm image with Python 3.11 and pip; the tests build one from Debian packages
# (mmdebstrap) and pass it with --build-arg, because no registry is reachable there.
ARG BASE=python:3.11-slim-bookworm
FROM ${BASE}

# strongSwan 5.9 (charon; its VICI plugin ships in strongswan-swanctl), the libipsec backend and AEAD
# (gcm) plugins; the tools the agent and connector drive; ping, so `kubectl fabmesh ping node/NAME`
# can probe from the agent Pod on the host network. The node's container runtime runs the CNI
# plugins, so they are not needed here.
RUN apt-get update \
 && apt-get install -y --no-install-recommends \
      strongswan-charon strongswan-swanctl libcharon-extra-plugins libstrongswan-standard-plugins \
      iproute2 iptables ipset iputils-ping \
 && rm -rf /var/lib/apt/lists/*

WORKDIR /src
COPY pyproject.toml README.md ./
COPY fabmesh ./fabmesh
RUN pip install --no-cache-dir . && rm -rf /src

# The operator runs unprivileged (the chart sets runAsUser 65532); agent and connector need
# NET_ADMIN/NET_RAW, granted as capabilities by their Pod specs.
ENTRYPOINT ["fabmesh"]
CMD ["--help"]
