"""The image store over HTTP, for agents whose boot image has no NFS: one job's view of it.

    GET|HEAD /agent/v1/jobs/N/store/PATH   a file of the job's image (restore), with Range
    PUT      /agent/v1/jobs/N/store/PATH   a piece of a file the job captures, at an offset

Each call needs the job's token, like every agent endpoint, and the job must still be
open. A restore reads only inside its image's directory; a capture writes only inside
its own incoming directory (nothing there is an image until the files verify).

Why Range and offsets: a transfer that breaks goes on from the last byte the agent
verified instead of from zero. A PUT carries ``Content-Range: bytes START-END/*`` and is
taken only when START is the file's present size (a repeated piece after a lost answer
is taken again only if it starts at the present size); any other START is refused with
409 and the present size in ``offset``, which is where the agent resumes. A PUT body is
at most MAX_PIECE bytes.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Header, Request
from fastapi.responses import FileResponse, JSONResponse
from starlette.concurrency import run_in_threadpool

from imgfarm.api.agent_routes import open_job
from imgfarm.api.limits import STORE_PIECE, JobIdPath
from imgfarm.errors import Conflict, InvalidInput, NotFound
from imgfarm.models.db import session_scope
from imgfarm.models.images import get_image, incoming_location, store_root
from imgfarm.protocol import STORE_PATH, JobKind

router = APIRouter(prefix="/agent/v1", tags=["agent"])

MAX_PIECE = STORE_PIECE
CONTENT_RANGE = re.compile(r"^bytes (\d{1,15})-(\d{1,15})/(\d{1,15}|\*)\Z")


def _job_file(job_id: int, path: str, authorization: str | None, write: bool) -> Path:
    """The file `path` names for this job, after the token, the job's state and its scope."""
    if not STORE_PATH.match(path):
        raise InvalidInput(f"bad store path {path!r}", hint="a relative path inside the store")
    with session_scope() as s:
        job = open_job(s, job_id, authorization)
        if write:
            if job.kind != JobKind.CAPTURE:
                raise Conflict(f"job {job_id} is a {job.kind}; only a capture writes to the store")
            scope = incoming_location(job_id)
        elif job.kind == JobKind.RESTORE:
            scope = get_image(s, job.image_name).location
        else:
            scope = incoming_location(job_id)
    if not (path == scope or path.startswith(scope + "/")):
        raise NotFound(f"{path} is not part of job {job_id}'s image")
    return store_root() / path


@router.get("/jobs/{job_id}/store/{path:path}", operation_id="get_store_file")
@router.head("/jobs/{job_id}/store/{path:path}", operation_id="head_store_file")
def get_store_file(job_id: JobIdPath, path: str, authorization: str | None = Header(None)) -> FileResponse:
    target = _job_file(job_id, path, authorization, write=False)
    if not target.is_file():
        raise NotFound(f"{path} is not in the store")
    return FileResponse(target, media_type="application/octet-stream")


def _append(target: Path, start: int, body: bytes) -> int:
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target, "ab") as fh:
        size = fh.seek(0, os.SEEK_END)
        if start != size:
            return -size - 1
        fh.write(body)
        fh.flush()
        os.fsync(fh.fileno())
        return fh.tell()


@router.put("/jobs/{job_id}/store/{path:path}")
async def put_store_piece(job_id: JobIdPath, path: str, request: Request,
                          authorization: str | None = Header(None),
                          content_range: str | None = Header(None)) -> Any:
    target = await run_in_threadpool(_job_file, job_id, path, authorization, True)
    m = CONTENT_RANGE.match(content_range or "")
    if not m:
        raise InvalidInput(f"bad Content-Range {content_range!r}", hint="bytes START-END/* (END inclusive)")
    start, end = int(m.group(1)), int(m.group(2))
    if end < start - 1 or end - start + 1 > MAX_PIECE:
        raise InvalidInput(f"Content-Range {content_range!r}: a piece is 0 to {MAX_PIECE} bytes")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > end - start + 1:
            break
    if len(body) != end - start + 1:
        raise InvalidInput(f"the body has {len(body)} bytes; Content-Range {content_range!r} says "
                           f"{end - start + 1}")
    offset = await run_in_threadpool(_append, target, start, bytes(body))
    if offset < 0:
        return JSONResponse({"error": f"{path} has {-offset - 1} bytes; a piece must start there",
                             "hint": "resume at offset", "offset": -offset - 1}, status_code=409)
    return {"offset": offset}
