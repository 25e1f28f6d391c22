"""The in-process API client the API tests share, and the running job they report on.

The client's peer is loopback: with no operator token in the database, only
this machine may call, which is what these tests rely on.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from fastapi.testclient import TestClient

from imgfarm.models import states
from imgfarm.models.db import session_scope
from imgfarm.models.jobs import hash_token
from imgfarm.models.nodes import get_node
from imgfarm.models.tables import Job

LOCAL = ("127.0.0.1", 50000)


@contextmanager
def local_client() -> Iterator[TestClient]:
    """The real app (lifespan included) called from loopback."""
    from imgfarm.api.app import create_app

    with TestClient(create_app(), client=LOCAL) as c:
        yield c


def running_job(token: str, state: str = states.RUNNING, node: str = "n1", image: str = "base") -> int:
    """A restore of `image` on `node` (both already added) in `state`, whose agent holds `token`."""
    with session_scope() as s:
        job = Job(kind="restore", node_id=get_node(s, node).id, image_name=image, state=state,
                  token_hash=hash_token(token))
        s.add(job)
        s.flush()
        return job.id
