"""The bulk reimaging window runner: what one `imgfarm.window_tick` does.

Every tick (beat, every `window_tick_interval` seconds):
1. opens the windows whose cron slot has come (croniter, in the window's
   time zone), once per slot: a WindowRun row keyed by (window, slot);
2. reads each open run's jobs back into its per-node outcomes, re-queues a
   failed node while it has retries left;
3. closes a run at its end (nodes never started are `not_reached`; jobs not
   yet started are cancelled, and with on_close=cancel the running ones too),
   and marks it closed once its last job has ended;
4. tops each open run up to its cap (`max_concurrent`, and the farm-wide
   `store_cap` counting every active job, ad-hoc ones included), one node per
   job through `submit_restore(..., window_run_id=...)`; a multicast window
   submits the nodes it tops up with in one tick as one restore, so they share
   one udpcast session (a node that misses it restores by unicast on its own).

Why it is safe to run twice at once (a second beat by mistake, a beat
restarted mid-window): steps 1-3 and the choice of nodes in step 4 happen in
one transaction that first takes a lock (BEGIN IMMEDIATE on SQLite, which
`session_scope` always does; `SELECT ... FOR UPDATE` on every window row on
PostgreSQL), and a chosen node is *claimed* in that transaction (status
`queued`) before its job is submitted. A concurrent tick waits for the lock,
then sees the claims and counts them against the cap. The job itself is
created by `submit_restore` after the commit (it opens its own session; they
may not nest); a claim whose submission never happened (a tick killed in
between) is released after CLAIM_TIMEOUT. Finally the one-active-job-per-node
index makes a double job impossible whatever happens.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

from croniter import croniter
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from imgfarm.errors import Conflict, ImgfarmError
from imgfarm.models import states
from imgfarm.models import windows as w
from imgfarm.models.db import session_scope
from imgfarm.models.images import find_image
from imgfarm.models.names import converted_name
from imgfarm.models.nodes import resolve_nodes
from imgfarm.models.tables import Job, Node, utcnow
from imgfarm.models.windows import Window, WindowRun, WindowRunNode, get_window
from imgfarm.protocol import ImageFormat
from imgfarm.tasks.submit import job_options, request_cancel, submit_restore

log = logging.getLogger(__name__)

CLAIM_TIMEOUT = timedelta(seconds=120)  # a claim not turned into a job by then is released


@dataclass
class _Claim:
    run_node_id: int
    run_id: int
    node: str
    image: str
    window: str
    closes_at: datetime
    convert_to: str | None  # submit with convert=True, converting into this name
    options: dict[str, Any] | None = None  # the job options: a multicast window's session request


def due_slot(cron: str, tz: str, now: datetime, not_before: datetime | None = None,
             duration: timedelta | None = None) -> datetime | None:
    """The start (UTC) of the cron slot `now` falls in, or None.

    A slot is the latest cron fire time <= now; it counts while `now` is
    before its end (slot + duration), and only if it starts at or after
    `not_before` (the window's creation, to the minute: a window created at
    02:30 does not open the 02:00 slot late).
    """
    zone = ZoneInfo(tz)
    local_now = now.astimezone(zone)
    it = croniter(cron, local_now + timedelta(seconds=1))
    prev: datetime = it.get_prev(datetime)
    if prev > local_now:
        prev = it.get_prev(datetime)
    slot = prev.astimezone(now.tzinfo)
    if not_before is not None and slot < not_before.replace(second=0, microsecond=0):
        return None
    if duration is not None and now >= slot + duration:
        return None
    return slot


def _lock(s: Session) -> None:
    """Serialize ticks: SQLite's BEGIN IMMEDIATE already holds the write lock."""
    if s.get_bind().dialect.name == "postgresql":
        s.execute(select(Window.id).order_by(Window.id).with_for_update()).all()


def open_run(s: Session, window: Window, slot: datetime, now: datetime, trigger: str) -> WindowRun:
    """Create the run of `window` for `slot` and its per-node rows."""
    run = WindowRun(window_id=window.id, scheduled_for=slot, opened_at=now,
                    closes_at=(now if trigger == "run-now" else slot)
                    + timedelta(minutes=window.duration_minutes),
                    state=w.RUN_OPEN, image=window.image, trigger=trigger)
    s.add(run)
    try:
        targets = [n.name for n in resolve_nodes(s, window.target_expr)]
    except ImgfarmError as exc:
        run.state, run.closed_at = w.RUN_CLOSED, now
        run.message = f"could not resolve targets {window.target_expr!r}: {exc.message}"
        s.flush()
        return run
    run.nodes = [WindowRunNode(node_name=n, status=w.NODE_PENDING) for n in targets]
    s.flush()
    return run


def _open_due(s: Session, now: datetime, report: dict[str, Any]) -> None:
    for window in s.scalars(select(Window).where(Window.enabled.is_(True)).order_by(Window.id)):
        try:
            slot = due_slot(window.cron, window.timezone, now, window.created_at,
                            timedelta(minutes=window.duration_minutes))
        except Exception as exc:  # noqa: BLE001 - a bad row must not stop other windows
            log.error("window %s: bad schedule: %s", window.name, exc)
            continue
        if slot is None:
            continue
        seen = s.scalar(select(WindowRun.id).where(WindowRun.window_id == window.id,
                                                   WindowRun.scheduled_for == slot))
        if seen is not None:
            continue
        busy = s.scalar(select(WindowRun.id).where(WindowRun.window_id == window.id,
                                                   WindowRun.state != w.RUN_CLOSED))
        if busy is not None:
            log.warning("window %s: slot %s skipped, run %s still open", window.name, slot, busy)
            continue
        run = open_run(s, window, slot, now, "cron")
        report["opened"].append(run.id)


def _job_for(s: Session, run: WindowRun, rn: WindowRunNode) -> Job | None:
    if rn.last_job_id is not None:
        return s.get(Job, rn.last_job_id, populate_existing=True)
    # A claim whose submitter has not recorded the job yet: adopt the job it made.
    return s.scalar(
        select(Job).join(Node, Job.node_id == Node.id)
        .where(Job.window_run_id == run.id, Node.name == rn.node_name,
               Job.created_at >= (rn.claimed_at or run.opened_at) - timedelta(seconds=1))
        .order_by(Job.id.desc()).limit(1)
    )


def _sync_node(s: Session, run: WindowRun, rn: WindowRunNode, now: datetime) -> None:
    """Read an in-flight node's job back into its status."""
    job = _job_for(s, run, rn)
    if job is None:
        if rn.claimed_at and now - rn.claimed_at > CLAIM_TIMEOUT:
            rn.status, rn.claimed_at = w.NODE_PENDING, None
            rn.reason = "claim released: no job was made"
        return
    rn.last_job_id = job.id
    if job.state in (states.QUEUED, states.BOOTING) and job.started_at is None:
        rn.status = w.NODE_QUEUED
    elif job.state in states.ACTIVE:
        rn.status = w.NODE_RUNNING
    elif job.state == states.SUCCEEDED:
        rn.status, rn.reason = w.NODE_SUCCEEDED, ""
    else:
        why = job.error or job.state
        retries = run.window.max_retries if run.window else 0
        if run.state == w.RUN_OPEN and rn.attempts <= retries and not job.cancel_requested:
            rn.status, rn.reason = w.NODE_PENDING, f"retry after attempt {rn.attempts}: {why}"
        else:
            rn.status, rn.reason = w.NODE_FAILED, f"job {job.id} {job.state}: {why}"


def _close(s: Session, run: WindowRun, now: datetime, cancels: list[int]) -> None:
    """The window has ended: nothing new; cancel what has not started (all, on_close=cancel)."""
    policy = run.window.on_close if run.window else states.ON_CLOSE_FINISH
    for rn in run.nodes:
        if rn.status == w.NODE_PENDING:
            rn.status = w.NODE_NOT_REACHED
            rn.reason = (rn.reason + "; " if rn.reason else "") + "the window ended before its turn"
        elif rn.status in w.NODE_IN_FLIGHT and rn.last_job_id is not None:
            job = s.get(Job, rn.last_job_id)
            if job is None or job.state not in states.ACTIVE:
                continue
            not_started = job.state == states.QUEUED
            if not_started or (policy == states.ON_CLOSE_CANCEL and job.state != states.FINALIZING):
                cancels.append(job.id)
        elif rn.status in w.NODE_IN_FLIGHT:  # claimed, not submitted: the submitter sees the end
            rn.status, rn.reason = w.NODE_NOT_REACHED, "the window ended before its turn"
    run.state = w.RUN_DRAINING
    run.message = f"closed at {now.isoformat()} (on_close={policy})"


def _active_total(s: Session) -> int:
    """Every active job on the image store, plus claims not yet turned into jobs."""
    jobs = s.scalar(select(func.count(Job.id)).where(Job.state.in_(states.ACTIVE))) or 0
    claims = s.scalar(select(func.count(WindowRunNode.id)).where(
        WindowRunNode.status == w.NODE_QUEUED, WindowRunNode.last_job_id.is_(None))) or 0
    return int(jobs) + int(claims)


def _restore_image(s: Session, run: WindowRun) -> tuple[str | None, str | None, str]:
    """(image to restore, convert-into name or None, reason to hold) for the next node."""
    window = run.window
    if not window.convert:
        return run.image, None, ""
    img = find_image(s, run.image)
    if img is not None and img.format != ImageFormat.PARTIMAGE:
        return run.image, None, ""
    target = converted_name(window.image)
    if find_image(s, target) is not None:
        run.image = target
        return target, None, ""
    if run.convert_job_id is None:
        return window.image, target, ""
    conv = s.get(Job, run.convert_job_id)
    if conv is not None and conv.state not in states.ACTIVE:
        return None, None, f"conversion job {conv.id} {conv.state}: {conv.error}"
    return None, None, ""  # conversion in progress: wait for it


def _top_up(s: Session, run: WindowRun, now: datetime, claims: list[_Claim],
            report: dict[str, Any]) -> None:
    window = run.window
    in_flight = sum(1 for rn in run.nodes if rn.status in w.NODE_IN_FLIGHT)
    slots = window.max_concurrent - in_flight
    if window.store_cap:
        slots = min(slots, window.store_cap - _active_total(s))
    if slots <= 0:
        return
    # Untried nodes first, then retries, then nodes skipped as busy before.
    pending = [rn for rn in run.nodes if rn.status == w.NODE_PENDING]
    candidates = [rn for rn in pending if rn.attempts == 0]
    candidates += [rn for rn in pending if rn.attempts > 0]
    candidates += [rn for rn in run.nodes if rn.status == w.NODE_SKIPPED]
    if not candidates:
        return
    image, convert_to, hold = _restore_image(s, run)
    if hold:
        for rn in candidates:
            rn.status, rn.reason = w.NODE_FAILED, hold
        return
    if image is None:
        return
    options = (job_options(multicast=True, max_wait=window.multicast_max_wait,
                           max_bitrate=window.multicast_max_bitrate) if window.multicast else None)
    names = [rn.node_name for rn in candidates]
    nodes = {n.name: n for n in s.scalars(select(Node).where(Node.name.in_(names)))}
    busy = dict(s.execute(select(Node.name, Job.id).join(Job, Job.node_id == Node.id)
                          .where(Node.name.in_(names), Job.state.in_(states.ACTIVE))).all())
    for rn in candidates:
        if slots <= 0:
            break
        node = nodes.get(rn.node_name)
        if node is None:
            why = "node no longer exists"
        elif rn.node_name in busy:
            why = f"busy with job {busy[rn.node_name]}"
        elif node.admin_state != states.NODE_AVAILABLE:
            why = f"marked {node.admin_state}"
        else:
            why = ""
        if why:
            if rn.status != w.NODE_SKIPPED or rn.reason != why:
                report["skipped"][rn.node_name] = why
            rn.status, rn.reason = w.NODE_SKIPPED, why
            continue
        rn.status, rn.claimed_at, rn.last_job_id = w.NODE_QUEUED, now, None
        claims.append(_Claim(rn.id, run.id, rn.node_name, image, window.name, run.closes_at,
                             convert_to, options))
        slots -= 1
        if convert_to:  # one conversion per run; the other nodes wait for its image
            run.convert_job_id = -1  # placeholder until the submitter records the real id
            break


def _advance(s: Session, now: datetime, claims: list[_Claim], cancels: list[int],
             report: dict[str, Any]) -> None:
    runs = s.scalars(select(WindowRun).where(WindowRun.state != w.RUN_CLOSED)
                     .order_by(WindowRun.id)).all()
    for run in runs:
        for rn in run.nodes:
            if rn.status in w.NODE_IN_FLIGHT:
                _sync_node(s, run, rn, now)
        if run.state == w.RUN_OPEN and now >= run.closes_at:
            _close(s, run, now, cancels)
        if run.state == w.RUN_OPEN and run.window.enabled:
            _top_up(s, run, now, claims, report)
        draining = run.state == w.RUN_DRAINING
        if draining and not any(rn.status in w.NODE_IN_FLIGHT for rn in run.nodes):
            run.state, run.closed_at = w.RUN_CLOSED, now
            report["closed"].append(run.id)


def _job_nodes(job_ids: list[int]) -> dict[str, int]:
    with session_scope() as s:
        return {name: jid for name, jid in s.execute(select(Node.name, Job.id).join(Job, Job.node_id == Node.id)
                                                     .where(Job.id.in_(job_ids)))}


def _submit(group: list[_Claim], check_clock: bool, report: dict[str, Any]) -> None:
    """Turn claims of one run into jobs of one restore (outside the tick's transaction), record them.

    A group is one claim, or a multicast window's claims of this tick: one restore,
    hence one udpcast session for all of them.
    """
    first = group[0]
    convert_job_id: int | None = None
    outcome: dict[str, tuple[str, str, int | None]] = {}  # node -> (status, reason, job id)
    if check_clock and utcnow() >= first.closes_at:
        outcome = {c.node: (w.NODE_NOT_REACHED, "the window ended before its turn", None) for c in group}
    else:
        try:
            sub = submit_restore(",".join(c.node for c in group), first.image,
                                 submitted_by=f"window:{first.window}", skip_busy=True,
                                 window_run_id=first.run_id, enqueue=True,
                                 convert=first.convert_to is not None, converted_name=first.convert_to,
                                 options=first.options)
            convert_job_id = sub.convert_job_id
            jobs = ({first.node: sub.job_ids[0]} if len(group) == 1 and sub.job_ids
                    else _job_nodes(sub.job_ids))
            for c in group:
                if c.node in jobs:
                    outcome[c.node] = (w.NODE_QUEUED, "", jobs[c.node])
                    report["submitted"][c.node] = jobs[c.node]
                else:
                    reason = sub.skipped.get(c.node, "skipped")
                    outcome[c.node] = (w.NODE_SKIPPED, reason, None)
                    report["skipped"][c.node] = reason
        except ImgfarmError as exc:
            for c in group:
                outcome[c.node] = (w.NODE_FAILED, f"could not submit: {exc.message}", None)
                report["errors"][c.node] = outcome[c.node][1]
    with session_scope() as s:
        for c in group:
            rn = s.get(WindowRunNode, c.run_node_id)
            if rn is None:
                continue
            status, reason, job_id = outcome[c.node]
            rn.status, rn.reason, rn.claimed_at = status, reason, None
            if job_id is not None:
                rn.last_job_id, rn.attempts = job_id, rn.attempts + 1
        if first.convert_to is not None:
            run = s.get(WindowRun, first.run_id)
            if run is not None:
                run.convert_job_id = convert_job_id
                if convert_job_id is not None:
                    run.image = first.convert_to


def _groups(claims: list[_Claim]) -> list[list[_Claim]]:
    """One group per claim, except that a multicast window's claims of one run go together."""
    groups: list[list[_Claim]] = []
    shared: dict[tuple[int, str, str | None], list[_Claim]] = {}
    for c in claims:
        if c.options and c.options.get("multicast"):
            key = (c.run_id, c.image, c.convert_to)
            if key not in shared:
                shared[key] = []
                groups.append(shared[key])
            shared[key].append(c)
        else:
            groups.append([c])
    return groups


def tick(now: datetime | None = None) -> dict[str, Any]:
    """One pass over every window: open, sync, close, top up. Safe to run concurrently."""
    check_clock = now is None
    now = now or utcnow()
    report: dict[str, Any] = {"at": now.isoformat(), "opened": [], "closed": [],
                              "submitted": {}, "skipped": {}, "cancelled": [], "errors": {}}
    claims: list[_Claim] = []
    cancels: list[int] = []
    with session_scope() as s:
        _lock(s)
        _open_due(s, now, report)
        _advance(s, now, claims, cancels, report)
    for job_id in cancels:
        try:
            request_cancel(job_id)
            report["cancelled"].append(job_id)
        except Conflict:
            pass  # it ended meanwhile
    for group in _groups(claims):
        try:
            _submit(group, check_clock, report)
        except Exception:  # noqa: BLE001 - the claim is released after CLAIM_TIMEOUT
            log.exception("window %s: submitting %s failed", group[0].window,
                          ",".join(c.node for c in group))
    return report


def run_now(name: str, now: datetime | None = None) -> dict[str, Any]:
    """Open a window at once (outside its schedule) for its duration, then tick."""
    now = now or utcnow()
    with session_scope() as s:
        _lock(s)
        window = get_window(s, name)
        busy = s.scalar(select(WindowRun.id).where(WindowRun.window_id == window.id,
                                                   WindowRun.state != w.RUN_CLOSED))
        if busy is not None:
            raise Conflict(f"window {name} already has run {busy} in progress",
                           hint=f"see `imgfarm window show {name} --runs`")
        run = open_run(s, window, now, now, "run-now")
        run_id = run.id
    out = tick()
    out["run_id"] = run_id
    return out
