"""Starting the farm's services: worker, beat, api, flower; and db upgrade, reconcile."""

from __future__ import annotations

import os
import sys

import typer

from imgfarm.cli.output import echo, handles_errors, json_option, print_json

db_app = typer.Typer(help="The job database.", no_args_is_help=True)


@db_app.command("upgrade")
@handles_errors
def db_upgrade() -> None:
    """Create or migrate the job database to the current schema."""
    # lazy: Alembic and SQLAlchemy load only for `imgfarm db`
    from imgfarm.models.migrate import current, upgrade

    upgrade()
    typer.echo(f"database at revision {current()}")


@db_app.command("revision")
def db_revision(message: str = typer.Option(..., "-m")) -> None:
    """(Developers) autogenerate a migration from the models."""
    # lazy: Alembic and SQLAlchemy load only for `imgfarm db`
    from imgfarm.models.migrate import revision

    revision(message)


def worker(
    cpu: bool = typer.Option(False, "--cpu", help="the convert worker: prefork pool on the CPU queue"),
    concurrency: int = typer.Option(0, help="threads (job worker) or processes (--cpu)"),
    loglevel: str = typer.Option("INFO", help="celery log level"),
    hostname: str = typer.Option("", help="celery node name"),
) -> None:
    """Start a Celery worker: job tasks in a threads pool (one thread per waiting job)."""
    # lazy: Celery's configuration (kombu) and the settings load only for `imgfarm worker`
    from imgfarm.config.celery import CPU_QUEUE, JOB_QUEUE
    from imgfarm.config.settings import get_settings

    settings = get_settings()
    args = ["celery", "-A", "imgfarm.worker.app", "worker", "-E", f"--loglevel={loglevel}"]
    env = dict(os.environ)
    if cpu:
        args += ["-Q", CPU_QUEUE, "-P", "prefork", f"--concurrency={concurrency or os.cpu_count() or 1}"]
        args += ["-n", hostname or "cpu@%h"]
    else:
        # Celery's threads pool, its threads started with the worker (worker/pool.py)
        env["CELERY_CUSTOM_WORKER_POOL"] = "imgfarm.worker.pool:TaskPool"
        args += ["-Q", JOB_QUEUE, "-P", "custom", f"--concurrency={concurrency or settings.job_concurrency}"]
        args += ["-n", hostname or "jobs@%h"]
    os.execvpe(sys.executable, [sys.executable, "-m", *args], env)


def beat(loglevel: str = typer.Option("INFO")) -> None:
    """Start celery beat: the reconciler and the window tick (run exactly one)."""
    # lazy: the settings (pydantic) load only for the commands that need them
    from imgfarm.config.settings import get_settings

    settings = get_settings()
    schedule = settings.data_dir / "celerybeat-schedule"
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    os.execvp(sys.executable, [sys.executable, "-m", "celery", "-A", "imgfarm.worker.app", "beat",
                               f"--loglevel={loglevel}", "-s", str(schedule)])


@handles_errors
def api(host: str = typer.Option("", help="bind address (default: settings)"),
        port: int = typer.Option(0, help="port (default: settings)"),
        certfile: str = typer.Option("", "--certfile", help="TLS: serve https with this PEM "
                                     "certificate chain (default: IMGFARM_API_CERTFILE)"),
        keyfile: str = typer.Option("", "--keyfile", help="TLS: the certificate's PEM key "
                                    "(default: IMGFARM_API_KEYFILE)")) -> None:
    """Start the HTTP API (operators and agents).

    It refuses to listen beyond loopback while no operator token exists
    (`imgfarm token create`), so a fresh farm is never open to its network.
    """
    # lazy: the settings (pydantic) load only for the commands that need them
    from imgfarm.config.settings import get_settings
    from imgfarm.errors import InvalidInput
    from imgfarm.models.tokens import check_listen

    settings = get_settings()
    host = host or settings.api_host
    certfile, keyfile = certfile or settings.api_certfile, keyfile or settings.api_keyfile
    if bool(certfile) != bool(keyfile):
        raise InvalidInput("TLS needs both --certfile and --keyfile",
                           hint="give both (PEM files), or neither for plain http")
    for what, path in (("--certfile", certfile), ("--keyfile", keyfile)):
        if path and not os.access(path, os.R_OK):
            raise InvalidInput(f"{what} {path}: not a readable file", hint="a PEM file readable by this user")
    check_listen(host)
    # lazy: uvicorn loads only for `imgfarm api`
    import uvicorn

    uvicorn.run("imgfarm.api.app:app", host=host, port=port or settings.api_port, log_level="info",
                ssl_certfile=certfile or None, ssl_keyfile=keyfile or None)


@handles_errors
def flower(
    port: int = typer.Option(5555),
    address: str = typer.Option("127.0.0.1"),
    behind_proxy: bool = typer.Option(False, "--behind-proxy", help="no auth of Flower's own: "
                                      "a reverse proxy in front of it authenticates (loopback only)"),
) -> None:
    """Start Flower against the farm's broker (the live view; the job DB is the history).

    Flower can cancel and retry tasks, so it never runs open: it takes basic
    auth from FLOWER_BASIC_AUTH (user:password[,user2:password2]) or the 0600
    file IMGFARM_FLOWER_AUTH_FILE, or listens on loopback only with
    --behind-proxy. Credentials go in Flower's environment, never its command line.
    """
    # lazy: the CLI's credential reader, only for this command
    from imgfarm.cli.credentials import read_private_file
    from imgfarm.errors import InvalidInput

    auth = os.environ.get("FLOWER_BASIC_AUTH", "").strip()
    auth_file = os.environ.get("IMGFARM_FLOWER_AUTH_FILE", "")
    if not auth and auth_file:
        auth = ",".join(line.strip() for line in read_private_file(auth_file).splitlines() if line.strip())
    if auth and any(":" not in pair or pair.startswith(":") for pair in auth.split(",")):
        raise InvalidInput("Flower basic auth must be user:password (comma-separated for several)",
                           hint="fix FLOWER_BASIC_AUTH or IMGFARM_FLOWER_AUTH_FILE")
    if not auth and not behind_proxy:
        raise InvalidInput("Flower needs its own auth: it can cancel and retry the farm's tasks",
                           hint="set FLOWER_BASIC_AUTH=user:password or IMGFARM_FLOWER_AUTH_FILE (a 0600 "
                           "file), or run it behind an authenticating proxy with --behind-proxy")
    if behind_proxy and not auth:
        # lazy: the loopback rule lives with the tokens (models, SQLAlchemy), only for this case
        from imgfarm.models.tokens import is_loopback

        if not is_loopback(address):
            raise InvalidInput(f"--behind-proxy listens on loopback only, not {address}",
                               hint="let the proxy reach 127.0.0.1, or give Flower basic auth")
    env = {k: v for k, v in os.environ.items() if k != "FLOWER_UNAUTHENTICATED_API"}
    if auth:
        env["FLOWER_BASIC_AUTH"] = auth
    else:  # behind a proxy that authenticates: Flower's API must answer the proxy
        env["FLOWER_UNAUTHENTICATED_API"] = "true"
    os.execvpe(sys.executable, [sys.executable, "-m", "celery", "-A", "imgfarm.worker.app", "flower",
                                f"--port={port}", f"--address={address}"], env)


@handles_errors
def reconcile(json_out: bool = json_option()) -> None:
    """Run one reconcile pass now (resume orphaned jobs, end stuck ones)."""
    # lazy: Celery loads only for the commands that talk to the broker
    from imgfarm.tasks.reconcile import reconcile_once

    out = reconcile_once()
    print_json(out) if json_out else echo(
        f"resumed {out['resumed'] or 'none'}, ended {out['ended'] or 'none'}")
