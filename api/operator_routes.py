"""The operator's endpoints: submit jobs, list and read jobs, nodes and images."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query
from pydantic import BaseModel, Field

from imgfarm.api.auth import require, submitter
from imgfarm.api.limits import JobIdPath
from imgfarm.drivers import docs as driver_docs
from imgfarm.models import views
from imgfarm.models.db import session_scope
from imgfarm.models.dbapi import reader
from imgfarm.models.images import get_image, image_views
from imgfarm.models.nodes import get_node, node_views
from imgfarm.models.tokens import Principal, create_token, revoke_token, token_views
from imgfarm.models.views import image_view, node_view
from imgfarm.protocol import ImageFormat
from imgfarm.tasks import submit
from imgfarm.tasks.convert import submit_convert
from imgfarm.tasks.nodes import add_node

Reader = Annotated[Principal, Depends(require("read"))]
Operator = Annotated[Principal, Depends(require("operate"))]
Admin = Annotated[Principal, Depends(require("admin"))]

router = APIRouter(prefix="/api/v1", tags=["operator"])


class CaptureIn(BaseModel):
    node: str
    image: str
    format: str = ImageFormat.NG  # checked by the submit (a named error, not a 422)
    submitted_by: str = Field("", description="a note kept beside the token's name")
    timeout: float = 0
    disk: str = ""  # this job's device on the node instead of the node's disk


class RestoreIn(BaseModel):
    nodes: str
    image: str
    skip_busy: bool = False
    convert: bool = False
    converted_name: str | None = None
    submitted_by: str = Field("", description="a note kept beside the token's name")
    timeout: float = 0
    disk: str = ""  # this job's device on each node instead of the node's disk


class ConvertIn(BaseModel):
    image: str
    name: str | None = None
    submitted_by: str = Field("", description="a note kept beside the token's name")


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
def capture(body: CaptureIn, who: Operator) -> dict[str, Any]:
    sub = submit.submit_capture(body.node, body.image, body.format,
                                submitted_by=submitter(who, body.submitted_by),
                                options=submit.job_options(body.timeout, body.disk))
    return {"job_ids": sub.job_ids}


@router.post("/jobs/restore", status_code=201)
def restore(body: RestoreIn, who: Operator) -> dict[str, Any]:
    sub = submit.submit_restore(body.nodes, body.image, submitted_by=submitter(who, body.submitted_by),
                                skip_busy=body.skip_busy, convert=body.convert,
                                converted_name=body.converted_name,
                                options=submit.job_options(body.timeout, body.disk))
    return {"job_ids": sub.job_ids, "skipped": sub.skipped, "convert_job_id": sub.convert_job_id}


@router.post("/jobs/convert", status_code=201)
def convert(body: ConvertIn, who: Operator) -> dict[str, Any]:
    return {"job_ids": [submit_convert(body.image, body.name,
                                       submitted_by=submitter(who, body.submitted_by))]}


@router.get("/jobs")
def list_jobs(
    _who: Reader,
    state: str | None = None, node: str | None = None, kind: str | None = None,
    limit: int = Query(200, ge=1, le=10000),
) -> list[dict[str, Any]]:
    with reader() as db:
        return views.list_jobs(db, state or "", node or "", kind or "", limit)


@router.get("/jobs/{job_id}")
def read_job(job_id: JobIdPath, _who: Reader) -> dict[str, Any]:
    with reader() as db:
        return views.read_job(db, job_id)


@router.post("/jobs/{job_id}/cancel")
def cancel(job_id: JobIdPath, _who: Operator) -> dict[str, Any]:
    was = submit.request_cancel(job_id)
    return {"job_id": job_id, "was": was, "status": "cancel requested"}


@router.get("/nodes")
def list_nodes(_who: Reader) -> list[dict[str, Any]]:
    with session_scope() as s:
        return node_views(s)


@router.post("/nodes", status_code=201)
def create_node(body: NodeIn, _who: Admin) -> dict[str, Any]:
    with session_scope() as s:
        node = add_node(s, body.name, body.mac, body.ip, body.groups, body.boot_driver,
                        body.power_driver, body.disk, body.driver_info)
        return node_view(node)


@router.get("/nodes/{name}")
def read_node(name: str, _who: Reader) -> dict[str, Any]:
    with session_scope() as s:
        return node_view(get_node(s, name))


@router.get("/drivers")
def list_drivers(_who: Reader) -> list[dict[str, Any]]:
    """Every boot and power driver, with the driver_info keys it takes."""
    return driver_docs.catalog()


@router.get("/drivers/{name}")
def read_driver(name: str, _who: Reader) -> dict[str, Any]:
    """A driver's properties: each driver_info key, its default, what it is for."""
    return driver_docs.show_view(name)


@router.get("/images")
def list_images(_who: Reader) -> list[dict[str, Any]]:
    with session_scope() as s:
        return image_views(s)


@router.get("/images/{name}")
def read_image(name: str, _who: Reader) -> dict[str, Any]:
    with session_scope() as s:
        return image_view(get_image(s, name), manifest=True)


class TokenIn(BaseModel):
    name: str
    scope: str = Field(description="read | operate | admin")


@router.get("/tokens")
def list_tokens(_who: Admin) -> list[dict[str, Any]]:
    """Names, scopes and last use; never a secret (only hashes are stored)."""
    with session_scope() as s:
        return token_views(s)


@router.post("/tokens", status_code=201)
def new_token(body: TokenIn, who: Admin) -> dict[str, Any]:
    """The token is in this answer and nowhere else: store it now."""
    with session_scope() as s:
        token = create_token(s, body.name, body.scope, created_by=submitter(who, ""))
    return {"name": body.name, "scope": body.scope, "token": token}


@router.delete("/tokens/{name}")
def delete_token(name: str, _who: Admin) -> dict[str, Any]:
    with session_scope() as s:
        revoke_token(s, name)
    return {"revoked": name}
