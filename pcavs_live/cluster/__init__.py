"""Studio sessions across machines on Ray: render workers (one per GPU / `render_slot`) and the front door.

It sits above `pcavs_live.pipeline` (a worker runs the single-process studio's own pieces) and below
`pcavs_live.cli` (`serve --cluster ADDRESS`). Ray is an optional extra (`pip install "pcavs-live[cluster]"`):
nothing here imports it until a cluster is used.
"""
from pcavs_live.cluster.frontdoor import FrontDoor, serve_cluster
from pcavs_live.cluster.pool import WorkerPool
from pcavs_live.cluster.worker import RenderWorker

__all__ = ["FrontDoor", "RenderWorker", "WorkerPool", "serve_cluster"]
