"""`imgfarm driver ...`: which drivers this farm has and the settings each takes."""

from __future__ import annotations

from typing import Any

import typer
from typer.core import TyperCommand

from imgfarm.cli.output import echo, handles_errors, json_option, print_json

app = typer.Typer(help="The boot and power drivers, and the --set settings each takes.",
                  no_args_is_help=True)


class WithDriverSettings(TyperCommand):
    """A command whose --help ends with every driver's --set keys, read from their tables."""

    # Any: typer's own (vendored) click types have no public names.
    def format_help(self, ctx: Any, formatter: Any) -> None:
        super().format_help(ctx, formatter)
        # lazy: every driver loads only when this help is shown
        from imgfarm.drivers.docs import settings_help

        formatter.write("\n" + settings_help() + "\n")


@app.command("list")
@handles_errors
def list_drivers(json_out: bool = json_option()) -> None:
    """Every boot and power driver this farm has (a site's own packages included)."""
    from imgfarm.drivers.docs import catalog  # lazy: every driver, only for this command

    entries = catalog()
    if json_out:
        print_json(entries)
        return
    width = max((len(e["name"]) for e in entries), default=4)
    for e in entries:
        echo(f"{e['kind']:5}  {e['name']:{width}}  {e['summary']}")
        if e["keys"]:
            echo(f"{'':5}  {'':{width}}  --set {', '.join(e['keys'])}")


@app.command("show")
@handles_errors
def show(
    name: str = typer.Argument(..., help="a driver name, e.g. ipmi (see `imgfarm driver list`)"),
    json_out: bool = json_option(),
) -> None:
    """A driver's settings: each --set KEY=VALUE, its default here, what it is for, an example."""
    from imgfarm.drivers import docs  # lazy: every driver, only for this command

    if json_out:
        print_json(docs.show_view(name))
        return
    for text in docs.show_text(docs.show(name)).splitlines():
        echo(text)
