"""Plain-dict views of rows: one shape for the CLI's --json and the HTTP API."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from imgfarm.models.tables import Image, Job, JobEvent, Node


def _ts(value: datetime | None) -> str | None:
    return value.isoformat().replace("+00:00", "Z") if value else None


def event_view(ev: JobEvent) -> dict[str, Any]:
    return {"at": _ts(ev.at), "kind": ev.kind, "state": ev.state, "message": ev.message, "data": ev.data}


def job_view(job: Job, events: bool = False) -> dict[str, Any]:
    out: dict[str, Any] = {
        "id": job.id,
        "kind": job.kind,
        "node": job.node_name,
        "image": job.image_name,
        "format": job.format,
        "state": job.state,
        "progress": round(job.progress or 0.0, 2),
        "bytes_done": job.bytes_done,
        "bytes_total": job.bytes_total,
        "rate": job.rate,
        "attempt": job.attempt,
        "created_at": _ts(job.created_at),
        "started_at": _ts(job.started_at),
        "finished_at": _ts(job.finished_at),
        "duration": round(job.duration, 2) if job.duration is not None else None,
        "error": job.error,
        "celery_task_id": job.celery_task_id,
        "submitted_by": job.submitted_by,
        "result": job.result or {},
        "options": job.options or {},
    }
    if events:
        out["events"] = [event_view(e) for e in job.events]
    return out


def node_view(node: Node, active_job: int | None = None) -> dict[str, Any]:
    return {
        "name": node.name,
        "mac": node.mac,
        "ip": node.ip,
        "groups": node.group_names,
        "boot_driver": node.boot_driver,
        "power_driver": node.power_driver,
        "driver_info": {k: ("***" if "password" in k and "file" not in k else v)
                        for k, v in (node.driver_info or {}).items()},
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
