"""Submitting jobs: validate everything, create the job rows, then enqueue.

All checks happen before anything is written, and the rows are committed
before their tasks are sent (a worker must find the row it is given). A
node with an active job is refused by the database itself (the partial
unique index), not by a check that could race.
"""

from __future__ import annotations

import math
import uuid
from dataclasses import dataclass
from typing import Any

from sqlalchemy import insert, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from imgfarm.config.settings import get_settings
from imgfarm.errors import Conflict, InvalidInput
from imgfarm.models import states
from imgfarm.models.db import session_scope
from imgfarm.models.images import check_format, find_image, get_image
from imgfarm.models.jobs import add_event, begin_finalizing, check_multicast, get_job
from imgfarm.models.names import check_image_name
from imgfarm.models.names import converted_name as default_converted_name
from imgfarm.models.nodes import get_node, resolve_nodes
from imgfarm.models.tables import Job, JobEvent, Node, utcnow
from imgfarm.protocol import DEVICE_PATH, ImageFormat, JobKind
from imgfarm.tasks.broker import check_broker
from imgfarm.tasks.convert import create_convert_job, enqueue_convert
from imgfarm.tasks.enqueue import enqueue_jobs
from imgfarm.tasks.finalize import finalize_job
from imgfarm.tasks.multicast import SESSION_PORTS
from imgfarm.tasks.wakeup import notify

MAX_TIMEOUT = 30 * 86400.0  # seconds: a job's own deadline, at most


@dataclass
class Submitted:
    job_ids: list[int]
    skipped: dict[str, str]  # node -> reason
    convert_job_id: int | None = None


def _busy(session: Session, node_ids: list[int]) -> dict[int, int]:
    rows = session.execute(
        select(Job.node_id, Job.id).where(Job.node_id.in_(node_ids), Job.state.in_(states.ACTIVE))
    )
    return {n: j for n, j in rows if n is not None}


TRANSPORTS = ("nfs", "http")


def job_options(timeout: float = 0, disk: str = "", transport: str = "", multicast: bool = False,
                max_wait: float = 0, max_bitrate: str = "") -> dict[str, Any]:
    """Per-job options from the CLI/API, checked: a timeout, a target device, the transport.

    `transport` overrides IMGFARM_IMAGE_TRANSPORT for these jobs (http for nodes whose boot
    image has no NFS). `multicast` asks for one udpcast session for the whole range (the
    session itself is made when the jobs are), starting when every node joined or
    `max_wait` seconds after the first did, sending at most `max_bitrate` (udp-sender's
    syntax: 600m, 1g).

    `disk` overrides the node's disk for this job only -- e.g. /dev/sda1 to
    restore a partition image (a legacy partimage image, or one converted from
    it) into the first partition instead of over the whole disk.  It goes on
    the agent's kernel command line, hence the strict shape.
    """
    opts: dict[str, Any] = {}
    if not (isinstance(timeout, int | float) and math.isfinite(timeout) and 0 <= timeout <= MAX_TIMEOUT):
        raise InvalidInput(f"bad timeout {timeout!r}: give seconds from 0 (the farm's default) "
                           f"to {MAX_TIMEOUT:.0f} (30 days)", hint="e.g. --timeout 7200")
    if timeout:
        opts["timeout"] = timeout
    if disk:
        if not DEVICE_PATH.match(disk):
            raise InvalidInput(f"bad --disk {disk!r}: give an absolute device path without "
                               "spaces or quotes", hint="e.g. /dev/sda1 or /dev/disk/by-id/...")
        opts["disk"] = disk
    if transport:
        if transport not in TRANSPORTS:
            raise InvalidInput(f"unknown --transport {transport!r}", hint="nfs or http")
        opts["transport"] = transport
    max_bitrate = check_multicast(max_wait, max_bitrate)
    if (max_wait or max_bitrate) and not multicast:
        raise InvalidInput("--max-wait and --max-bitrate are for --multicast restores")
    if multicast:
        opts["multicast"] = {"max_wait": max_wait or get_settings().multicast.max_wait,
                             "max_bitrate": max_bitrate or get_settings().multicast.max_bitrate}
    return opts


def _multicast_session(s: Session, request: dict[str, Any], nodes: int) -> dict[str, Any]:
    """One udpcast session for these jobs: an id, its own ports, how many receivers to await."""
    settings = get_settings().multicast
    used = set()
    for (opts,) in s.execute(select(Job.options).where(Job.state.in_(states.ACTIVE))):
        mc = (opts or {}).get("multicast") or {}
        if mc.get("portbase"):
            used.add(int(mc["portbase"]))
    slots = [settings.portbase + SESSION_PORTS * k for k in range(1000)
             if settings.portbase + SESSION_PORTS * (k + 1) < 65000]
    portbase = next((p for p in slots if p not in used), None)
    if portbase is None:
        raise Conflict("every multicast port range is in use by an active session",
                       hint="wait for a session to end")
    # an agent waits for its stream as long as the session may wait for the others, and more
    start = float(request.get("max_wait") or settings.max_wait) + 15.0
    return {**request, "session": uuid.uuid4().hex[:12], "portbase": portbase, "nodes": nodes,
            "start_timeout": start}


def new_task_id() -> str:
    return uuid.uuid4().hex


def submit_capture(
    node: str,
    image: str,
    fmt: str = ImageFormat.NG,
    submitted_by: str = "",
    options: dict[str, Any] | None = None,
    enqueue: bool = True,
) -> Submitted:
    check_image_name(image)
    check_format(fmt)
    if enqueue:
        check_broker()
    with session_scope() as s:
        n = get_node(s, node)
        if find_image(s, image) is not None:
            raise Conflict(f"image {image!r} exists already", hint="capture to a new name")
        other = s.scalar(
            select(Job.id).where(
                Job.kind == JobKind.CAPTURE, Job.image_name == image, Job.state.in_(states.ACTIVE)
            )
        )
        if other:
            raise Conflict(f"job {other} is already capturing image {image!r}")
        _check_available(n)
        job = Job(kind=JobKind.CAPTURE, node_id=n.id, image_name=image, format=fmt,
                  submitted_by=submitted_by, options=options or {}, celery_task_id=new_task_id())
        s.add(job)
        try:
            s.flush()
        except IntegrityError as exc:
            raise Conflict(f"node {node} already has an active job",
                           hint=f"see `imgfarm jobs --node {node}`") from exc
        add_event(s, job.id, "state", f"capture of {node} to {image} ({fmt}) submitted", state=states.QUEUED)
        job_id = job.id
    if enqueue:
        enqueue_jobs([job_id])
    return Submitted([job_id], {})


def _check_available(node: Node) -> None:
    if node.admin_state != states.NODE_AVAILABLE:
        raise Conflict(
            f"node {node.name} is marked {node.admin_state}",
            hint=f"`imgfarm node set {node.name} --state available` first",
        )


def submit_restore(
    nodes: str,
    image: str,
    submitted_by: str = "",
    skip_busy: bool = False,
    convert: bool = False,
    options: dict[str, Any] | None = None,
    window_run_id: int | None = None,
    enqueue: bool = True,
    converted_name: str | None = None,
) -> Submitted:
    """Restore `image` to every node of the range; all-or-nothing unless skip_busy."""
    check_image_name(image)
    if enqueue:
        check_broker()
    with session_scope() as s:
        img = get_image(s, image)
        targets = resolve_nodes(s, nodes)
        if convert and img.format != ImageFormat.PARTIMAGE:
            # already partimage-ng (e.g. a Clonezilla directory, converted when imported):
            # nothing to convert, restore it as it is -- what a window with convert does too
            convert = False
        busy = _busy(s, [n.id for n in targets])
        skipped: dict[str, str] = {}
        for n in targets:
            if n.id in busy:
                skipped[n.name] = f"busy with job {busy[n.id]}"
            elif n.admin_state != states.NODE_AVAILABLE:
                skipped[n.name] = f"marked {n.admin_state}"
        if skipped and not skip_busy:
            detail = ", ".join(f"{k} ({v})" for k, v in skipped.items())
            raise Conflict(f"cannot restore to {detail}", hint="wait, or pass --skip-busy to restore the others")
        convert_job_id = None
        opts = dict(options or {})
        target_image, target_format = image, img.format
        if convert:
            target_image = converted_name or default_converted_name(image)
            target_format = ImageFormat.NG
            done = find_image(s, target_image)
            if done is not None and (done.origin or {}).get("source_image") != image:
                raise Conflict(f"image {target_image!r} exists and was not converted from {image!r}",
                               hint="choose another name for the converted image")
            if done is None:  # converted once, however many nodes and windows ask
                convert_job_id = create_convert_job(s, image, target_image, submitted_by=submitted_by)
                opts["after_job"] = convert_job_id
        todo = [n for n in targets if n.name not in skipped]
        if opts.get("multicast"):
            if target_format != ImageFormat.NG:
                raise InvalidInput(f"image {image!r} is {target_format}; multicast sends partimage-ng "
                                   "streams", hint="restore with --convert, or without --multicast")
            opts["multicast"] = _multicast_session(s, opts["multicast"], len(todo))
        job_ids = _insert_restores(s, todo, target_image, target_format, submitted_by, opts,
                                   window_run_id, with_task_ids=not convert_job_id)
    if enqueue:
        if convert_job_id:
            enqueue_convert(convert_job_id)
        else:
            enqueue_jobs(job_ids)
    return Submitted(job_ids, skipped, convert_job_id)


def _insert_restores(s: Session, nodes: list[Node], image: str, fmt: str, submitted_by: str,
                     options: dict[str, Any], window_run_id: int | None,
                     with_task_ids: bool) -> list[int]:
    """One multi-row INSERT for the jobs and one for their events, ids in node order.

    Why batched: a 500-node restore was 1,000 round trips (a flush per job);
    on PostgreSQL that alone took 0.7 s.  The partial unique index still
    refuses a node that got an active job since the busy check: the whole
    batch is then rolled back, nothing is recorded.
    """
    if not nodes:
        return []
    rows = [{"kind": JobKind.RESTORE, "node_id": n.id, "image_name": image, "format": fmt,
             "submitted_by": submitted_by, "options": options, "window_run_id": window_run_id,
             "celery_task_id": new_task_id() if with_task_ids else ""} for n in nodes]
    try:
        ids = list(s.scalars(insert(Job).returning(Job.id, sort_by_parameter_order=True), rows))
    except IntegrityError as exc:
        raise Conflict("a node of the range got an active job while this restore was submitted; "
                       "nothing was submitted", hint="see `imgfarm jobs --state queued`, then "
                       "submit again") from exc
    now = utcnow()
    s.execute(insert(JobEvent), [
        {"job_id": jid, "at": now, "kind": "state", "state": states.QUEUED, "data": {},
         "message": f"restore of {image} to {n.name} submitted"} for jid, n in zip(ids, nodes, strict=True)])
    return ids


def request_cancel(job_id: int) -> str:
    """Ask a job to end as cancelled; whoever holds it resets the node.

    A job still queued with no task holding it is finalized here at once (the
    node is set to local boot all the same); otherwise its waiting task is
    woken and does it.
    """
    with session_scope() as s:
        job = get_job(s, job_id)
        if job.state in states.FINAL:
            raise Conflict(f"job {job_id} has ended already ({job.state})")
        job.cancel_requested = True
        add_event(s, job_id, "note", "cancel requested")
        state = job.state
        now = state == states.QUEUED and not job.waiter
        if now:
            now = begin_finalizing(s, job_id, states.CANCELLED, "cancelled by operator")
    notify(get_settings().redis_url, job_id, {"cancel": True})
    if now:
        finalize_job(job_id)
    return state
