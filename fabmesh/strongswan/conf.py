"""Render the ``strongswan.conf`` a fabmesh-managed charon runs with.

fabmesh talks to charon only over VICI, so the file just picks the plugins and
the IPsec backend. Two backends exist:

* ``kernel``: ESP in the Linux kernel (xfrm states and policies). Production.
* ``libipsec``: ESP in userspace over a TUN device (``kernel-libipsec``). Needed
  where the kernel has no ESP (CONFIG_INET_ESP unset), as on the CI machines.
  Quirks handled here: the plugin must be loaded *before* ``kernel-netlink`` so
  it takes the IPsec half while netlink keeps the networking half; AES-GCM needs
  the ``gcm`` plugin; ``allow_peer_ts`` lets a traffic selector contain the
  IKE peer's own address, and a firewall mark on charon's own packets keeps the
  route libipsec then installs for that address from swallowing IKE itself.

Behind NAT (every edge), charon sends NAT-T keepalives every ``keep_alive_s``
so the router's UDP mapping for port 4500 never expires between packets: the
connector never initiates to an edge, so a lost mapping would cut the edge off
until its next DPD or rekey.

Hole punching (strongSwan mediation, ``node/tunnels.py``): charon offers its peer
every address it has as a candidate endpoint and keeps the best pair that
answers a connectivity check, host addresses first. The pod bridge's address
(the pod CIDR's gateway) is inside the edge pool, which the connector tunnel
carries: a check to it would be answered *through the relay*, and the
"direct" tunnel would ride inside the connector's. ``ignore_interfaces``
(``charon.interfaces_ignore``, exact names) keeps such devices out of
charon's view; IKE never uses them, and libipsec's local-address check for
the pod CIDR's selector is met by the anchor address the agent puts on ``lo``.

We load an explicit plugin list (``load_modular = no``) so a stray file in
``/etc/strongswan.d`` can never change what a node runs.
"""

from __future__ import annotations

from pathlib import Path

from jinja2 import Environment, PackageLoader, StrictUndefined

from fabmesh.mesh.model import Backend

_COMMON_PLUGINS = (
    "random nonce openssl aes sha1 sha2 hmac kdf gcm pem pkcs1 pkcs8 x509 revocation "
    "constraints pubkey"  # X25519 comes from the openssl plugin; Debian ships no curve25519 plugin
)


# The mark charon's own IKE and ESP-in-UDP packets carry (libipsec only); clear of kube-proxy's
# 0x4000/0x8000 and Calico's upper bits.
IKE_FWMARK = "0x2620"


def plugin_list(backend: Backend) -> str:
    kernel = "kernel-libipsec kernel-netlink" if backend is Backend.LIBIPSEC else "kernel-netlink"
    return f"{_COMMON_PLUGINS} {kernel} socket-default vici"


def render_strongswan_conf(
    *,
    backend: Backend,
    vici_socket: Path,
    log_file: Path | None = None,
    install_routes: bool = False,
    log_level: int = 1,
    keep_alive_s: int = 20,
    ignore_interfaces: tuple[str, ...] = (),
) -> str:
    """Return the text of strongswan.conf.

    ``install_routes`` stays off for fabmesh agents: the agent owns its routes.
    """
    env = Environment(loader=PackageLoader("fabmesh.strongswan", "templates"),
                      undefined=StrictUndefined, keep_trailing_newline=True)
    return env.get_template("strongswan.conf.j2").render(
        plugins=plugin_list(backend),
        libipsec=backend is Backend.LIBIPSEC,
        vici_socket=str(vici_socket),
        log_file=str(log_file) if log_file else None,
        install_routes="yes" if install_routes else "no",
        log_level=log_level,
        keep_alive_s=keep_alive_s,
        ike_fwmark=IKE_FWMARK,
        ignore_interfaces=", ".join(ignore_interfaces),
    )
