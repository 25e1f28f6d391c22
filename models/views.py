"""Plain-dict views of rows: one shape for the CLI's --json and the HTTP API.

Jobs are also *read* here, in SQL through models/dbapi.py rather than through
the ORM: `imgfarm jobs` and `imgfarm job N` are what scripts and cron poll,
and this way the CLI answers them without importing SQLAlchemy (on SQLite).
The API reads jobs with the same functions over its pooled engine, so the
filters, the order and the shape are one copy for both.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from imgfarm.errors import InvalidInput, NotFound
from imgfarm.models import states
from imgfarm.models.names import is_secret_key
from imgfarm.protocol import MAX_ID, JobKind

if TYPE_CHECKING:
    from imgfarm.models.dbapi import Reader
    from imgfarm.models.tables import Image, Node


def unknown_job(job_id: int) -> NotFound:
    return NotFound(f"job {job_id} not found", hint="list jobs with `imgfarm jobs`")


def unknown_node(name: str) -> NotFound:
    return NotFound(f"unknown node {name!r}", hint="see `imgfarm node list`")


def _utc(value: datetime | str | None) -> datetime | None:
    """A stored time as an aware UTC datetime: SQLite gives text, and naive values are UTC."""
    if value is None:
        return None
    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    return value if value.tzinfo else value.replace(tzinfo=UTC)


def _ts(value: datetime | str | None) -> str | None:
    when = _utc(value)
    return when.isoformat().replace("+00:00", "Z") if when else None


def _obj(value: Any) -> Any:
    """A JSON column's value: SQLite gives the text, PostgreSQL the decoded object."""
    return json.loads(value) if isinstance(value, str) else value


_JOBS = (
    "SELECT j.id, j.kind, n.name AS node, j.image_name, j.format, j.state, j.progress, "
    "j.bytes_done, j.bytes_total, j.rate, j.attempt, j.created_at, j.started_at, "
    "j.finished_at, j.error, j.celery_task_id, j.submitted_by, j.result, j.options "
    "FROM jobs j LEFT JOIN nodes n ON n.id = j.node_id"
)
_EVENTS = "SELECT at, kind, state, message, data FROM job_events WHERE job_id = :job_id ORDER BY id"


def _number(value: Any) -> Any:
    """A stored float as JSON can carry it: NaN and the infinities (older rows) as None."""
    return None if isinstance(value, float) and not math.isfinite(value) else value


def event_view(row: Mapping[str, Any]) -> dict[str, Any]:
    return {"at": _ts(row["at"]), "kind": row["kind"], "state": row["state"], "message": row["message"],
            "data": _obj(row["data"])}


def job_view(row: Mapping[str, Any], events: Iterable[Mapping[str, Any]] | None = None) -> dict[str, Any]:
    """A job row of _JOBS as the CLI and the API show it; with its events when given."""
    started, finished = _utc(row["started_at"]), _utc(row["finished_at"])
    duration = ((finished or datetime.now(UTC)) - started).total_seconds() if started else None
    out: dict[str, Any] = {
        "id": row["id"],
        "kind": row["kind"],
        "node": row["node"] or "",
        "image": row["image_name"],
        "format": row["format"],
        "state": row["state"],
        "progress": round(_number(row["progress"]) or 0.0, 2),
        "bytes_done": row["bytes_done"],
        "bytes_total": row["bytes_total"],
        "rate": _number(row["rate"]),
        "attempt": row["attempt"],
        "created_at": _ts(row["created_at"]),
        "started_at": _ts(started),
        "finished_at": _ts(finished),
        "duration": round(duration, 2) if duration is not None else None,
        "error": row["error"],
        "celery_task_id": row["celery_task_id"],
        "submitted_by": row["submitted_by"],
        "result": _obj(row["result"]) or {},
        "options": _obj(row["options"]) or {},
    }
    if events is not None:
        out["events"] = [event_view(e) for e in events]
    return out


def list_jobs(db: Reader, state: str = "", node: str = "", kind: str = "",
              limit: int = 200) -> list[dict[str, Any]]:
    """Jobs newest first, filtered; one query for the CLI and the API alike."""
    if state and state not in states.ALL:
        raise InvalidInput(f"unknown state {state!r}", hint=f"one of {', '.join(states.ALL)}")
    if kind and kind not in tuple(JobKind):
        raise InvalidInput(f"unknown job kind {kind!r}", hint=f"one of {', '.join(JobKind)}")
    where: list[str] = []
    params: dict[str, Any] = {"limit": limit}
    if state:
        where.append("j.state = :state")
        params["state"] = state
    if kind:
        where.append("j.kind = :kind")
        params["kind"] = kind
    if node:
        found = db.rows("SELECT id FROM nodes WHERE name = :name", name=node)
        if not found:
            raise unknown_node(node)
        where.append("j.node_id = :node_id")
        params["node_id"] = found[0]["id"]
    sql = _JOBS + (" WHERE " + " AND ".join(where) if where else "") + " ORDER BY j.id DESC LIMIT :limit"
    return [job_view(r) for r in db.rows(sql, **params)]


def read_job(db: Reader, job_id: int) -> dict[str, Any]:
    """One job with its events, oldest first; NotFound names the job."""
    if not 1 <= job_id <= MAX_ID:  # no such row: ids are 32-bit on PostgreSQL
        raise unknown_job(job_id)
    rows = db.rows(_JOBS + " WHERE j.id = :job_id", job_id=job_id)
    if not rows:
        raise unknown_job(job_id)
    return job_view(rows[0], events=db.rows(_EVENTS, job_id=job_id))


def read_jobs(db: Reader, job_ids: list[int]) -> list[dict[str, Any]]:
    """These jobs (those that exist), by id: what `--wait` polls."""
    if not job_ids:
        return []
    job_ids = [j for j in job_ids if 1 <= j <= MAX_ID]
    if not job_ids:
        return []
    names = {f"id{i}": int(job_id) for i, job_id in enumerate(job_ids)}
    sql = _JOBS + f" WHERE j.id IN ({', '.join(':' + n for n in names)}) ORDER BY j.id"
    return [job_view(r) for r in db.rows(sql, **names)]


def node_view(node: Node, active_job: int | None = None) -> dict[str, Any]:
    return {
        "name": node.name,
        "mac": node.mac,
        "ip": node.ip,
        "groups": node.group_names,
        "boot_driver": node.boot_driver,
        "power_driver": node.power_driver,
        # secrets live in node_secrets and show only as "set"; a secret-looking key still in
        # the row (written by other code) is masked as well
        "driver_info": {**{k: ("***" if is_secret_key(k) else v)
                           for k, v in (node.driver_info or {}).items()},
                        **{sec.key: "***" for sec in node.secrets}},
        "disk": node.disk,
        "admin_state": node.admin_state,
        "boot_target": node.boot_target,
        "power_state": node.power_state,
        "active_job": active_job,
    }


def image_view(image: Image, manifest: bool = False) -> dict[str, Any]:
    out: dict[str, Any] = {
        "name": image.name,
        "format": image.format,
        "location": image.location,
        "size_bytes": image.size_bytes,
        "checksums": image.checksums,
        "origin": image.origin,
        "created_at": _ts(image.created_at),
    }
    if manifest:
        out["manifest"] = image.manifest
    return out
