"""Output helpers for the CLI: tables for people, --json for scripts, errors with exit codes."""

from __future__ import annotations

import functools
import json
import sys
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

import typer
from rich.console import Console
from rich.table import Table
from sqlalchemy.exc import DBAPIError

from imgfarm.errors import ImgfarmError
from imgfarm.units import format_bytes

console = Console()
err_console = Console(stderr=True)
F = TypeVar("F", bound=Callable[..., Any])


def json_option() -> Any:
    """The `--json` flag every command shares."""
    return typer.Option(False, "--json", help="print JSON (for scripts) instead of text")


def human_bytes(n: float | int | None) -> str:
    """Like format_bytes, but "-" for an unknown or zero size in tables."""
    return format_bytes(n) if n else "-"


def human_duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 60:
        return f"{seconds:.1f}s"
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


def print_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")


def table(columns: Iterable[str], rows: Iterable[Iterable[Any]], title: str | None = None) -> None:
    t = Table(title=title, header_style="bold")
    for c in columns:
        t.add_column(c)
    for r in rows:
        t.add_row(*[("" if v is None else str(v)) for v in r])
    console.print(t)


STATE_STYLE = {
    "succeeded": "green", "failed": "red", "timed_out": "red", "cancelled": "yellow",
    "running": "cyan", "booting": "cyan", "finalizing": "cyan", "queued": "white",
}


def styled_state(state: str) -> str:
    return f"[{STATE_STYLE.get(state, 'white')}]{state}[/]"


def _fail(exc: ImgfarmError) -> None:
    err_console.print(f"[red]error:[/] {exc.message}", highlight=False)
    if exc.hint:
        err_console.print(f"  hint: {exc.hint}", highlight=False)
    raise typer.Exit(exc.exit_code) from None


def handles_errors(fn: F) -> F:
    """Turn farm errors into one red line (and its hint) and the error's exit code."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except ImgfarmError as exc:
            _fail(exc)
        except DBAPIError as exc:
            # lazy: the job database's settings load only to explain one of its errors
            from imgfarm.models.db import explain_db_error

            farm_error = explain_db_error(exc)
            if farm_error is None:
                raise
            _fail(farm_error)

    return wrapper  # type: ignore[return-value]
