"""Starting the farm's services: worker, beat, api, flower; and db upgrade, reconcile."""

from __future__ import annotations

import os
import sys

import typer

from imgfarm.cli.output import handles_errors, json_option, print_json
from imgfarm.config.celery import CPU_QUEUE, JOB_QUEUE
from imgfarm.config.settings import get_settings

db_app = typer.Typer(help="The job database.", no_args_is_help=True)


@db_app.command("upgrade")
@handles_errors
def db_upgrade() -> None:
    """Create or migrate the job database to the current schema."""
    from imgfarm.models.migrate import current, upgrade  # lazy: Alembic loads only for `db`

    upgrade()
    typer.echo(f"database at revision {current()}")


@db_app.command("revision")
def db_revision(message: str = typer.Option(..., "-m")) -> None:
    """(Developers) autogenerate a migration from the models."""
    from imgfarm.models.migrate import revision  # lazy: Alembic loads only for `db`

    revision(message)


def worker(
    cpu: bool = typer.Option(False, "--cpu", help="the convert worker: prefork pool on the CPU queue"),
    concurrency: int = typer.Option(0, help="threads (job worker) or processes (--cpu)"),
    loglevel: str = typer.Option("INFO", help="celery log level"),
    hostname: str = typer.Option("", help="celery node name"),
) -> None:
    """Start a Celery worker: job tasks in a threads pool (one thread per waiting job)."""
    settings = get_settings()
    args = ["celery", "-A", "imgfarm.worker.app", "worker", "-E", f"--loglevel={loglevel}"]
    if cpu:
        args += ["-Q", CPU_QUEUE, "-P", "prefork", f"--concurrency={concurrency or os.cpu_count() or 1}"]
        args += ["-n", hostname or "cpu@%h"]
    else:
        args += ["-Q", JOB_QUEUE, "-P", "threads", f"--concurrency={concurrency or settings.job_concurrency}"]
        args += ["-n", hostname or "jobs@%h"]
    os.execvp(sys.executable, [sys.executable, "-m", *args])


def beat(loglevel: str = typer.Option("INFO")) -> None:
    """Start celery beat: the reconciler and the window tick (run exactly one)."""
    settings = get_settings()
    schedule = settings.data_dir / "celerybeat-schedule"
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    os.execvp(sys.executable, [sys.executable, "-m", "celery", "-A", "imgfarm.worker.app", "beat",
                               f"--loglevel={loglevel}", "-s", str(schedule)])


def api(host: str = typer.Option("", help="bind address (default: settings)"),
        port: int = typer.Option(0, help="port (default: settings)")) -> None:
    """Start the HTTP API (operators and agents)."""
    import uvicorn

    settings = get_settings()
    uvicorn.run("imgfarm.api.app:app", host=host or settings.api_host, port=port or settings.api_port,
                log_level="info")


def flower(port: int = typer.Option(5555), address: str = typer.Option("127.0.0.1")) -> None:
    """Start Flower against the farm's broker (the live view; the job DB is the history)."""
    os.environ.setdefault("FLOWER_UNAUTHENTICATED_API", "true")
    os.execvp(sys.executable, [sys.executable, "-m", "celery", "-A", "imgfarm.worker.app", "flower",
                               f"--port={port}", f"--address={address}"])


def reconcile(json_out: bool = json_option()) -> None:
    """Run one reconcile pass now (resume orphaned jobs, end stuck ones)."""
    from imgfarm.tasks.reconcile import reconcile_once  # lazy: Celery loads only for this command

    out = reconcile_once()
    print_json(out) if json_out else typer.echo(
        f"resumed {out['resumed'] or 'none'}, ended {out['ended'] or 'none'}")
