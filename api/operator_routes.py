"""The operator's endpoints: submit jobs, list and read jobs, nodes and images."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Header, Query
from pydantic import BaseModel, Field

from imgfarm.config.settings import get_settings
from imgfarm.drivers import docs as driver_docs
from imgfarm.errors import Unauthorized
from imgfarm.models import views
from imgfarm.models.db import session_scope
from imgfarm.models.dbapi import reader
from imgfarm.models.images import get_image, image_views
from imgfarm.models.nodes import get_node, node_views
from imgfarm.models.views import image_view, node_view
from imgfarm.protocol import ImageFormat
from imgfarm.tasks import submit
from imgfarm.tasks.convert import submit_convert
from imgfarm.tasks.nodes import add_node


def operator_auth(authorization: str | None = Header(None)) -> None:
    token = get_settings().api_token
    if token and (authorization or "") != f"Bearer {token}":
        raise Unauthorized("operator token required", hint="send Authorization: Bearer <IMGFARM_API_TOKEN>")


router = APIRouter(prefix="/api/v1", tags=["operator"], dependencies=[Depends(operator_auth)])


class CaptureIn(BaseModel):
    node: str
    image: str
    format: str = ImageFormat.NG  # checked by the submit (a named error, not a 422)
    submitted_by: str = "api"
    timeout: float = 0
    disk: str = ""  # this job's device on the node instead of the node's disk


class RestoreIn(BaseModel):
    nodes: str
    image: str
    skip_busy: bool = False
    convert: bool = False
    converted_name: str | None = None
    submitted_by: str = "api"
    timeout: float = 0
    disk: str = ""  # this job's device on each node instead of the node's disk


class ConvertIn(BaseModel):
    image: str
    name: str | None = None
    submitted_by: str = "api"


class NodeIn(BaseModel):
    name: str
    mac: str = ""
    ip: str = ""
    groups: list[str] = []
    boot_driver: str = "sim"
    power_driver: str = "sim"
    disk: str = ""
    driver_info: dict[str, Any] = Field(
        default={}, description="the drivers' settings; the keys each driver takes: "
        "GET /api/v1/drivers/{name}")


@router.post("/jobs/capture", status_code=201)
def capture(body: CaptureIn) -> dict[str, Any]:
    sub = submit.submit_capture(body.node, body.image, body.format, submitted_by=body.submitted_by,
                                options=submit.job_options(body.timeout, body.disk))
    return {"job_ids": sub.job_ids}


@router.post("/jobs/restore", status_code=201)
def restore(body: RestoreIn) -> dict[str, Any]:
    sub = submit.submit_restore(body.nodes, body.image, submitted_by=body.submitted_by,
                                skip_busy=body.skip_busy, convert=body.convert,
                                converted_name=body.converted_name,
                                options=submit.job_options(body.timeout, body.disk))
    return {"job_ids": sub.job_ids, "skipped": sub.skipped, "convert_job_id": sub.convert_job_id}


@router.post("/jobs/convert", status_code=201)
def convert(body: ConvertIn) -> dict[str, Any]:
    return {"job_ids": [submit_convert(body.image, body.name, submitted_by=body.submitted_by)]}


@router.get("/jobs")
def list_jobs(
    state: str | None = None, node: str | None = None, kind: str | None = None,
    limit: int = Query(200, ge=1, le=10000),
) -> list[dict[str, Any]]:
    with reader() as db:
        return views.list_jobs(db, state or "", node or "", kind or "", limit)


@router.get("/jobs/{job_id}")
def read_job(job_id: int) -> dict[str, Any]:
    with reader() as db:
        return views.read_job(db, job_id)


@router.post("/jobs/{job_id}/cancel")
def cancel(job_id: int) -> dict[str, Any]:
    was = submit.request_cancel(job_id)
    return {"job_id": job_id, "was": was, "status": "cancel requested"}


@router.get("/nodes")
def list_nodes() -> list[dict[str, Any]]:
    with session_scope() as s:
        return node_views(s)


@router.post("/nodes", status_code=201)
def create_node(body: NodeIn) -> dict[str, Any]:
    with session_scope() as s:
        node = add_node(s, body.name, body.mac, body.ip, body.groups, body.boot_driver,
                        body.power_driver, body.disk, body.driver_info)
        return node_view(node)


@router.get("/nodes/{name}")
def read_node(name: str) -> dict[str, Any]:
    with session_scope() as s:
        return node_view(get_node(s, name))


@router.get("/drivers")
def list_drivers() -> list[dict[str, Any]]:
    """Every boot and power driver, with the driver_info keys it takes."""
    return driver_docs.catalog()


@router.get("/drivers/{name}")
def read_driver(name: str) -> dict[str, Any]:
    """A driver's properties: each driver_info key, its default, what it is for."""
    return driver_docs.show_view(name)


@router.get("/images")
def list_images() -> list[dict[str, Any]]:
    with session_scope() as s:
        return image_views(s)


@router.get("/images/{name}")
def read_image(name: str) -> dict[str, Any]:
    with session_scope() as s:
        return image_view(get_image(s, name), manifest=True)
