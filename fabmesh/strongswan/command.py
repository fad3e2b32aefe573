"""``fabmesh charon``: the strongSwan sidecar's entry point: write strongswan.conf, exec charon."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from fabmesh.mesh.model import Backend
from fabmesh.strongswan.conf import render_strongswan_conf

CHARON = "/usr/lib/ipsec/charon"


def register(sub: argparse._SubParsersAction, name: str, help_text: str) -> None:
    parser = sub.add_parser(name, help=help_text, description=f"{help_text}. Replaces itself with charon.")
    parser.add_argument("--run-dir", type=Path, default=Path("/var/run/fabmesh"),
                        help="directory shared with the agent; holds charon.vici (default: /var/run/fabmesh)")
    parser.add_argument("--backend", choices=[b.value for b in Backend], default=Backend.KERNEL.value,
                        help="kernel ESP (default) or userspace libipsec for kernels without ESP")
    parser.add_argument("--log-file", type=Path, default=None, help="charon log file (default: stderr only)")
    parser.add_argument("--ignore-interface", action="append", default=[], metavar="DEVICE",
                        help="a device charon neither uses for IKE nor offers as a hole-punching candidate "
                             "(the pod bridge); repeatable")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    args.run_dir.mkdir(parents=True, exist_ok=True)
    conf = args.run_dir / "strongswan.conf"
    conf.write_text(render_strongswan_conf(backend=Backend(args.backend), vici_socket=args.run_dir / "charon.vici",
                                           log_file=args.log_file,
                                           ignore_interfaces=tuple(args.ignore_interface)))
    os.execve(CHARON, [CHARON], {**os.environ, "STRONGSWAN_CONF": str(conf)})
    return 0  # not reached
