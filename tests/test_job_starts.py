"""Jobs start in batches (tasks/starts.py), on SQLite and PostgreSQL: each job is claimed once.

Real databases and real threads; the claim is the same conditional update as a
lone start, so however many threads (or deliveries of one task) arrive at once,
a node is booted exactly once, and every other outcome is the one a lone start had.
"""

from __future__ import annotations

import threading
from pathlib import Path

from sqlalchemy import event, select

from imgfarm.errors import NotFound
from imgfarm.models import states
from imgfarm.models.db import get_engine, session_scope
from imgfarm.models.images import register_image
from imgfarm.models.tables import Job, Node
from imgfarm.models.workers import worker_id
from imgfarm.tasks.nodes import add_node
from imgfarm.tasks.starts import Start, claim_batch, claim_start


def _jobs(tmp_path: Path, n: int) -> list[int]:
    with session_scope() as s:
        register_image(s, "base", "partimage-ng", "base", size_bytes=1, checksums={})
        ids = []
        for i in range(n):
            disk = tmp_path / f"s{i}.img"
            disk.write_bytes(b"")
            bmc = {"power": "ipmi", "driver_info": {"bmc_address": "10.1.0.1", "bmc_password": "pw"}} if i == 0 else {}
            node = add_node(s, f"s{i}", disk=str(disk), **bmc)  # type: ignore[arg-type]
            job = Job(kind="restore", node_id=node.id, image_name="base", state=states.QUEUED,
                      options={"boot_timeout": 42})
            s.add(job)
            s.flush()
            ids.append(job.id)
    return ids


def _row(job_id: int) -> tuple[str, int, str, str]:
    with session_scope() as s:
        job = s.get(Job, job_id)
        assert job is not None
        return job.state, job.boot_calls, job.waiter, job.error


def test_a_batch_claims_each_job_as_a_lone_start_would(settings_env: str, tmp_path: Path) -> None:
    queued, cancelled, orphan, elsewhere = _jobs(tmp_path, 4)
    with session_scope() as s:
        s.get(Job, cancelled).cancel_requested = True  # type: ignore[union-attr]
        s.get(Job, elsewhere).state = states.RUNNING  # type: ignore[union-attr]
        s.get(Job, elsewhere).waiter = "a-dead-worker"  # type: ignore[union-attr]
        node_id = s.get(Job, orphan).node_id  # type: ignore[union-attr]
        s.get(Job, orphan).node_id = None  # type: ignore[union-attr]
        s.delete(s.get(Node, node_id))
    out = claim_batch([queued, cancelled, orphan, elsewhere, 987654, 2**40])
    won = out[queued]
    assert isinstance(won, Start) and won.info is not None and won.info.name == "s0"
    assert won.first_deadline == 42 and won.options["boot_timeout"] == 42 and won.image == "base"
    assert won.info.driver_info["bmc_password"] == "pw"  # the node's secrets reach its drivers
    assert _row(queued)[:3] == (states.BOOTING, 1, worker_id())
    assert isinstance(out[cancelled], Start) and out[cancelled].info is None  # type: ignore[union-attr]
    assert _row(cancelled)[0] == states.FINALIZING
    assert _row(orphan)[0] == states.FINALIZING and "no longer exists" in _row(orphan)[3]
    assert out[elsewhere].info is None and _row(elsewhere)[2] == worker_id()  # type: ignore[union-attr]
    assert isinstance(out[987654], NotFound) and isinstance(out[2**40], NotFound)
    # a second claim (a redelivered task) boots nothing
    again = claim_batch([queued])[queued]
    assert isinstance(again, Start) and again.info is None and _row(queued)[1] == 1


def test_threads_starting_at_once_share_transactions_and_boot_once(settings_env: str, tmp_path: Path) -> None:
    ids = _jobs(tmp_path, 60)
    begins: list[int] = []
    engine = get_engine()

    def count(conn: object) -> None:
        begins.append(1)

    event.listen(engine, "begin", count)
    got: dict[int, list[Start]] = {jid: [] for jid in ids}
    errors: list[BaseException] = []
    gate = threading.Barrier(len(ids) + 10)

    def start(job_id: int) -> None:
        try:
            gate.wait(10)
            got[job_id].append(claim_start(job_id))
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    # every job once, and ten of them delivered twice
    threads = [threading.Thread(target=start, args=(jid,)) for jid in ids + ids[:10]]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
    finally:
        event.remove(engine, "begin", count)
    assert not errors, errors
    assert all(not t.is_alive() for t in threads)
    assert all(sum(1 for st in got[jid] if st.info is not None) == 1 for jid in ids), got
    with session_scope() as s:
        rows = s.execute(select(Job.state, Job.boot_calls).where(Job.id.in_(ids))).all()
    assert {tuple(r) for r in rows} == {(states.BOOTING, 1)}
    assert len(begins) < len(ids) / 2, f"{len(begins)} transactions for {len(ids)} starts"
