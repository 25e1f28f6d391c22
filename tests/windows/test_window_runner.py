"""The window runner's logic on SQLite and PostgreSQL, with jobs moved by hand.

A real database and the real `tick()`; the worker is played by the test
(jobs are enqueued on an in-memory broker and their rows ended directly), so
these run in seconds and can put the clock anywhere.
"""

from __future__ import annotations

import threading
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import select

from imgfarm.errors import Conflict, InvalidInput, NotFound
from imgfarm.models import states
from imgfarm.models.db import session_scope
from imgfarm.models.nodes import get_node
from imgfarm.models.tables import Job
from imgfarm.models.windows import (
    Window,
    WindowRun,
    WindowRunNode,
    add_window,
    check_cron,
    check_timezone,
)
from imgfarm.tasks.window_runner import due_slot, run_now, tick
from tests.windows.conftest import finish_job, start_job

T0 = datetime(2026, 11, 28, 2, 0, tzinfo=UTC)  # a Saturday, 02:00 UTC


def _window(**kw: object) -> None:
    args: dict[str, object] = dict(name="w", cron="0 2 * * 6", duration_minutes=60, image="base",
                                   groups=["lab1"], max_concurrent=2, max_retries=1)
    args.update(kw)
    with session_scope() as s:
        add_window(s, **args)  # type: ignore[arg-type]
        s.execute(Window.__table__.update().values(created_at=T0 - timedelta(days=1)))


def _nodes() -> dict[str, tuple[str, int | None, int, str]]:
    with session_scope() as s:
        return {rn.node_name: (rn.status, rn.last_job_id, rn.attempts, rn.reason)
                for rn in s.scalars(select(WindowRunNode))}


def _jobs() -> list[Job]:
    with session_scope() as s:
        return list(s.scalars(select(Job).order_by(Job.id)))


def test_due_slot_follows_cron_in_the_windows_time_zone() -> None:
    # 02:00 in Berlin (CET, UTC+1) is 01:00 UTC.
    sat_0100_utc = datetime(2026, 11, 28, 1, 0, tzinfo=UTC)
    assert due_slot("0 2 * * 6", "Europe/Berlin", sat_0100_utc) == sat_0100_utc
    assert due_slot("0 2 * * 6", "Europe/Berlin", sat_0100_utc + timedelta(minutes=30),
                    duration=timedelta(hours=1)) == sat_0100_utc
    # after the slot's end, and before the window existed: nothing is due
    assert due_slot("0 2 * * 6", "Europe/Berlin", sat_0100_utc + timedelta(hours=1),
                    duration=timedelta(hours=1)) is None
    assert due_slot("0 2 * * 6", "UTC", T0 + timedelta(minutes=5),
                    not_before=T0 + timedelta(minutes=3)) is None
    # exactly on the minute it fires
    assert due_slot("0 2 * * 6", "UTC", T0) == T0
    assert due_slot("0 2 * * 6", "UTC", T0 - timedelta(seconds=1),
                    duration=timedelta(hours=1)) is None


def test_bad_cron_and_zone_name_themselves() -> None:
    with pytest.raises(InvalidInput) as e:
        check_cron("0 2 * * X")
    assert "'0 2 * * X'" in e.value.message and "0 2 * * 6" in (e.value.hint or "")
    with pytest.raises(InvalidInput):
        check_cron("0 2 * *")
    with pytest.raises(InvalidInput) as e2:
        check_timezone("Mars/Olympus")
    assert "Mars/Olympus" in e2.value.message


def test_add_window_checks_image_and_group(win_db: str) -> None:
    with pytest.raises(NotFound, match="nope"):
        _window(image="nope")
    with pytest.raises(NotFound, match="lab9"):
        _window(groups=["lab9"])
    _window()
    with pytest.raises(Conflict):
        _window()


def test_window_opens_once_caps_retries_and_closes(win_db: str) -> None:
    _window()
    assert tick(T0 - timedelta(minutes=1))["opened"] == []
    out = tick(T0)
    assert len(out["opened"]) == 1 and len(out["submitted"]) == 2
    # the same slot never opens twice, and the cap holds while 2 are in flight
    out2 = tick(T0 + timedelta(seconds=30))
    assert out2["opened"] == [] and out2["submitted"] == {}
    assert len(_jobs()) == 2
    first, second = _jobs()
    start_job(first.id)
    finish_job(first.id)  # n1 succeeds
    finish_job(second.id, states.FAILED, "disk on fire")  # n2 fails once: retried
    out3 = tick(T0 + timedelta(minutes=1))
    assert len(out3["submitted"]) == 2
    nodes = _nodes()
    assert nodes["n1"][0] == "succeeded"
    assert nodes["n2"][0] == "pending" and "disk on fire" in nodes["n2"][3]
    for job in _jobs():
        if job.state in states.ACTIVE:
            finish_job(job.id)
    tick(T0 + timedelta(minutes=2))  # n2 retried after n3, n4 -> now n5/n6 or n2
    for _ in range(5):
        for job in _jobs():
            if job.state in states.ACTIVE:
                finish_job(job.id, states.FAILED if job.node_name == "n2" else states.SUCCEEDED,
                           "still on fire")
        tick(T0 + timedelta(minutes=3))
    nodes = _nodes()
    assert {n: v[0] for n, v in nodes.items()} == {
        "n1": "succeeded", "n2": "failed", "n3": "succeeded", "n4": "succeeded",
        "n5": "succeeded", "n6": "succeeded"}
    assert nodes["n2"][2] == 2  # one try plus max_retries=1
    assert sum(1 for j in _jobs() if j.node_name == "n2") == 2
    out4 = tick(T0 + timedelta(minutes=61))
    with session_scope() as s:
        run = s.scalars(select(WindowRun)).one()
        assert run.state == "closed" and run.id in out4["closed"]
    # all six window jobs carry the run id
    assert all(j.window_run_id == run.id for j in _jobs())


def _session(job: Job) -> dict[str, object] | None:
    mc = (job.options or {}).get("multicast")
    return mc if isinstance(mc, dict) else None


def test_a_multicast_window_starts_each_batch_as_one_session(win_db: str) -> None:
    _window(max_concurrent=4, multicast=True, max_wait=7, max_bitrate="600M")
    out = tick(T0)
    assert sorted(out["submitted"]) == ["n1", "n2", "n3", "n4"]
    first = _jobs()
    sessions = [_session(j) for j in first]
    assert all(mc is not None for mc in sessions), sessions
    assert len({mc["session"] for mc in sessions if mc}) == 1  # one udpcast stream for the four
    mc = sessions[0]
    assert mc is not None and mc["nodes"] == 4 and mc["max_wait"] == 7 and mc["max_bitrate"] == "600m"
    # each node's outcome points at its own job
    nodes = _nodes()
    assert {nodes[j.node_name][1] for j in first} == {j.id for j in first}
    for job in first:
        finish_job(job.id)
    tick(T0 + timedelta(minutes=1))  # the next batch: the two left, a session of their own
    rest = [j for j in _jobs() if j.id not in {f.id for f in first}]
    assert sorted(j.node_name for j in rest) == ["n5", "n6"]
    later = {str(mc["session"]) for mc in (_session(j) for j in rest) if mc}
    assert len(later) == 1 and later != {mc["session"]}
    assert all((_session(j) or {}).get("nodes") == 2 for j in rest)


def test_a_unicast_window_and_multicast_settings_checked(win_db: str) -> None:
    from imgfarm.models.images import register_image

    _window()
    tick(T0)
    assert _jobs() and all(_session(j) is None for j in _jobs())
    with pytest.raises(InvalidInput, match="--multicast"):
        _window(name="w2", max_wait=5)
    with pytest.raises(InvalidInput, match="max-bitrate"):
        _window(name="w2", multicast=True, max_bitrate="fast")
    with session_scope() as s:
        register_image(s, "old", "partimage", "old", size_bytes=1, checksums={})
    with pytest.raises(InvalidInput, match="partimage-ng"):
        _window(name="w2", image="old", multicast=True)
    _window(name="w2", image="old", multicast=True, convert=True)  # converted first, then multicast


def test_busy_and_maintenance_nodes_are_skipped_and_reported(win_db: str) -> None:
    from imgfarm.tasks.submit import submit_restore

    busy = submit_restore("n1", "base", submitted_by="adhoc").job_ids[0]
    with session_scope() as s:
        get_node(s, "n2").admin_state = states.NODE_MAINTENANCE
    _window(max_concurrent=6)
    out = tick(T0)
    assert out["skipped"] == {"n1": f"busy with job {busy}", "n2": "marked maintenance"}
    assert sorted(out["submitted"]) == ["n3", "n4", "n5", "n6"]
    # n1 is not queued twice: still exactly one job for it
    assert sum(1 for j in _jobs() if j.node_name == "n1") == 1
    # the window ends with n1 still busy: its outcome stays "skipped" with the reason
    tick(T0 + timedelta(minutes=61))
    nodes = _nodes()
    assert nodes["n1"][0] == "skipped" and "busy" in nodes["n1"][3]
    assert nodes["n2"][0] == "skipped"


def test_no_new_job_after_the_end_and_on_close_cancel(win_db: str) -> None:
    _window(max_concurrent=2, on_close="cancel")
    tick(T0)
    a, b = _jobs()
    start_job(a.id)  # a runs; b is still queued
    out = tick(T0 + timedelta(minutes=60))  # the end: nothing new, both cancelled
    assert out["submitted"] == {}
    assert sorted(out["cancelled"]) == sorted([a.id, b.id])
    nodes = _nodes()
    assert [nodes[f"n{i}"][0] for i in range(3, 7)] == ["not_reached"] * 4
    with session_scope() as s:
        assert s.get(Job, a.id).cancel_requested  # type: ignore[union-attr]
        assert s.get(Job, b.id).state == states.CANCELLED  # type: ignore[union-attr]
        assert s.scalars(select(WindowRun)).one().state == "draining"
    finish_job(a.id, states.CANCELLED, "cancelled by operator")
    tick(T0 + timedelta(minutes=61))
    nodes = _nodes()
    assert nodes["n1"][0] == "failed" and nodes["n2"][0] == "failed"
    with session_scope() as s:
        assert s.scalars(select(WindowRun)).one().state == "closed"


def test_on_close_finish_lets_running_jobs_end(win_db: str) -> None:
    _window(max_concurrent=1)
    tick(T0)
    (a,) = _jobs()
    start_job(a.id)
    out = tick(T0 + timedelta(minutes=60))
    assert out["cancelled"] == []
    with session_scope() as s:
        assert s.get(Job, a.id).state == states.RUNNING  # type: ignore[union-attr]
    finish_job(a.id)
    tick(T0 + timedelta(minutes=62))
    assert _nodes()["n1"][0] == "succeeded"


def test_store_cap_counts_ad_hoc_jobs(win_db: str) -> None:
    from imgfarm.tasks.submit import submit_restore

    submit_restore("n5,n6", "base", submitted_by="adhoc")
    _window(max_concurrent=4, store_cap=3, nodes="n1,n2,n3,n4", groups=[])
    out = tick(T0)
    assert len(out["submitted"]) == 1  # 2 ad-hoc + 1 = the store cap of 3


def test_concurrent_ticks_do_not_double_start(win_db: str) -> None:
    _window(max_concurrent=3)
    results: list[dict[str, object]] = []
    errors: list[BaseException] = []
    gate = threading.Barrier(4)

    def go() -> None:
        try:
            gate.wait()
            results.append(tick(T0 + timedelta(seconds=5)))
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=go) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    assert sum(len(r["opened"]) for r in results) == 1  # type: ignore[arg-type]
    jobs = _jobs()
    assert len(jobs) == 3, [(j.id, j.node_name) for j in jobs]
    assert len({j.node_name for j in jobs}) == 3
    with session_scope() as s:
        assert len(s.scalars(select(WindowRun)).all()) == 1


def test_run_now_opens_outside_the_schedule(win_db: str) -> None:
    _window(max_concurrent=2, cron="0 3 1 1 *")
    out = run_now("w")
    assert len(out["submitted"]) == 2
    with pytest.raises(Conflict):
        run_now("w")
    with session_scope() as s:
        run = s.scalars(select(WindowRun)).one()
        assert run.trigger == "run-now"
        assert (run.closes_at - run.opened_at) == timedelta(minutes=60)


def test_convert_window_converts_once_then_restores_the_result(win_db: str) -> None:
    from imgfarm.models.images import register_image

    with session_scope() as s:
        register_image(s, "old", "partimage", "old", size_bytes=1, checksums={})
    _window(image="old", convert=True, max_concurrent=3)
    out = tick(T0)
    assert list(out["submitted"]) == ["n1"]  # one node goes with the conversion
    jobs = _jobs()
    convert = [j for j in jobs if j.kind == "convert"]
    assert len(convert) == 1 and convert[0].options["source"] == "old"
    assert [j.image_name for j in jobs if j.kind == "restore"] == ["old-ng"]
    assert tick(T0 + timedelta(seconds=30))["submitted"] == {}  # the rest wait for it
    assert len([j for j in _jobs() if j.kind == "convert"]) == 1
    finish_job(convert[0].id)
    with session_scope() as s:
        register_image(s, "old-ng", "partimage-ng", "old-ng", size_bytes=1, checksums={})
    out = tick(T0 + timedelta(minutes=1))
    assert sorted(out["submitted"]) == ["n2", "n3"]  # cap 3, n1 still in flight
    assert {j.image_name for j in _jobs() if j.kind == "restore"} == {"old-ng"}
    assert len([j for j in _jobs() if j.kind == "convert"]) == 1
