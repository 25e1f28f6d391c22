"""The `imgfarm` command: the operator's CLI.

This is the only module family that imports typer and rich. Every listing
has --json; every error names the bad input and exits non-zero (2 bad input,
3 not found, 4 conflict, 6 bad image, 7 driver failure, 8 database or broker
unusable).

Start-up time is part of the interface: scripts call this CLI in loops and
windows call it from cron, so building the command tree must stay close to
the cost of importing typer and rich (bench/cli_start.py measures it). The
command modules therefore import only typer and the farm's stdlib-only
modules at the top (Rich loads at the first thing printed through it, see
cli/output.py); SQLAlchemy, Celery, the settings, the image
formats and the servers are imported inside the command that needs them, each
import marked `# lazy:`. tests/test_cli_start.py checks that importing this
module loads none of them.
"""

from __future__ import annotations

import typer

from imgfarm.cli import bootimage, drivers, images, jobs, nodes, services, tokens, windows

app = typer.Typer(
    name="imgfarm",
    help="Capture, restore and convert disk images on PXE-booted nodes through Celery.\n\n"
    "Quick start: `imgfarm db upgrade`, `imgfarm node add n1 --disk /dev/sda ...`, "
    "`imgfarm capture n1 --image base --wait`, `imgfarm restore 'lab[001-120]' --image base --wait`.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)
app.add_typer(services.db_app, name="db")
app.add_typer(nodes.app, name="node")
app.add_typer(drivers.app, name="driver")
app.add_typer(images.app, name="image")
app.command("capture")(jobs.capture)
app.command("restore")(jobs.restore)
app.command("convert")(jobs.convert)
app.command("jobs")(jobs.jobs)
app.command("job")(jobs.job)
app.command("cancel")(jobs.cancel)
app.command("worker")(services.worker)
app.command("beat")(services.beat)
app.command("api")(services.api)
app.command("flower")(services.flower)
app.command("reconcile")(services.reconcile)
app.add_typer(windows.app, name="window")
app.add_typer(tokens.app, name="token")
app.add_typer(bootimage.app, name="bootimage")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
