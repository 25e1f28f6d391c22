"""Operator API tokens: created, listed, revoked, checked.

A token is shown once, when it is made; the database keeps only the sha256 of
its secret part. Tokens are long random strings, so a plain hash is enough (no
password stretching is needed to make guessing hopeless). Scopes nest:
`admin` may do all that `operate` may, `operate` all that `read` may.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import re
import secrets
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from imgfarm.config.settings import get_settings
from imgfarm.errors import Conflict, InvalidInput, NotFound
from imgfarm.models.db import session_scope
from imgfarm.models.tables import ApiToken, utcnow

SCOPES = ("read", "operate", "admin")
PREFIX = "imgf_"
TOKEN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.@-]{0,127}")
_TOKEN = re.compile(r"imgf_([0-9a-f]{12})_([A-Za-z0-9_-]{43})")
CREATE_HINT = "create one: `imgfarm token create NAME --scope read|operate|admin`"
# last_used_at is refreshed at most this often: a busy script must not turn every read into a write
USE_RECORD_EVERY = timedelta(seconds=60)


@dataclass(frozen=True)
class Principal:
    """Who made a request: a token's name and scope."""

    name: str
    scope: str

    def allows(self, scope: str) -> bool:
        return SCOPES.index(self.scope) >= SCOPES.index(scope)


def _hash(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def check_scope(scope: str) -> str:
    if scope not in SCOPES:
        raise InvalidInput(f"bad scope {scope!r}", hint="use one of: " + ", ".join(SCOPES))
    return scope


def create_token(session: Session, name: str, scope: str, created_by: str = "") -> str:
    """A new token for `name`; the returned string is the only copy of its secret."""
    if not TOKEN_NAME.fullmatch(name or ""):
        raise InvalidInput(f"bad token name {name!r}",
                           hint="use letters, digits, '.', '_', '@' and '-' (at most 128)")
    check_scope(scope)
    if session.scalar(select(ApiToken.id).where(ApiToken.name == name)) is not None:
        raise Conflict(f"a token named {name!r} exists",
                       hint=f"revoke it first (imgfarm token revoke {name}) or pick another name")
    key_id, secret = secrets.token_hex(6), secrets.token_urlsafe(32)
    session.add(ApiToken(key_id=key_id, name=name, scope=scope, secret_hash=_hash(secret),
                         created_by=created_by))
    session.flush()
    return f"{PREFIX}{key_id}_{secret}"


def revoke_token(session: Session, name: str) -> None:
    """Removes the token: a revoked token is refused from the next request on."""
    row = session.scalar(select(ApiToken).where(ApiToken.name == name))
    if row is None:
        raise NotFound(f"no token named {name!r}", hint="see `imgfarm token list`")
    session.delete(row)


def token_views(session: Session) -> list[dict[str, Any]]:
    rows = session.scalars(select(ApiToken).order_by(ApiToken.name))
    return [{"name": r.name, "scope": r.scope, "created_at": r.created_at.isoformat(),
             "created_by": r.created_by,
             "last_used_at": r.last_used_at.isoformat() if r.last_used_at else None}
            for r in rows]


def any_token(session: Session) -> bool:
    return session.scalar(select(ApiToken.id).limit(1)) is not None


def verify_token(session: Session, presented: str, record_use: bool = True) -> Principal | None:
    """The token's principal, or None for anything that is not a live token."""
    m = _TOKEN.fullmatch(presented or "")
    if m is None:
        return None
    row = session.scalar(select(ApiToken).where(ApiToken.key_id == m.group(1)))
    # compare against a hash even when there is no row, so a miss costs the same
    expected = row.secret_hash if row is not None else _hash("")
    if not hmac.compare_digest(expected, _hash(m.group(2))) or row is None:
        return None
    now = utcnow()
    if record_use and (row.last_used_at is None or now - row.last_used_at > USE_RECORD_EVERY):
        row.last_used_at = now
    return Principal(row.name, row.scope)


def verify_static(configured: str, presented: str) -> Principal | None:
    """IMGFARM_API_TOKEN, the bootstrap credential: an admin named `api-token`."""
    if configured and presented and hmac.compare_digest(configured.encode(), presented.encode()):
        return Principal("api-token", "admin")
    return None


def is_loopback(host: str) -> bool:
    if host.strip().lower() in ("localhost", "localhost.localdomain"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def credential_configured(session: Session) -> bool:
    return bool(get_settings().api_token) or any_token(session)


def check_listen(host: str) -> None:
    """Refuses to serve operators beyond this machine while no credential exists."""
    if is_loopback(host):
        return
    with session_scope() as s:
        if credential_configured(s):
            return
    raise InvalidInput(
        f"refusing to listen on {host}: no operator token exists, so anyone who reaches the port "
        "could wipe every node",
        hint=f"{CREATE_HINT} (or set IMGFARM_API_TOKEN), or listen on 127.0.0.1")
