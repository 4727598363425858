"""A Ray cluster of several nodes on this machine, for tests (``python -m
tests.support.ray_cluster``).

Every process binds 127.0.0.1 only (Ray's ``cluster_utils.Cluster`` with the node address given
and ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``, which keeps Ray from swapping a loopback address
for the machine's own), no dashboard, no usage reporting; node failures are noticed within
about a second. It runs in a process of its own, in a session of its own (``RayCluster``
starts it), so that a test stops it, and everything Ray started, by that process group.

Protocol: it prints one JSON line, ``{"address": "127.0.0.1:PORT", "nodes": [{"node_id":
..., "pids": [...]}, ...], "session_dir": ...}``; then each line it reads from stdin is a
command: ``remove I`` kills node I's processes without grace (SIGKILL) and answers ``removed
I``; ``actors`` answers with the name and state of every actor ever started, as JSON;
``tables`` answers with the GCS actor and job tables as one JSON string; end of input
shuts the cluster down.

The tests in tests/distributed/ use it through the ``ray_cluster`` fixture there.
"""

from __future__ import annotations

import argparse
import os
import sys

# Before ray is imported: ray reads them then.
LOOPBACK_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0"}
os.environ.update(LOOPBACK_ENV)

import orjson  # noqa: E402
from ray.cluster_utils import Cluster  # noqa: E402

# A killed node is noticed after about period x threshold.
FAST_HEALTH_CHECKS = {
    "health_check_initial_delay_ms": 1000,
    "health_check_period_ms": 300,
    "health_check_timeout_ms": 300,
    "health_check_failure_threshold": 3,
}


def _node_args(index: int, cpus: int) -> dict[str, object]:
    return {
        "node_ip_address": "127.0.0.1",
        "num_cpus": cpus,
        "resources": {f"test_node_{index}": 1},
        "include_dashboard": False,
        "object_store_memory": 80 * 1024 * 1024,
    }


def _pids(node: object) -> list[int]:
    processes = getattr(node, "all_processes", {})
    return [info.process.pid for infos in processes.values() for info in infos]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--nodes", type=int, default=2)
    parser.add_argument("--cpus", type=int, default=2, help="per node")
    args = parser.parse_args()
    head = {**_node_args(0, args.cpus), "_system_config": FAST_HEALTH_CHECKS}
    cluster = Cluster(initialize_head=True, head_node_args=head)
    nodes = [cluster.head_node]
    for i in range(1, args.nodes):
        nodes.append(cluster.add_node(**_node_args(i, args.cpus)))
    cluster.wait_for_nodes()
    described = [{"node_id": n.node_id, "pids": _pids(n)} for n in nodes]
    session = cluster.head_node.get_session_dir_path()
    hello = {"address": cluster.address, "nodes": described, "session_dir": session}
    print(orjson.dumps(hello).decode(), flush=True)
    try:
        for line in sys.stdin:
            command, _, arg = line.strip().partition(" ")
            if command == "remove":
                cluster.remove_node(nodes[int(arg)], allow_graceful=False)
                print(f"removed {arg}", flush=True)
            elif command == "actors":
                actors = cluster.global_state.actor_table(None).values()
                print(orjson.dumps([[a["Name"], a["State"]] for a in actors]).decode(), flush=True)
            elif command == "tables":
                # What the dashboard and the state API show is read from these GCS tables.
                state = cluster.global_state
                tables = {"actors": state.actor_table(None), "jobs": state.job_table()}
                print(orjson.dumps(repr(tables)).decode(), flush=True)
    finally:
        cluster.shutdown()


if __name__ == "__main__":
    main()
