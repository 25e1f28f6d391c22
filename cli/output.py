"""Output helpers for the CLI: tables for people, --json for scripts, errors with exit codes.

Everything the CLI prints that came from outside it (agent error texts, node
and image names, job messages, image headers, error messages that quote the
input) goes out as plain text: never parsed as Rich markup (`disk gone [/]`
is a message, not a closing tag), with control characters shown escaped
(`\\x1b[2J` cannot clear the operator's screen). `plain()` does the
escaping; `line()`, `echo()`, `table()` and `styled_state()` use it, so a
command that prints through them cannot get it wrong.

This module is imported by every command, so it imports only typer: Rich (~20
ms of start-up, a third of Typer's own) loads at the first thing printed
through it, so a command that only echoes plain lines (`image convert` into a
pipe, a script's `--json`) never loads it. See cli/main.py on start-up time.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import re
import sys
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any, TypeVar, cast

import typer

from imgfarm.errors import ImgfarmError
from imgfarm.models.dbapi import explain_db_error
from imgfarm.units import format_bytes

if TYPE_CHECKING:
    from rich.console import Console
    from rich.text import Text

F = TypeVar("F", bound=Callable[..., Any])


class _LazyConsole:
    """A Rich console made at its first use (Rich is imported then, not at start-up)."""

    def __init__(self, stderr: bool) -> None:
        self._stderr = stderr
        self._real: Console | None = None

    def _console(self) -> Console:
        if self._real is None:
            from rich.console import Console  # lazy: see the module docstring

            self._real = Console(stderr=self._stderr)
        return self._real

    def __getattr__(self, name: str) -> Any:
        return getattr(self._console(), name)

    # Python looks these up on the type, not through __getattr__ (Rich's Live uses them)
    def __enter__(self) -> Console:
        return self._console().__enter__()

    def __exit__(self, *exc: Any) -> None:
        self._console().__exit__(*exc)


console = cast("Console", _LazyConsole(stderr=False))
err_console = cast("Console", _LazyConsole(stderr=True))

# C0 and C1 control characters, DEL, and the Unicode line separators and
# bidirectional overrides that can make a terminal show something else than
# the text (ESC sequences, "trojan source" reordering).
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u200e\u200f\u2028-\u202e\u2066-\u2069]")


_NAMED = {"\n": "\\n", "\t": "\\t", "\r": "\\r"}


def _escape(match: re.Match[str]) -> str:
    char = match.group()
    code = ord(char)
    return _NAMED.get(char) or (f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}")


def plain(value: Any) -> str:
    """`value` as text for a terminal: control characters written as escapes (`\\x1b`, `\\n`).

    Why: job errors, event messages and image headers come from agents and
    files, and a raw escape sequence in them would be executed by the
    operator's terminal. The result is one line; markup is not involved (see
    line()).
    """
    text = str(value)
    return _CONTROL.sub(_escape, text) if _CONTROL.search(text) else text


def line(*parts: Any) -> Text:
    """One line to print with Rich, never parsed as markup: str parts go through plain(),
    Text parts keep their style (see styled_state)."""
    from rich.text import Text  # lazy: see the module docstring

    out = Text()
    for part in parts:
        out.append(part if isinstance(part, Text) else plain(part))
    return out


def say(*parts: Any) -> None:
    """Print line(*parts) on stdout."""
    console.print(line(*parts), highlight=False)


@contextlib.contextmanager
def status(text: str) -> Iterator[Callable[[str], None]]:
    """A spinner with `text` (shown through line()) while the block runs; yields update(text).

    Only on a terminal: elsewhere Rich's spinner prints nothing, so a pipe or a script
    gets no spinner and does not load Rich for it."""
    if not sys.stdout.isatty():
        yield lambda _text: None
        return
    with console.status(line(text)) as spinner:
        yield lambda new: spinner.update(line(new))


def echo(text: Any = "", err: bool = False) -> None:
    """typer.echo of one line, through plain(): for lines that quote names, messages or paths."""
    typer.echo(plain(text), err=err)


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


def _finite(value: Any) -> Any:
    """`value` with NaN and the infinities as null: JSON has no such numbers."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


def print_json(data: Any) -> None:
    """Valid JSON on stdout, whatever a row holds: json.dumps escapes every control character
    itself, and a number that is not finite (a rate of Infinity stored by an older farm) is
    written as null instead of the `Infinity` no JSON reader takes."""
    sys.stdout.write(json.dumps(_finite(data), indent=2, default=str, allow_nan=False) + "\n")


def table(columns: Iterable[str], rows: Iterable[Iterable[Any]], title: str | None = None) -> None:
    """A table of plain-text cells (Text cells keep their style)."""
    from rich.table import Table  # lazy: loads only for the commands that draw a table
    from rich.text import Text

    t = Table(title=title, header_style="bold")
    for c in columns:
        t.add_column(c)
    for r in rows:
        t.add_row(*[v if isinstance(v, Text) else Text("" if v is None else plain(v)) for v in r])
    console.print(t)


STATE_STYLE = {
    "succeeded": "green", "failed": "red", "timed_out": "red", "cancelled": "yellow",
    "running": "cyan", "booting": "cyan", "finalizing": "cyan", "queued": "white",
}


def styled_state(state: str) -> Text:
    """A job state in its colour, as Text (never markup)."""
    from rich.text import Text  # lazy: see the module docstring

    return Text(plain(state), style=STATE_STYLE.get(state, "white"))


def _fail(exc: ImgfarmError) -> None:
    from rich.text import Text  # lazy: see the module docstring

    err_console.print(line(Text("error:", style="red"), " ", exc.message), highlight=False)
    if exc.hint:
        err_console.print(line("  hint: ", exc.hint), highlight=False)
    raise typer.Exit(exc.exit_code) from None


def handles_errors(fn: F) -> F:
    """Turn farm errors into one red line (and its hint) and the error's exit code.

    Database errors an operator can fix (no tables yet, server unreachable)
    become farm errors too; they come from SQLAlchemy or, on the read paths
    that do without it, from the DB-API module itself (see models/dbapi.py).
    """

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except ImgfarmError as exc:
            _fail(exc)
        except Exception as exc:
            farm_error = explain_db_error(exc)
            if farm_error is None:
                raise
            _fail(farm_error)

    return wrapper  # type: ignore[return-value]
