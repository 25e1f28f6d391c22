"""Who may call what: operator tokens with scopes, and the per-job token of an agent.

Operators send `Authorization: Bearer <token>`; a token has one scope and
scopes nest (admin > operate > read). While no credential exists at all (no
token in the database, no IMGFARM_API_TOKEN), the API is a single-user tool on
one machine: `imgfarm api` refuses to listen anywhere but loopback, and a
request without a token is served only when it comes from a loopback address.
The first token created switches that off for every request.

An agent presents its job's token; `authorized_job` is the one check, used by
the agent endpoints and by anything else that serves one job's agent (the
image store over HTTP), so all of them refuse the same way.
"""

from __future__ import annotations

import hmac
from collections.abc import Callable

from fastapi import Header, Request
from sqlalchemy.orm import Session

from imgfarm.api.limits import JobIdPath
from imgfarm.config.settings import get_settings
from imgfarm.errors import Forbidden, Unauthorized
from imgfarm.models.db import session_scope
from imgfarm.models.jobs import hash_token
from imgfarm.models.tables import Job
from imgfarm.models.tokens import (
    CREATE_HINT,
    Principal,
    credential_configured,
    is_loopback,
    verify_static,
    verify_token,
)
from imgfarm.protocol import MAX_ID

ANONYMOUS = Principal("local", "admin")


def bearer(authorization: str | None) -> str:
    value = authorization or ""
    return value[7:].strip() if value[:7].lower() == "bearer " else ""


def authenticate(request: Request, authorization: str | None) -> Principal:
    presented = bearer(authorization)
    with session_scope() as s:
        if presented:
            who = verify_static(get_settings().api_token, presented) or verify_token(s, presented)
            if who is None:
                raise Unauthorized("missing or wrong operator token",
                                   hint="send Authorization: Bearer <token>; " + CREATE_HINT)
            return who
        if credential_configured(s):
            raise Unauthorized("operator token required",
                               hint="send Authorization: Bearer <token>; " + CREATE_HINT)
    peer = request.client.host if request.client else ""
    if not is_loopback(peer):
        raise Unauthorized("operator token required: no token exists, so only this machine "
                           "may call the API", hint=CREATE_HINT)
    return ANONYMOUS


def require(scope: str) -> Callable[..., Principal]:
    """A FastAPI dependency: the caller's principal, refused unless its scope covers `scope`."""

    def dependency(request: Request, authorization: str | None = Header(None)) -> Principal:
        who = authenticate(request, authorization)
        if not who.allows(scope):
            raise Forbidden(f"token {who.name!r} has scope {who.scope}; this needs {scope}",
                               hint=f"use a token with scope {scope} or wider")
        return who

    dependency.__name__ = f"require_{scope}"
    return dependency


def meta_access(request: Request, authorization: str | None = Header(None)) -> None:
    """/metrics, /docs, /openapi.json: open, or the `read` scope (IMGFARM_API_META_ACCESS)."""
    if get_settings().api_meta_access != "public":
        require("read")(request, authorization)


def submitter(who: Principal, claimed: str) -> str:
    """What a job records as its submitter: the token's name, never what the body claims."""
    if who is ANONYMOUS:
        return f"local:{claimed}" if claimed else "local"
    return f"token:{who.name}"


def authorized_job(session: Session, job_id: int, authorization: str | None) -> Job:
    """The job whose token the caller presents; 401 for anything else, unknown ids included
    (a stranger learns nothing about which jobs exist)."""
    token = bearer(authorization)
    job = session.get(Job, job_id) if 1 <= job_id <= MAX_ID else None
    if job is None or not token or not job.token_hash or not hmac.compare_digest(
        job.token_hash, hash_token(token)
    ):
        raise Unauthorized("missing or wrong job token")
    return job


def require_job_token(job_id: JobIdPath, authorization: str | None = Header(None)) -> int:
    """A FastAPI dependency for a route with a `{job_id}`: its agent's token, checked."""
    with session_scope() as s:
        authorized_job(s, job_id, authorization)
    return job_id

