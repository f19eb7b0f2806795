"""A multi-node Ray cluster on this machine for tests, in a process of its own.

    python tests/ray_cluster_process.py --nodes 2 [--port PORT]

Uses Ray's own multi-node test helper (`ray.cluster_utils.Cluster`): a head with GCS port `--port`
(default: a free one) and `--nodes - 1` workers, one CPU each, every other port picked free by Ray,
no dashboard.
Run it with RAY_TMPDIR set to a directory of the test's own (the session files and the
"current cluster" address file go there, so a user's Ray on this machine is neither found nor
changed). It prints the cluster address on one line once every node is up, then waits; closing
its stdin or SIGTERM shuts down exactly the nodes it started (Cluster.shutdown) and exits.
"""
from __future__ import annotations

import argparse
import signal
import socket
import sys


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--nodes", type=int, default=2)
    parser.add_argument("--port", type=int, default=None, help="the head's GCS port (default: a free one)")
    args = parser.parse_args()
    if args.port is None:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            args.port = probe.getsockname()[1]

    from ray.cluster_utils import Cluster

    def stop(*_):
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, stop)
    cluster = Cluster(initialize_head=True, head_node_args=dict(
        num_cpus=1, gcs_server_port=args.port, include_dashboard=False, dashboard_agent_listen_port=None))
    try:
        for _ in range(args.nodes - 1):
            cluster.add_node(num_cpus=1, include_dashboard=False)
        cluster.wait_for_nodes()
        print(cluster.address, flush=True)
        sys.stdin.read()  # until the test closes our stdin
    finally:
        cluster.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
