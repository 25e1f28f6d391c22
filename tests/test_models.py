"""The job database on SQLite and PostgreSQL: one active job per node, transitions, ranges."""

from __future__ import annotations

import pytest
from sqlalchemy.exc import IntegrityError

from imgfarm.errors import NodeRangeError, NotFound
from imgfarm.models import states
from imgfarm.models.db import session_scope
from imgfarm.models.jobs import begin_finalizing, get_job, transition
from imgfarm.models.nodes import expand_range, resolve_nodes
from imgfarm.models.tables import Job, JobEvent
from imgfarm.tasks.nodes import add_node


def _nodes(n: int, group: str | None = None) -> None:
    with session_scope() as s:
        for i in range(1, n + 1):
            add_node(s, f"n{i}", disk=f"/tmp/n{i}.img", groups=[group] if group else [])


def test_one_active_job_per_node_is_enforced_by_the_database(settings_env: str) -> None:
    _nodes(1)
    with session_scope() as s:
        node_id = resolve_nodes(s, "n1")[0].id
        s.add(Job(kind="restore", node_id=node_id, image_name="a"))
    with pytest.raises(IntegrityError), session_scope() as s:
        s.add(Job(kind="restore", node_id=node_id, image_name="b"))
    with session_scope() as s:  # an ended job does not count
        job = s.query(Job).one()
        job.state = states.FAILED
    with session_scope() as s:
        s.add(Job(kind="restore", node_id=node_id, image_name="c"))
    with session_scope() as s:
        assert s.query(Job).count() == 2


def test_transitions_are_conditional_and_write_events(settings_env: str) -> None:
    _nodes(1)
    with session_scope() as s:
        job = Job(kind="restore", node_id=resolve_nodes(s, "n1")[0].id, image_name="a")
        s.add(job)
        s.flush()
        job_id = job.id
    with session_scope() as s:
        assert transition(s, job_id, states.QUEUED, states.BOOTING, "go")
    with session_scope() as s:  # a second actor racing on the same step loses
        assert not transition(s, job_id, states.QUEUED, states.BOOTING, "again")
    with session_scope() as s:
        assert begin_finalizing(s, job_id, states.TIMED_OUT, "late")
        assert not begin_finalizing(s, job_id, states.FAILED, "too")
    with session_scope() as s:
        job = get_job(s, job_id)
        assert (job.state, job.outcome, job.error) == (states.FINALIZING, states.TIMED_OUT, "late")
        kinds = [e.state for e in s.query(JobEvent).filter_by(job_id=job_id).order_by(JobEvent.id)]
        assert kinds == [states.BOOTING, states.FINALIZING]
    with session_scope() as s, pytest.raises(ValueError):
        transition(s, job_id, states.SUCCEEDED, states.RUNNING)


def test_node_ranges_expand_and_name_typos(settings_env: str) -> None:
    _nodes(4, group="lab1")
    with session_scope() as s:
        assert expand_range(s, "n[1-3]") == ["n1", "n2", "n3"]
        assert [n.name for n in resolve_nodes(s, "@lab1")] == ["n1", "n2", "n3", "n4"]
        assert [n.name for n in resolve_nodes(s, "n[1-4]!n2")] == ["n1", "n3", "n4"]
        with pytest.raises(NotFound, match=r"unknown nodes n\[5-9\] in 'n\[1-9\]'"):
            resolve_nodes(s, "n[1-9]")
        with pytest.raises(NotFound, match="unknown node n9"):
            resolve_nodes(s, "n1,n9")
        with pytest.raises(NodeRangeError, match="bad node range 'n\\[1-'"):
            expand_range(s, "n[1-")
        with pytest.raises(NodeRangeError, match="unknown group @lab2"):
            expand_range(s, "@lab2")
