"""`imgfarm window ...`: scheduled bulk reimaging windows.

A window restores an image to a node range on a cron schedule, at most
`--max-concurrent` at a time, for `--duration` minutes; `imgfarm beat` runs
it (the `imgfarm.window_tick` task). Everything a window names (cron, time
zone, image, nodes, groups) is checked when it is added, not when it fires.
"""

from __future__ import annotations

from typing import Any

import typer

from imgfarm.cli.output import echo, handles_errors, json_option, print_json, table
from imgfarm.models.states import ON_CLOSE_FINISH

app = typer.Typer(help="Scheduled bulk reimaging windows (run by `imgfarm beat`).",
                  no_args_is_help=True)


@app.command("add")
@handles_errors
def add(
    name: str = typer.Argument(..., help="window name, e.g. lab1-weekly"),
    cron: str = typer.Option(..., "--cron", help="when it opens, 5 fields, e.g. '0 2 * * 6'"),
    duration: int = typer.Option(..., "--duration", help="how long it stays open, in minutes"),
    image: str = typer.Option(..., "--image", "-i", help="image to restore"),
    nodes: str = typer.Option("", "--nodes", "-n", help="node range, e.g. lab[001-120]"),
    group: list[str] = typer.Option([], "--group", "-g", help="target group (repeatable)"),
    tz: str = typer.Option("UTC", "--timezone", "--tz", help="the cron's time zone (IANA)"),
    convert: bool = typer.Option(False, "--convert", help="convert a legacy image once first"),
    max_concurrent: int = typer.Option(20, "--max-concurrent", help="jobs at once, at most"),
    store_cap: int | None = typer.Option(
        None, "--store-cap", help="start nothing while the farm has this many active jobs"),
    on_close: str = typer.Option(ON_CLOSE_FINISH, "--on-close",
                                 help="at the end: finish (let running jobs end) or cancel"),
    max_retries: int = typer.Option(1, "--max-retries", help="retries of a failed node"),
    multicast: bool = typer.Option(False, "--multicast", help="the nodes it starts together share "
                                   "one udpcast stream; nodes that miss it restore by unicast"),
    max_wait: float = typer.Option(0, "--max-wait", help="multicast: start this many seconds after "
                                   "the first node joined, even if not all did (default: settings)"),
    max_bitrate: str = typer.Option("", "--max-bitrate", help="multicast: cap the stream, e.g. 600m"),
    disabled: bool = typer.Option(False, "--disabled", help="add it disabled"),
    json_out: bool = json_option(),
) -> None:
    """Add a window, e.g. `window add lab1 --cron '0 2 * * 6' --duration 240 -g lab1 -i base`."""
    # lazy: SQLAlchemy loads only for the commands that use the job database
    from imgfarm.models.db import session_scope
    from imgfarm.models.windows import add_window, window_view

    with session_scope() as s:
        window = add_window(s, name, cron, duration, image, nodes=nodes, groups=group,
                            timezone=tz, convert=convert, max_concurrent=max_concurrent,
                            store_cap=store_cap, on_close=on_close, max_retries=max_retries,
                            enabled=not disabled, multicast=multicast, max_wait=max_wait,
                            max_bitrate=max_bitrate)
        view = window_view(window)
    if json_out:
        print_json(view)
    else:
        echo(f"added window {name}: {view['cron']} ({view['timezone']}), next opens "
             f"{view['next_open'] or 'never (disabled)'}")


@app.command("list")
@handles_errors
def list_(json_out: bool = json_option()) -> None:
    """List windows with their schedule, cap and next opening."""
    # lazy: SQLAlchemy loads only for the commands that use the job database
    from imgfarm.models.db import session_scope
    from imgfarm.models.windows import window_views

    with session_scope() as s:
        views = window_views(s)
    if json_out:
        print_json(views)
        return
    table(["name", "cron", "tz", "minutes", "target", "image", "cap", "on close", "enabled",
           "next open"],
          [[v["name"], v["cron"], v["timezone"], v["duration_minutes"], v["target"], v["image"],
            v["max_concurrent"], v["on_close"], "yes" if v["enabled"] else "no",
            v["next_open"] or "-"] for v in views])


@app.command("show")
@handles_errors
def show(
    name: str,
    runs: bool = typer.Option(False, "--runs", help="also its runs and each node's outcome"),
    limit: int = typer.Option(10, "--limit", help="how many recent runs"),
    json_out: bool = json_option(),
) -> None:
    """Show a window; with --runs, its recent runs node by node."""
    # lazy: SQLAlchemy loads only for the commands that use the job database
    from imgfarm.models.db import session_scope
    from imgfarm.models.windows import window_detail

    with session_scope() as s:
        view: dict[str, Any] = window_detail(s, name, runs=runs, limit=limit)
    if json_out:
        print_json(view)
        return
    for key in ("name", "cron", "timezone", "duration_minutes", "target", "image", "convert",
                "max_concurrent", "store_cap", "on_close", "max_retries", "multicast",
                "multicast_max_wait", "multicast_max_bitrate", "enabled", "next_open"):
        echo(f"{key:>21}: {view[key]}")
    for run in view.get("runs", []):
        counts = ", ".join(f"{k} {v}" for k, v in run["counts"].items() if v)
        echo()
        echo(f"run {run['id']} ({run['trigger']}) {run['state']}: opened "
             f"{run['opened_at']}, closes {run['closes_at']}; {counts}")
        if run["message"]:
            echo(f"  {run['message']}")
        table(["node", "status", "attempts", "job", "reason"],
              [[n["node"], n["status"], n["attempts"], n["last_job_id"], n["reason"]]
               for n in run["nodes"]])


def _set_enabled(name: str, enabled: bool, json_out: bool) -> None:
    # lazy: SQLAlchemy loads only for the commands that use the job database
    from imgfarm.models.db import session_scope
    from imgfarm.models.windows import set_enabled

    with session_scope() as s:
        view = set_enabled(s, name, enabled)
    print_json(view) if json_out else echo(
        f"window {name} {'enabled' if enabled else 'disabled'}")


@app.command("enable")
@handles_errors
def enable(name: str, json_out: bool = json_option()) -> None:
    """Enable a window: it opens at its next cron slot."""
    _set_enabled(name, True, json_out)


@app.command("disable")
@handles_errors
def disable(name: str, json_out: bool = json_option()) -> None:
    """Disable a window: it opens no more, and an open run starts no new jobs."""
    _set_enabled(name, False, json_out)


@app.command("remove")
@handles_errors
def remove(name: str, json_out: bool = json_option()) -> None:
    """Remove a window and its run history (jobs stay in the job database)."""
    # lazy: SQLAlchemy loads only for the commands that use the job database
    from imgfarm.models.db import session_scope
    from imgfarm.models.windows import remove_window

    with session_scope() as s:
        remove_window(s, name)
    print_json({"removed": name}) if json_out else echo(f"removed window {name}")


@app.command("run-now")
@handles_errors
def run_now(name: str, json_out: bool = json_option()) -> None:
    """Open a window now for its duration (outside its schedule) and start its first jobs."""
    # lazy: Celery loads only for the commands that talk to the broker
    from imgfarm.tasks.window_runner import run_now as _run_now

    out = _run_now(name)
    if json_out:
        print_json(out)
        return
    echo(f"window {name} opened as run {out['run_id']}; started "
         f"{', '.join(f'{n} (job {j})' for n, j in out['submitted'].items()) or 'nothing'}")
    for node, why in out["skipped"].items():
        echo(f"  skipped {node}: {why}")
