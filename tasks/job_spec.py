"""What a job's agent is told when it asks: the job spec.

The agent (agent/main.py) fetches it from the API with the job's token
(api/agent_routes.py); deciding its content is orchestration, so it lives
here: which image store the agent mounts (the farm's NFS export, an xCAT
site's image library, or the local store path of a sim node), the disk hint,
how often to report, and where a capture writes.
"""

from __future__ import annotations

import logging
from typing import Any

from imgfarm.config.settings import get_settings
from imgfarm.drivers.xcat import xcat_image_store
from imgfarm.errors import DriverError
from imgfarm.models.images import INCOMING, store_root
from imgfarm.models.tables import Job

log = logging.getLogger(__name__)


def job_spec(job: Job) -> dict[str, Any]:
    settings = get_settings()
    store: dict[str, Any]
    nfs = settings.image_store_nfs
    if not nfs and job.node is not None and job.node.boot_driver == "xcat":
        # An xCAT site names its image library in the site table
        # (IMAGELIBSERVER, IMAGELIBINSTALLDIR): no duplicate configuration.
        try:
            nfs = xcat_image_store() or ""
        except DriverError as exc:  # tabdump failed: the local path is the best we know
            log.warning("cannot read xCAT's site table for the image store: %s", exc)
    if nfs:
        store = {"type": "nfs", "export": nfs}
    else:
        store = {"type": "local", "path": str(store_root())}
    spec: dict[str, Any] = {
        "job_id": job.id,
        "kind": job.kind,
        "format": job.format,
        "node": job.node_name,
        "disk_hint": (job.options or {}).get("disk") or (job.node.disk if job.node else ""),
        "store": store,
        "progress_interval": settings.progress_interval,
        "image": {"name": job.image_name},
    }
    if job.kind == "capture":
        spec["output_dir"] = f"{INCOMING}/job-{job.id}"
    return spec
