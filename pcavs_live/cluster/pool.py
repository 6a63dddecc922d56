"""`WorkerPool`: one `RenderWorker` per device slot of every live Ray node, found and placed by Ray.

Slots: a node's `GPU` count, or on CPU nodes its custom `render_slot` resource. Each worker is a named,
detached actor pinned to its node (`NodeAffinitySchedulingStrategy`), so a front door that restarts
finds the same workers by name, and a node that joins later gets its workers at the next `reconcile`.
Restarts are Ray's (`max_restarts`); a worker that does not answer `info` in time is left out of
placement until it does. Nothing here is a heartbeat of our own.
"""
from __future__ import annotations

import logging
import os
import socket
import sys

from pcavs_live.common.errors import UserError

log = logging.getLogger(__name__)

NAMESPACE = "pcavs-live"
SLOT_RESOURCE = "render_slot"


class ClusterError(UserError):
    """The cluster cannot be reached or used (one line for the operator)."""


def require_ray():
    try:
        import ray
    except ImportError:
        raise ClusterError('--cluster needs Ray: pip install "pcavs-live[cluster]"') from None
    return ray


def connect(address: str, node_ip_address: str | None = None):
    """Join the cluster at `address` as a driver in our namespace (no dashboard, no usage reporting).
    `node_ip_address`: this machine's address in the cluster (127.0.0.1 for a loopback cluster; by
    default Ray picks the address of the default route)."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    host, _, port = address.rpartition(":")
    if host in ("127.0.0.1", "localhost") and "ray" not in sys.modules:
        # A one-machine cluster: keep Ray on loopback (it otherwise swaps 127.0.0.1 for the LAN address).
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    ray = require_ray()
    try:
        socket.create_connection((host.strip("[]") or "127.0.0.1", int(port)), timeout=5).close()
    except ValueError:
        raise ClusterError(f"--cluster {address!r} is not HOST:PORT (the head's `ray start --head --port`)") from None
    except OSError as exc:
        raise ClusterError(f"cannot reach the Ray cluster at {address!r} ({exc.strerror or exc}); "
                           "start its head with `ray start --head --port 6379` and give HOST:PORT") from None
    if ray.is_initialized():
        return ray
    try:
        extra = {"_node_ip_address": node_ip_address} if node_ip_address else {}
        ray.init(address=address, namespace=NAMESPACE, include_dashboard=False, log_to_driver=False,
                 logging_level=logging.WARNING, **extra)
    except Exception as exc:  # noqa: BLE001 - ConnectionError and friends: one line
        raise ClusterError(f"cannot join the Ray cluster at {address}: {' '.join(str(exc).split())[:200]} "
                           "(start it with `ray start --head`)") from None
    return ray


def node_slots(node: dict) -> int:
    """Render slots a node offers: one per GPU, else its `render_slot` resource."""
    res = node.get("Resources", {})
    gpus = int(res.get("GPU", 0))
    return gpus if gpus > 0 else int(res.get(SLOT_RESOURCE, 0))


class WorkerPool:
    """The workers of the cluster, by name. `reconcile()` creates what is missing (idempotent)."""

    def __init__(self, config, backend=None, max_restarts: int = -1, lost_timeout_s: float = 5.0) -> None:
        self.config, self.backend = config, backend   # the typed Config every worker runs with
        self.max_restarts, self.lost_timeout_s = max_restarts, lost_timeout_s
        self.workers: dict[str, object] = {}

    def reconcile(self) -> list[str]:
        """Make sure every slot of every live node has its worker; returns the names created now."""
        import ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        from pcavs_live.cluster.worker import RenderWorker

        created = []
        alive_names = set()
        for node in ray.nodes():
            if not node.get("Alive"):
                continue
            gpus = int(node.get("Resources", {}).get("GPU", 0)) > 0
            for i in range(node_slots(node)):
                name = f"render-{node['NodeID'][:12]}-{i}"
                alive_names.add(name)
                if name in self.workers:
                    continue
                resources = {"num_gpus": 1} if gpus else {"resources": {SLOT_RESOURCE: 1}}
                try:
                    existing = ray.get_actor(name, namespace=NAMESPACE)
                except ValueError:
                    existing = None
                if existing is None:
                    created.append(name)
                    actor_cls = ray.remote(RenderWorker)
                    existing = actor_cls.options(
                        name=name, namespace=NAMESPACE, lifetime="detached", get_if_exists=True,
                        max_restarts=self.max_restarts, max_task_retries=0, max_concurrency=32, num_cpus=0,
                        scheduling_strategy=NodeAffinitySchedulingStrategy(node["NodeID"], soft=False),
                        **resources).remote(name, self.config, self.backend, self.lost_timeout_s)
                self.workers[name] = existing
        for name in set(self.workers) - alive_names:     # its node left the cluster
            self.workers.pop(name, None)
        if created:
            log.info("cluster: started workers %s", ", ".join(created))
        return created

    def get(self, name: str):
        return self.workers.get(name)

    def shutdown(self) -> None:
        """Stop and remove every worker (operator's teardown; a front door restart does not call it)."""
        import ray
        for name, actor in list(self.workers.items()):
            try:
                ray.get(actor.stop.remote(), timeout=20)
            except Exception:  # noqa: BLE001 - it is killed anyway
                pass
            ray.kill(actor, no_restart=True)
        self.workers.clear()


def cluster_report(address: str, node_ip_address: str | None = None, timeout_s: float = 5.0) -> tuple[str, int]:
    """`doctor --cluster ADDRESS`: each node's render slots and each worker's sessions and free capacity;
    exit code 1 when no worker answers."""
    ray = connect(address, node_ip_address)
    from ray.util import list_named_actors
    lines = []
    for node in ray.nodes():
        if node.get("Alive"):
            lines.append(f"node {node['NodeID'][:12]} {node.get('NodeManagerAddress', '?')}: "
                         f"{node_slots(node)} render slots")
    names = sorted(a["name"] for a in list_named_actors(all_namespaces=True)
                   if a.get("namespace") == NAMESPACE and a["name"].startswith("render-"))
    answering = 0
    for name in names:
        try:
            info = ray.get(ray.get_actor(name, namespace=NAMESPACE).info.remote(), timeout=timeout_s)
        except Exception as exc:  # noqa: BLE001 - dead or restarting: say so, go on
            lines.append(f"worker {name}: not answering ({type(exc).__name__}; restarting or its node left)")
            continue
        answering += 1
        lines.append(f"worker {name}: {info['sessions']} of {info['max_sessions']} sessions, "
                     f"{info['free']} free (pid {info['pid']} on {info['node']})")
    if not names:
        lines.append("no render workers yet: start the front door (pcavs-live serve --cluster ADDRESS)")
    return "\n".join(lines), 0 if answering else 1
