"""The `imgfarm` command: the operator's CLI.

This is the only module family that imports typer and rich. Every listing
has --json; every error names the bad input and exits non-zero (2 bad input,
3 not found, 4 conflict, 6 bad image, 7 driver failure).
"""

from __future__ import annotations

import typer

from imgfarm.cli import images, jobs, nodes, services

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

try:
    from imgfarm.cli import windows

    app.add_typer(windows.app, name="window")
except ImportError:
    pass


def main() -> None:
    app()


if __name__ == "__main__":
    main()
