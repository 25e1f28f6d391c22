"""GET /metrics: Prometheus metrics, computed from the job database at scrape time.

Why a custom Collector and not counters incremented in code: the farm runs
as many processes (API, job workers, convert workers, beat), and a counter in
one of them sees only its own share and resets when it restarts. The job
database already holds every job's kind, state, times and bytes, so each
scrape reads it once and every API replica answers the same.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from fastapi import APIRouter, Depends, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from sqlalchemy import func, select

from imgfarm.api.auth import meta_access
from imgfarm.models import states
from imgfarm.models import windows as w
from imgfarm.models.db import session_scope
from imgfarm.models.tables import Job, Node
from imgfarm.protocol import JobKind

# Seconds: a restore of a small image takes seconds, a large capture hours.
DURATION_BUCKETS = (10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1200.0, 1800.0, 3600.0, 7200.0,
                    14400.0)


def _histogram(durations: list[float]) -> tuple[list[tuple[str, float]], float]:
    buckets, total = [], 0.0
    for bound in DURATION_BUCKETS:
        buckets.append((repr(bound), float(sum(1 for d in durations if d <= bound))))
    buckets.append(("+Inf", float(len(durations))))
    total = sum(durations)
    return buckets, total


class FarmCollector(Collector):
    """Reads jobs, nodes and windows from the database on every collect()."""

    def collect(self) -> Iterator[Metric]:
        jobs = GaugeMetricFamily("imgfarm_jobs", "Jobs in the database by kind and state",
                                 labels=["kind", "state"])
        moved = CounterMetricFamily("imgfarm_job_bytes",
                                    "Bytes moved by succeeded jobs (image bytes read or written)",
                                    labels=["kind"])
        dur = HistogramMetricFamily("imgfarm_job_duration_seconds",
                                    "Duration of ended jobs, start to end",
                                    labels=["kind", "state"])
        nodes = GaugeMetricFamily("imgfarm_nodes", "Nodes by admin state", labels=["admin_state"])
        win_nodes = GaugeMetricFamily(
            "imgfarm_window_run_nodes",
            "Nodes of each window's latest run by status", labels=["window", "status"])
        win_open = GaugeMetricFamily("imgfarm_window_open",
                                     "1 while a window's latest run is open or draining",
                                     labels=["window", "state"])
        with session_scope() as s:
            counts: dict[tuple[str, str], int] = {}
            for kind, state, n in s.execute(
                    select(Job.kind, Job.state, func.count(Job.id)).group_by(Job.kind, Job.state)):
                counts[(kind, state)] = int(n)
            for kind in JobKind:
                for state in states.ALL:
                    jobs.add_metric([kind, state], counts.get((kind, state), 0))
            summed = func.coalesce(func.sum(Job.bytes_done), 0)
            by_kind = dict(s.execute(select(Job.kind, summed).where(Job.state == states.SUCCEEDED)
                                     .group_by(Job.kind)).all())
            for kind in JobKind:
                moved.add_metric([kind], float(by_kind.get(kind, 0) or 0))
            durations: dict[tuple[str, str], list[float]] = {}
            rows = s.execute(select(Job.kind, Job.state, Job.started_at, Job.finished_at).where(
                Job.state.in_(states.FINAL), Job.started_at.is_not(None),
                Job.finished_at.is_not(None)))
            for kind, state, start, end in rows:
                if start is not None and end is not None:  # the query's own filter, for the type checker
                    durations.setdefault((kind, state), []).append((end - start).total_seconds())
            for (kind, state), values in sorted(durations.items()):
                buckets, total = _histogram(values)
                dur.add_metric([kind, state], buckets, total)
            for admin, n in s.execute(select(Node.admin_state, func.count(Node.id))
                                      .group_by(Node.admin_state)):
                nodes.add_metric([admin], int(n))
            self._windows(s, win_nodes, win_open)
        yield from (jobs, moved, dur, nodes, win_nodes, win_open)

    @staticmethod
    def _windows(s: Any, win_nodes: GaugeMetricFamily, win_open: GaugeMetricFamily) -> None:
        latest = (select(w.WindowRun.window_id, func.max(w.WindowRun.id).label("run_id"))
                  .group_by(w.WindowRun.window_id).subquery())
        q = (select(w.Window.name, w.WindowRun).join(latest, latest.c.window_id == w.Window.id)
             .join(w.WindowRun, w.WindowRun.id == latest.c.run_id))
        for name, run in s.execute(q):
            counts = {st: 0 for st in w.NODE_STATUSES}
            for rn in run.nodes:
                counts[rn.status] = counts.get(rn.status, 0) + 1
            for status, n in counts.items():
                win_nodes.add_metric([name, status], n)
            win_open.add_metric([name, run.state], 0 if run.state == w.RUN_CLOSED else 1)


registry = CollectorRegistry(auto_describe=False)
registry.register(FarmCollector())

router = APIRouter(tags=["meta"])


@router.get("/metrics", response_class=Response, dependencies=[Depends(meta_access)])
def metrics() -> Response:
    """Prometheus text format (counts, and window names); open or `read`, per
    IMGFARM_API_META_ACCESS."""
    return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)
