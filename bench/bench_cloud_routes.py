"""What the route agent's document costs at scale: ``routes.yaml`` size, parse and plan time per pass.

Every cloud node's route agent reads one ``routes.yaml`` listing one /32 per edge and plans from it on
every change and every resync (30 s). It must stay far below a ConfigMap's 1 MiB and well under a second
of CPU per pass at 10,000 edges. Times are CPU time (``time.process_time``), min and median of 5 runs;
the floor is one ``json.dumps`` of the same address list, measured in the same run.

    python -m bench.bench_cloud_routes [--edges 10000] [--json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable

from fabmesh.cloudagent.plan import cloud_state
from fabmesh.mesh.cloud import ActiveConnector, CloudRoutes, parse_cloud_routes

LOCAL = frozenset({"127.0.0.1", "198.51.100.2", "10.244.1.0"})  # lo, the uplink, flannel.1


def _times(fn: Callable[[], object], runs: int = 5) -> tuple[float, float]:
    taken = []
    for _ in range(runs):
        started = time.process_time()
        fn()
        taken.append(time.process_time() - started)
    return min(taken), statistics.median(taken)


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.bench_cloud_routes", description=__doc__.splitlines()[0])
    parser.add_argument("--edges", type=int, default=10_000)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    addresses = sorted(f"100.{96 + i // 65536}.{(i // 256) % 256}.{i % 256}/32" for i in range(args.edges))
    config = CloudRoutes(connector=ActiveConnector(name="connector-1", address="198.51.100.1"),
                         subnets=tuple(addresses), no_snat=("10.233.0.0/16",), source_cidrs=("10.244.0.0/16",))
    text = config.to_yaml()
    parsed = parse_cloud_routes(text)
    result = {
        "edges": args.edges, "routes_yaml_bytes": len(text),
        "floor_json_dumps_s": _times(lambda: json.dumps(addresses)),
        "render_s": _times(config.to_yaml),
        "parse_s": _times(lambda: parse_cloud_routes(text)),
        "plan_s": _times(lambda: cloud_state(parsed, node_name="cloud-2", local_addresses=LOCAL, device="eth0")),
    }
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(f"edges={args.edges} routes.yaml={len(text)} bytes ({len(text) / 2**20:.2f} MiB of 1 MiB)")
    for key in ("floor_json_dumps_s", "render_s", "parse_s", "plan_s"):
        low, median = result[key]  # type: ignore[misc]
        print(f"  {key:<20} min {low:.3f} s  median {median:.3f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
