"""Starting jobs in batches: one database transaction for all the jobs that start at once.

When a 5,000-node restore is submitted, 5,000 job threads of one worker reach
their start within seconds. Each used to open a transaction of its own, and on
SQLite take the write lock in turn (BEGIN IMMEDIATE, with the busy handler's
sleeps between tries): the lock, not the work, set the pace, and the last node
was booted more than a minute after the submit. Now a job thread hands its id
to its process's starter and waits; the starter takes every id waiting (at most
BATCH), claims them in one transaction, and answers each thread. Nothing waits
to fill a batch: a batch is whatever arrived while the one before ran, so a
lone job starts as fast as before.

The claim is still a conditional queued -> booting update, now one for the whole
batch (models/jobs.transition_many: `WHERE id IN (...) AND state = 'queued'`,
returning the ids it moved), so a second delivery of a task, in this process or
another, still boots nothing, and only takes over the waiting. The drivers'
boot calls stay on the job threads, outside any transaction.
"""

from __future__ import annotations

import threading
from collections import defaultdict
from concurrent.futures import Future
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

from sqlalchemy import select, update

from imgfarm.config.settings import get_settings
from imgfarm.drivers.base import NodeInfo
from imgfarm.models import states
from imgfarm.models.db import session_scope
from imgfarm.models.jobs import begin_finalizing, transition_many
from imgfarm.models.tables import Job, Node, NodeSecret, utcnow
from imgfarm.models.views import unknown_job
from imgfarm.models.workers import worker_id
from imgfarm.protocol import MAX_ID, BootTarget, PowerState

BATCH = 250  # jobs per start transaction: bounds how long it holds SQLite's write lock (~50 ms)


@dataclass(frozen=True)
class Start:
    """What a job thread learns from its claim."""

    info: NodeInfo | None  # the node to boot, when this claim moved the job queued -> booting
    first_deadline: float  # seconds from now to the job's first deadline (its boot timeout)
    options: dict[str, Any] = field(default_factory=dict)
    image: str = ""


_NODE_INFO = (Node.id, Node.name, Node.mac, Node.ip, Node.boot_driver, Node.power_driver, Node.driver_info,
              Node.disk)


def claim_batch(job_ids: list[int]) -> dict[int, Start | Exception]:
    """Claim these jobs in one transaction: each job's Start, or the error a lone claim would raise.

    A queued job goes to booting (its node recorded as booting into the agent); a
    cancelled or node-less one goes to finalizing; one that is past queued and not
    ended is taken over for waiting by this worker.
    """
    settings = get_settings()
    now = utcnow()
    me = worker_id()
    out: dict[int, Start | Exception] = {jid: unknown_job(jid) for jid in job_ids if not 1 <= jid <= MAX_ID}
    job_ids = [jid for jid in job_ids if jid not in out]
    if not job_ids:
        return out
    with session_scope() as s:
        jobs = list(s.execute(select(Job.id, Job.state, Job.cancel_requested, Job.options, Job.node_id,
                                     Job.image_name).where(Job.id.in_(job_ids)).order_by(Job.id)))
        for jid in set(job_ids) - {j.id for j in jobs}:  # no such row
            out[jid] = unknown_job(jid)
        wanted = {j.node_id for j in jobs if j.state == states.QUEUED and j.node_id is not None}
        nodes = {n.id: n for n in s.execute(select(*_NODE_INFO).where(Node.id.in_(wanted)))} if wanted else {}
        secrets: dict[int, dict[str, str]] = defaultdict(dict)
        if nodes:
            for node_id, key, value in s.execute(select(NodeSecret.node_id, NodeSecret.key, NodeSecret.value)
                                                 .where(NodeSecret.node_id.in_(nodes))):
                secrets[node_id][key] = value
        held = [j.id for j in jobs if j.state != states.QUEUED and j.state not in states.FINAL]
        if held:
            s.execute(update(Job).where(Job.id.in_(held)).values(waiter=me))
        booted = []
        to_boot: dict[float, dict[int, str]] = defaultdict(dict)  # overall timeout -> job -> event message
        for j in jobs:
            options = dict(j.options or {})
            timeout = float(options.get("timeout") or settings.job_timeout)
            first = min(timeout, float(options.get("boot_timeout") or settings.boot_timeout))
            out[j.id] = Start(None, first, options, j.image_name)
            if j.state != states.QUEUED:
                continue
            node = nodes.get(j.node_id)
            if j.cancel_requested:
                begin_finalizing(s, j.id, states.CANCELLED, "cancelled before it started")
            elif node is None:
                begin_finalizing(s, j.id, states.FAILED, "the job's node no longer exists")
            else:
                to_boot[timeout][j.id] = (f"booting {node.name} into the agent "
                                          f"({node.boot_driver}/{node.power_driver})")
        node_of = {j.id: nodes.get(j.node_id) for j in jobs}
        for timeout, messages in to_boot.items():  # one UPDATE per distinct timeout: usually one
            for jid in transition_many(s, messages, states.QUEUED, states.BOOTING, token_hash="",
                                       started_at=now, last_report_at=now,
                                       deadline_at=now + timedelta(seconds=timeout),
                                       boot_calls=Job.boot_calls + 1, waiter=me):
                node, start = node_of[jid], out[jid]
                assert node is not None and isinstance(start, Start)
                info = NodeInfo(name=node.name, mac=node.mac, ip=node.ip, boot_driver=node.boot_driver,
                                power_driver=node.power_driver,
                                driver_info={**(node.driver_info or {}), **secrets[node.id]}, disk=node.disk)
                out[jid] = Start(info, start.first_deadline, start.options, start.image)
                booted.append(node.id)
        if booted:  # what we are about to ask of the nodes; finalize sets local again
            s.execute(update(Node).where(Node.id.in_(booted)).values(boot_target=BootTarget.AGENT,
                                                                   power_state=PowerState.ON))
    return out


class _Starter:
    """One per process: a thread that claims, in one transaction, every job waiting to start."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._pending: list[tuple[int, Future[Start]]] = []
        self._thread: threading.Thread | None = None

    def claim(self, job_id: int) -> Start:
        """Block until the job is claimed; raises what its claim raised (e.g. the database is away)."""
        done: Future[Start] = Future()
        with self._cond:
            self._pending.append((job_id, done))
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="imgfarm-starter", daemon=True)
                self._thread.start()
            self._cond.notify()
        return done.result()

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._pending:
                    self._cond.wait()
                batch, self._pending = self._pending[:BATCH], self._pending[BATCH:]
            try:
                results = claim_batch(sorted({jid for jid, _ in batch}))
            except BaseException as exc:  # noqa: BLE001 - every thread of the batch gets it
                for _, done in batch:
                    done.set_exception(exc)
                continue
            answered: set[int] = set()
            for jid, done in batch:
                result = results[jid]
                if isinstance(result, Exception):
                    done.set_exception(result)
                elif jid in answered:  # a second delivery of the same job in this batch boots nothing
                    done.set_result(Start(None, result.first_deadline, result.options, result.image))
                else:
                    answered.add(jid)
                    done.set_result(result)


_starter = _Starter()


def claim_start(job_id: int) -> Start:
    """Claim one job for starting, batched with whatever other jobs of this process start now."""
    return _starter.claim(job_id)
