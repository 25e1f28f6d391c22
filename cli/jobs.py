"""Submitting and watching jobs: capture, restore, convert, jobs, job, cancel.

Reading jobs (`jobs`, `job N`, the polls of `--wait`) goes through
models/views.py on the DB-API, so on SQLite these commands start without
SQLAlchemy; submitting goes through tasks/submit.py (the ORM and Celery).
"""

from __future__ import annotations

import getpass
import socket
import time
from typing import Any

import typer

from imgfarm.cli.credentials import operator_token
from imgfarm.cli.output import (
    STATE_STYLE,
    console,
    echo,
    handles_errors,
    human_bytes,
    human_duration,
    json_option,
    line,
    plain,
    print_json,
    say,
    styled_state,
    table,
)
from imgfarm.errors import Forbidden, Unauthorized
from imgfarm.models import states
from imgfarm.models.dbapi import reader
from imgfarm.models.views import list_jobs, read_job, read_jobs
from imgfarm.protocol import MAX_ID, ImageFormat


def who(check_token: bool = True) -> str:
    """Who submits: the operator token's name when the CLI has one (checked), and the local user.

    Why check a token the CLI does not need to reach the database: so that a job
    says which token's holder submitted it, and a revoked token stops working
    here as it does on the API.
    """
    try:
        user = getpass.getuser()
    except Exception:  # noqa: BLE001
        user = "unknown"
    local = f"cli:{user}@{socket.gethostname()}"
    token = operator_token() if check_token else ""
    if not token:
        return local
    # lazy: SQLAlchemy loads only for the commands that submit
    from imgfarm.models.db import session_scope
    from imgfarm.models.tokens import verify_token

    with session_scope() as s:
        principal = verify_token(s, token)
    if principal is None:
        raise Unauthorized("the operator token (IMGFARM_TOKEN or the token file) is not valid",
                           hint="it may have been revoked: see `imgfarm token list`")
    if not principal.allows("operate"):
        raise Forbidden(f"token {principal.name!r} has scope {principal.scope}; submitting "
                           "needs operate", hint="use a token with scope operate or admin")
    return f"token:{principal.name} ({local})"


def _views(job_ids: list[int]) -> list[dict[str, Any]]:
    with reader(bare_sqlite=True) as db:
        return read_jobs(db, job_ids)


MANY = 20  # above this many jobs, --wait shows totals instead of a line per job


def state_counts(views: list[dict[str, Any]]) -> str:
    """`412 running, 60 booting, 28 succeeded`: jobs by state, in lifecycle order."""
    counts: dict[str, int] = {}
    for v in views:
        counts[v["state"]] = counts.get(v["state"], 0) + 1
    order = [*states.ACTIVE, *states.FINAL]
    return ", ".join(f"{counts[s]} {s}" for s in order if s in counts)


def _reason(view: dict[str, Any]) -> str:
    """The first line of a job's error, as `: text` (or nothing)."""
    return f": {view['error'].splitlines()[0]}" if view["error"] else ""


def _ended_line(view: dict[str, Any], kind: bool = True) -> Any:
    return line(f"job {view['id']} ", f"{view['kind']} " if kind else "", view["node"] or view["image"], " ",
                styled_state(view["state"]), _reason(view))


def wait_for_jobs(job_ids: list[int], quiet: bool = False, poll: float = 1.0) -> list[dict[str, Any]]:
    """Progress until all jobs have ended; returns the final views.

    Up to MANY jobs: a line (or bar) per job.  More: one bar for the mean
    progress with the count per state, and a line for each job that ends
    without succeeding, as it happens -- 500 bars help nobody.
    """
    if not job_ids:
        return []
    many = len(job_ids) > MANY
    if quiet or not console.is_terminal:
        last: dict[int, str] = {}
        last_counts = ""
        while True:
            views = _views(job_ids)
            for v in views:
                text = v["state"] if many else f"{v['state']} {v['progress']:.0f}%"
                if not quiet and last.get(v["id"]) != text:
                    if not many or (v["state"] in states.FINAL and v["state"] != states.SUCCEEDED):
                        echo(f"job {v['id']} {v['kind']} {v['node'] or v['image']}: {text}")
                    last[v["id"]] = text
            if many and not quiet and (counts := state_counts(views)) != last_counts:
                echo(f"{len(views)} jobs: {counts}")
                last_counts = counts
            if all(v["state"] in states.FINAL for v in views):
                return views
            time.sleep(poll)
    return _draw_progress(job_ids, many, poll)


def _draw_progress(job_ids: list[int], many: bool, poll: float) -> list[dict[str, Any]]:
    """wait_for_jobs on a terminal: live bars. Labels are plain text; states are escaped markup."""
    # lazy: Rich's progress bars load only for --wait on a terminal
    from rich.markup import escape
    from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn

    def state_field(state: str) -> str:
        return f"[{STATE_STYLE.get(state, 'white')}]{escape(plain(state))}[/]"

    with Progress(TextColumn("{task.fields[label]}", markup=False), BarColumn(), TaskProgressColumn(),
                  TextColumn("{task.fields[state]} {task.fields[extra]}"), console=console) as prog:
        tasks = {}
        views = _views(job_ids)
        if many:
            total = prog.add_task("", total=100, label=f"{len(views)} jobs", state="", extra="")
        else:
            for v in views:
                label = plain(f"job {v['id']:>5} {v['kind']:8} {v['node'] or v['image']:12}")
                tasks[v["id"]] = prog.add_task("", total=100, label=label, state=state_field(v["state"]),
                                               extra="")
        told: set[int] = set()
        while True:
            views = _views(job_ids)
            if many:
                mean = sum(v["progress"] for v in views) / len(views)
                rate = sum(v["rate"] or 0 for v in views)
                prog.update(total, completed=mean, state=escape(state_counts(views)),
                            extra=f"{human_bytes(rate)}/s" if rate else "")
                for v in views:
                    if v["state"] in states.FINAL and v["state"] != states.SUCCEEDED and v["id"] not in told:
                        told.add(v["id"])
                        prog.console.print(_ended_line(v, kind=False), highlight=False)
            else:
                for v in views:
                    extra = f"{human_bytes(v['rate'])}/s" if v["rate"] else ""
                    prog.update(tasks[v["id"]], completed=v["progress"], state=state_field(v["state"]),
                                extra=extra)
            if all(v["state"] in states.FINAL for v in views):
                return views
            time.sleep(poll)


def report_and_exit(views: list[dict[str, Any]], json_out: bool) -> None:
    if json_out:
        print_json(views)
    else:
        shown = views if len(views) <= MANY else [v for v in views if v["state"] != states.SUCCEEDED]
        for v in shown:
            console.print(_ended_line(v), highlight=False)
        if len(views) > MANY:
            say(f"{len(views)} jobs: {state_counts(views)}")
    if any(v["state"] != states.SUCCEEDED for v in views):
        raise typer.Exit(1)


DISK_HELP = ("device to image on the node for this job only (default: the node's --disk), "
             "e.g. /dev/sda1 for a partition image")


@handles_errors
def capture(
    node: str = typer.Argument(..., help="the node whose disk to capture"),
    image: str = typer.Option(..., "--image", "-i", help="name of the new image"),
    fmt: str = typer.Option(ImageFormat.NG.value, "--format", "-f",
                            help=f"{ImageFormat.NG} (default) or {ImageFormat.PARTIMAGE}"),
    wait: bool = typer.Option(False, "--wait", "-w", help="wait for the end; exit 1 unless it succeeded"),
    timeout: float = typer.Option(0, "--timeout", help="seconds for the whole job (default: settings)"),
    disk: str = typer.Option("", "--disk", help=DISK_HELP),
    transport: str = typer.Option("", "--transport", help="how the agent writes the store: nfs or "
                                  "http (default: IMGFARM_IMAGE_TRANSPORT)"),
    json_out: bool = json_option(),
) -> None:
    """Capture a node's disk into a new image."""
    # lazy: Celery loads only for the commands that talk to the broker
    from imgfarm.tasks import submit

    sub = submit.submit_capture(node, image, fmt, submitted_by=who(),
                                options=submit.job_options(timeout, disk, transport))
    _after_submit(sub.job_ids, {}, wait, json_out)


def _after_submit(job_ids: list[int], skipped: dict[str, str], wait: bool, json_out: bool,
                  extra: list[int] | None = None) -> None:
    if not wait:
        if json_out:
            print_json({"job_ids": job_ids, "skipped": skipped, "convert_job_id": extra[0] if extra else None})
        else:
            for n, why in skipped.items():
                echo(f"skipped {n}: {why}")
            echo("queued job" + ("s " if len(job_ids) > 1 else " ") + " ".join(map(str, job_ids)))
        return
    for n, why in skipped.items():
        echo(f"skipped {n}: {why}", err=True)
    views = wait_for_jobs((extra or []) + job_ids, quiet=json_out)
    report_and_exit(views, json_out)


@handles_errors
def restore(
    nodes: str = typer.Argument(..., help="node range: lab[001-120], n1,n3, @group, lab[1-9]!lab5"),
    image: str = typer.Option(..., "--image", "-i", help="image to restore"),
    wait: bool = typer.Option(False, "--wait", "-w", help="wait for all; exit 1 if any did not succeed"),
    skip_busy: bool = typer.Option(False, "--skip-busy", help="restore the others when some nodes are busy"),
    convert: bool = typer.Option(False, "--convert", help="convert a legacy partimage image once, then restore that"),
    timeout: float = typer.Option(0, "--timeout", help="seconds for each node's whole job (default: settings)"),
    disk: str = typer.Option("", "--disk", help=DISK_HELP),
    transport: str = typer.Option("", "--transport", help="how agents read the store: nfs or http "
                                  "(default: IMGFARM_IMAGE_TRANSPORT)"),
    multicast: bool = typer.Option(False, "--multicast", help="one udpcast stream for the whole "
                                   "range; nodes that miss it restore by unicast"),
    max_wait: float = typer.Option(0, "--max-wait", help="multicast: start this many seconds after "
                                   "the first node joined, even if not all did (default: settings)"),
    max_bitrate: str = typer.Option("", "--max-bitrate", help="multicast: cap the stream, e.g. 600m"),
    json_out: bool = json_option(),
) -> None:
    """Restore an image onto many nodes at once."""
    # lazy: Celery loads only for the commands that talk to the broker
    from imgfarm.tasks import submit

    opts = submit.job_options(timeout, disk, transport, multicast, max_wait, max_bitrate)
    sub = submit.submit_restore(nodes, image, submitted_by=who(), skip_busy=skip_busy, convert=convert,
                                options=opts)
    extra = [sub.convert_job_id] if sub.convert_job_id else None
    _after_submit(sub.job_ids, sub.skipped, wait, json_out, extra)


@handles_errors
def convert(
    image: str = typer.Argument(..., help="registered legacy partimage image"),
    name: str = typer.Option("", "--name", help="name of the new image (default IMAGE-ng)"),
    wait: bool = typer.Option(False, "--wait", "-w"),
    json_out: bool = json_option(),
) -> None:
    """Queue a conversion to partimage-ng on the CPU queue (imgfarm.convert)."""
    # lazy: Celery loads only for the commands that talk to the broker
    from imgfarm.tasks.convert import submit_convert

    job_id = submit_convert(image, name or None, submitted_by=who())
    _after_submit([job_id], {}, wait, json_out)


@handles_errors
def jobs(
    state: str = typer.Option("", "--state", "-s", help="only jobs in this state"),
    node: str = typer.Option("", "--node", "-n", help="only this node's jobs"),
    kind: str = typer.Option("", "--kind", help="capture, restore or convert"),
    limit: int = typer.Option(50, "--limit"),
    json_out: bool = json_option(),
) -> None:
    """List jobs, newest first."""
    with reader(bare_sqlite=True) as db:
        found = list_jobs(db, state, node, kind, limit)
    if json_out:
        print_json(found)
        return
    print_jobs_table(found)


def print_jobs_table(views: list[dict[str, Any]], title: str | None = None) -> None:
    table(["job", "kind", "node", "image", "state", "progress", "duration", "size", "error"],
          [[v["id"], v["kind"], v["node"], v["image"], styled_state(v["state"]), f"{v['progress']:.0f}%",
            human_duration(v["duration"]), human_bytes(v["bytes_done"]),
            (v["error"].splitlines() or [""])[0][:60]] for v in views], title=title)


@handles_errors
def job(
    job_id: int = typer.Argument(..., min=1, max=MAX_ID, help="the job's id"),
    follow: bool = typer.Option(False, "--follow", "-f", help="live progress until the job ends"),
    json_out: bool = json_option(),
) -> None:
    """One job with its events; --follow shows a live progress bar."""
    if follow:
        wait_for_jobs([job_id], quiet=json_out)
    with reader(bare_sqlite=True) as db:
        view = read_job(db, job_id)
    if json_out:
        print_json(view)
        return
    for key in ("id", "kind", "node", "image", "format", "state", "progress", "duration", "error",
                "celery_task_id", "submitted_by"):
        say(f"{key:15} ", view[key])
    table(["at", "kind", "state", "message"],
          [[e["at"], e["kind"], e["state"], e["message"][:100]] for e in view["events"]], title="events")
    if follow and view["state"] != states.SUCCEEDED:
        raise typer.Exit(1)


@handles_errors
def cancel(job_id: int = typer.Argument(..., min=1, max=MAX_ID, help="the job's id")) -> None:
    """Cancel a job: it ends as cancelled and its node goes back to local boot."""
    # lazy: Celery loads only for the commands that talk to the broker
    from imgfarm.tasks import submit

    was = submit.request_cancel(job_id)
    echo(f"cancel requested for job {job_id} (was {was})")
