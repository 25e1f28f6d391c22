"""The drivers' property tables as text: `driver show`, `node add --help`, docs/drivers.md.

Everything here reads the tables the drivers declare (`properties`), so the
help, the CLI, the API and the committed docs say what validation checks.
The docs are generated between marker lines and a test compares them:

    <!-- properties: power ipmi -->
    ...generated table...
    <!-- /properties -->

Regenerate with `make docs` (python -m imgfarm.drivers.docs docs/drivers.md).
"""

from __future__ import annotations

import argparse
import inspect
import re
import sys
import textwrap
from pathlib import Path
from typing import TYPE_CHECKING, Any

from imgfarm.drivers import registry
from imgfarm.drivers.base import DriverInterface
from imgfarm.drivers.properties import Kind, Property, built_in_settings
from imgfarm.errors import InvalidInput, NotFound

if TYPE_CHECKING:
    from imgfarm.config.settings import Settings

_BLOCK = re.compile(r"(<!-- properties: (\w+) ([\w.-]+) -->\n)(.*?)(<!-- /properties -->)", re.S)
_UNPRINTABLE = re.compile(r"[\x00-\x1f\x7f]")


def _plain(text: str) -> str:
    """A third-party driver's text, safe to print: one line, no control characters."""
    return _UNPRINTABLE.sub(" ", text).strip()


def summary(drv: DriverInterface) -> str:
    """The first line of the driver class's docstring."""
    doc = inspect.getdoc(type(drv)) or ""
    return _plain(doc.splitlines()[0]) if doc else ""


def default_text(prop: Property, settings: Settings | None = None, code: bool = False) -> str:
    """The default as a reader needs it: "623 (IMGFARM_IPMI__PORT)", "pxe", or ""."""
    def q(text: str) -> str:
        return f"`{text}`" if code else text

    if prop.required:
        return "required"
    value = prop.fallback(settings)
    if prop.setting:
        return f"{q(value)} ({q(prop.env_var)})" if value else f"{q(prop.env_var)} (empty)"
    return q(value) if value else ""


def property_view(prop: Property, settings: Settings | None = None) -> dict[str, Any]:
    return {
        "name": prop.name,
        "description": _plain(prop.description),
        "required": prop.required,
        "default": "" if prop.required else prop.fallback(settings),
        "setting": prop.env_var,
        "kind": prop.kind.value,
        "choices": list(prop.choices),
        "example": prop.example,
        "secret": prop.secret,
    }


def driver_view(drv: DriverInterface, settings: Settings | None = None) -> dict[str, Any]:
    return {
        "name": drv.name,
        "kind": drv.kind,
        "summary": summary(drv),
        "properties": [property_view(p, settings) for p in drv.properties],
    }


def catalog() -> list[dict[str, Any]]:
    """Every registered driver, for `imgfarm driver list`; one that cannot load says why."""
    out: list[dict[str, Any]] = []
    boot, power = registry.known_drivers()
    for kind, names in (("boot", boot), ("power", power)):
        for name in names:
            try:
                drv = registry.driver(kind, name)
            except InvalidInput as exc:
                out.append({"name": name, "kind": kind, "summary": f"not available: {exc}",
                            "keys": []})
                continue
            out.append({"name": name, "kind": kind, "summary": summary(drv),
                        "keys": [p.name for p in drv.properties]})
    return out


def show(name: str) -> list[DriverInterface]:
    """The boot and/or power driver called `name` (`imgfarm driver show NAME`)."""
    boot, power = registry.known_drivers()
    found = [registry.driver(kind, name) for kind, names in (("boot", boot), ("power", power))
             if name in names]
    if not found:
        raise NotFound(f"unknown driver {name!r}",
                       hint=f"known drivers: {', '.join(sorted(set(boot) | set(power)))}")
    return found


_KIND_WORDS = {Kind.PORT: "a port number", Kind.INTEGER: "a whole number",
               Kind.BOOLEAN: "true or false", Kind.TEXT: "text"}


def show_view(name: str) -> dict[str, Any]:
    """`imgfarm driver show NAME --json` and GET /api/v1/drivers/NAME: {name, boot?, power?}."""
    out: dict[str, Any] = {"name": name}
    for drv in show(name):
        view = driver_view(drv)
        out[drv.kind] = {"summary": view["summary"], "properties": view["properties"]}
    return out


def _meaning(prop: Property) -> str:
    text = _plain(prop.description)
    if prop.choices:
        text += f"; one of {', '.join(prop.choices)}"
    elif prop.kind is not Kind.TEXT:
        text += "; " + _KIND_WORDS[prop.kind]
    return text


def show_text(drivers: list[DriverInterface], settings: Settings | None = None) -> str:
    """`imgfarm driver show NAME`: each key, its default, what it is for, an example."""
    lines: list[str] = []
    for drv in drivers:
        if lines:
            lines.append("")
        lines.append(f"{drv.kind} driver {drv.name}: {summary(drv)}")
        if not drv.properties:
            lines.append("  (no settings)")
        for prop in drv.properties:
            default = default_text(prop, settings)
            lines.append(f"  {prop.name}" + (f"  [{default}]" if default else ""))
            lines.append(f"      {_meaning(prop)}" + ("; secret" if prop.secret else ""))
            if prop.example:
                lines.append(f"      e.g. --set {prop.name}={prop.example}")
    return "\n".join(lines)


def settings_help() -> str:
    """The part of `imgfarm node add --help` that lists the --set keys of every driver."""
    lines = ["Driver settings (--set KEY=VALUE) by driver; `imgfarm driver show NAME` "
             "gives defaults and examples:", ""]
    for entry in catalog():
        if not entry["keys"]:
            lines.append(f"  {entry['kind']} {entry['name']}: no settings")
            continue
        lines.append(f"  {entry['kind']} {entry['name']}:")
        drv = registry.driver(entry["kind"], entry["name"])
        for prop in drv.properties:
            mark = " (required)" if prop.required else ""
            lines += textwrap.wrap(f"{prop.name}{mark}: {_meaning(prop)}", width=88,
                                   initial_indent="    ", subsequent_indent="        ")
    return "\n".join(lines)


def markdown_table(drv: DriverInterface) -> str:
    """The docs' table of one driver, with the defaults as shipped (not this machine's)."""
    settings = built_in_settings()
    rows = ["| `--set` key | default | what it is |", "|---|---|---|"]
    for prop in drv.properties:
        default = default_text(prop, settings, code=True)
        meaning = _meaning(prop).replace("|", "\\|")
        if prop.secret:
            meaning = f"**secret**: {meaning}"
        if prop.example:
            meaning += f"; e.g. `{prop.name}={prop.example}`"
        rows.append(f"| `{prop.name}` | {default or '—'} | {meaning} |")
    return "\n".join(rows) + "\n"


def update_markdown(text: str) -> str:
    """`text` with every properties block regenerated from the built-in drivers."""
    built_in = {(d.kind, d.name): d for d in registry.all_drivers(built_in_only=True)}

    def block(m: re.Match[str]) -> str:
        key = (m.group(2), m.group(3))
        if key not in built_in:
            raise ValueError(f"docs name no built-in {key[0]} driver {key[1]!r}")
        return m.group(1) + markdown_table(built_in[key]) + m.group(5)

    return _BLOCK.sub(block, text)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Regenerate the drivers' property tables in docs.")
    ap.add_argument("paths", nargs="+", type=Path)
    ap.add_argument("--check", action="store_true", help="only report files that are stale")
    args = ap.parse_args(argv)
    stale = 0
    for path in args.paths:
        old = path.read_text()
        new = update_markdown(old)
        if new != old:
            stale += 1
            if not args.check:
                path.write_text(new)
            print(f"{path}: {'stale' if args.check else 'regenerated'}")
    return 1 if args.check and stale else 0


if __name__ == "__main__":
    sys.exit(main())
