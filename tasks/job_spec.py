"""What a job's agent is told when it asks: the job spec (imgfarm.protocol.JobSpec).

The agent (agent/main.py) fetches it from the API with the job's token
(api/agent_routes.py); deciding its content is orchestration, so it lives
here: which image store the agent mounts (the farm's NFS export, an xCAT
site's image library, or the local store path of a sim node), the disk hint,
how often to report, and where a capture writes.
"""

from __future__ import annotations

import logging

from imgfarm.config.settings import get_settings
from imgfarm.drivers.xcat import xcat_image_store
from imgfarm.errors import DriverError
from imgfarm.models.images import incoming_location, store_root
from imgfarm.models.tables import Image, Job, utcnow
from imgfarm.protocol import (
    HttpStore,
    ImageFormat,
    ImageRef,
    JobKind,
    JobSpec,
    LocalStore,
    Multicast,
    NfsStore,
    ProtocolError,
    Store,
)

log = logging.getLogger(__name__)


def transport(job: Job) -> str:
    """"http" or "nfs": this job's own choice (restore --transport), else the farm's setting."""
    return str((job.options or {}).get("transport") or get_settings().image_transport)


def image_store(job: Job) -> Store:
    """Where the agent finds the store: over HTTP from the API, the NFS export, or the farm's directory."""
    settings = get_settings()
    if transport(job) == "http":
        try:
            return HttpStore(url=f"{settings.api_url.rstrip('/')}/agent/v1/jobs/{job.id}/store")
        except ProtocolError as exc:
            raise exc.within("store") from None
    nfs = settings.image_store_nfs
    if not nfs and job.node is not None and job.node.boot_driver == "xcat":
        # An xCAT site names its image library in the site table
        # (IMAGELIBSERVER, IMAGELIBINSTALLDIR): no duplicate configuration.
        try:
            nfs = xcat_image_store() or ""
        except DriverError as exc:  # tabdump failed: the local path is the best we know
            log.warning("cannot read xCAT's site table for the image store: %s", exc)
    try:
        if nfs:
            return NfsStore(export=nfs, options=settings.image_store_nfs_options)
        return LocalStore(path=str(store_root()))
    except ProtocolError as exc:
        raise exc.within("store") from None


def _capture_target(job: Job, store: Store) -> tuple[Store, str]:
    """Where a capture writes: its own directory under .incoming, through the incoming export
    when the site has one (then the image export itself can be read-only on the server)."""
    incoming = get_settings().image_store_nfs_incoming
    if incoming and isinstance(store, NfsStore):
        try:
            return NfsStore(export=incoming, options=store.options), f"job-{job.id}"
        except ProtocolError as exc:
            raise exc.within("store") from None
    return store, incoming_location(job.id)


def job_spec(job: Job, image: Image | None = None) -> JobSpec:
    """The job spec of a capture, or of a restore of `image`."""
    ref = ImageRef(name=job.image_name)
    if image is not None:
        ref = ImageRef(name=image.name, location=image.location, format=ImageFormat(image.format),
                       checksums=image.checksums)
    mc = (job.options or {}).get("multicast") if job.kind == JobKind.RESTORE else None
    multicast = None
    if mc:
        try:
            multicast = Multicast(session=mc["session"], portbase=int(mc["portbase"]),
                                  start_timeout=float(mc.get("start_timeout") or 120.0))
        except (KeyError, TypeError, ValueError) as exc:
            raise ProtocolError("multicast", f"the job's multicast option is incomplete ({exc})") from None
    store, output_dir = image_store(job), ""
    if job.kind == JobKind.CAPTURE:
        store, output_dir = _capture_target(job, store)
    return JobSpec(
        job_id=job.id,
        kind=JobKind(job.kind),
        format=ImageFormat(job.format),
        node=job.node_name,
        disk_hint=(job.options or {}).get("disk") or (job.node.disk if job.node else ""),
        store=store,
        progress_interval=get_settings().progress_interval,
        image=ref,
        output_dir=output_dir,
        deadline_in=_deadline_in(job),
        multicast=multicast,
    )


def _deadline_in(job: Job) -> float:
    """Seconds to the job's overall deadline (0: not set yet), never past it.

    Sent as a duration, not a date: a node's clock is whatever its firmware says.
    """
    if job.deadline_at is None:
        return 0.0
    return round(max(1.0, (job.deadline_at - utcnow()).total_seconds()), 1)
